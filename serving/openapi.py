"""Documents the upload endpoints' 4xx answers in /docs.json.

BentoML 1.4 writes the same fixed error responses (its own exception bodies) for every API
and has no hook to declare others, so this ASGI middleware rewrites the document as it is
served: each upload route gets our statuses (serving.schemas.ERROR_STATUSES) with the error
body's schema (serving.schemas.ErrorBody), and a route whose answer BentoML cannot describe
(a list of a union: BentoML keeps the union's first member only) gets its full schema; the rest
of the document is BentoML's.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import TypeAdapter

from serving.schemas import ERROR_STATUSES, ErrorBody, ItemError

DOCS_PATH = "/docs.json"
REF = "#/components/schemas/{model}"


def add_error_responses(spec: dict[str, Any], routes: Iterable[str],
                        answers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI document with our error body and statuses on `routes`, and the 200 answer's
    schema of the routes in `answers` ({route: type}) (in place; returned)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorBody, ItemError):
        schemas[model.__name__] = model.model_json_schema(ref_template=REF)
    for route, kind in (answers or {}).items():
        ok = spec.get("paths", {}).get(route, {}).get("post", {}).get("responses", {}).get("200")
        if ok is None:
            continue
        schema = TypeAdapter(kind).json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        ok.setdefault("content", {})["application/json"] = {"schema": schema}
    for route in routes:
        post = spec.get("paths", {}).get(route, {}).get("post")
        if post is None:
            continue
        responses = post.setdefault("responses", {})
        for status, text in ERROR_STATUSES.items():
            responses[str(status)] = {
                "description": text,
                "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}}
    return spec


class OpenAPIErrors:
    """ASGI middleware: GET /docs.json passes through `add_error_responses`."""

    def __init__(self, app, routes: Iterable[str], answers: Mapping[str, Any] | None = None):
        self.app = app
        self.routes = list(routes)
        self.answers = dict(answers or {})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != DOCS_PATH or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    await send_patched()

        async def send_patched() -> None:
            data = bytes(body)
            if start.get("status") == 200:
                try:
                    data = json.dumps(add_error_responses(json.loads(data), self.routes, self.answers)).encode()
                except ValueError:   # not JSON: leave BentoML's answer as it is
                    pass
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(data)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, capture)

"""Upload safety: request-size limits, file-only fields, and client errors as JSON.

`UploadGuard` is an ASGI middleware in front of the upload endpoints. It runs before BentoML
parses a request, because BentoML 1.4 reads a request body whole and then acts on what it
found: a text part in a file field is downloaded as a URL, and a string sent in JSON for a
file parameter goes to its file validator (which may hand it on as a server-side path). The
guard therefore requires multipart/form-data whose file fields are real file parts, refuses
a body over the limit by its Content-Length (413 before reading anything) or, without one,
as soon as the running count passes the limit, and records the client's file names so that
error messages can name them.
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SCOPE_KEY = "dimml.upload_names"   # scope entry: {field: [client file names, in order]}


class Rejected(Exception):
    """A request refused with a 4xx: `status`, a message naming the cause, a machine cause."""

    def __init__(self, status: int, message: str, cause: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.cause = status, message, cause
        self.headers = dict(headers or {})   # e.g. Retry-After on a 503

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "cause": self.cause}, status_code=self.status,
                            headers=self.headers or None)


@dataclass(frozen=True)
class Upload:
    """One uploaded file: where BentoML stored it and what the client called it."""

    path: Path
    name: str          # for messages: "video 'clip.mp4'"


MAX_FILENAME_BYTES = 200   # of the name's last path component: BentoML stores an upload as
                           # tmpXXXXXXXX<name>, and file systems stop at 255 bytes (else HTTP 500)


def bad_filename(raw: bytes) -> str:
    """Why a client file name cannot reach BentoML's temporary-file naming ('' when it can).

    BentoML 1.4 names an upload's temporary file after the last path component of the client's
    name: longer than the file system allows, or holding NUL, it fails with HTTP 500; a name
    that is not UTF-8 fails in Starlette's form parser. Path separators are harmless (only the
    last component is used), so they pass.
    """
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds control characters"
    base = os.path.basename(name)   # as BentoML takes it
    if len(base.encode("utf-8")) > MAX_FILENAME_BYTES:
        return f"is longer than {MAX_FILENAME_BYTES} bytes ({len(base.encode('utf-8'))})"
    return ""


class _PartChecker:
    """Streams a multipart body through python-multipart's parser, looking only at part headers."""

    def __init__(self, boundary: bytes, file_fields: Mapping[str, int]):
        self.file_fields = file_fields     # field -> most files it may hold
        self.names: dict[str, list[str]] = {}
        self.error: Rejected | None = None
        self._field, self._value, self._headers = b"", b"", {}
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        })

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _fail(self, error: Rejected) -> None:
        """Keep the first problem in upload order (one chunk may hold several parts)."""
        if self.error is None:
            self.error = error

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field not in self.file_fields:
            if b"filename" in options:   # a file this endpoint has no field for (BentoML would fail on it)
                self._fail(Rejected(400, f"field {field!r} is not a file field of this endpoint; it takes "
                                         f"{', '.join(self.file_fields)}", "unknown_field"))
            return
        # Starlette makes a part a file exactly when it has a filename parameter; without one
        # BentoML would treat the text as a URL to download.
        if b"filename" not in options:
            self._fail(Rejected(400, f"field {field!r} must be a file upload (a multipart part with a "
                                     f"filename); a path or URL given as text is refused", "not_a_file"))
            return
        bad = bad_filename(options[b"filename"])
        if bad:
            self._fail(Rejected(400, f"field {field!r}: the file name {bad}; rename the file "
                                     f"(names are kept only for messages)", "bad_filename"))
            return
        names = self.names.setdefault(field, [])
        names.append(options[b"filename"].decode("utf-8"))
        if len(names) > self.file_fields[field]:
            self._fail(Rejected(413, f"field {field!r} takes at most {self.file_fields[field]} "
                                     f"file(s)", "too_many_files"))

    def feed(self, chunk: bytes) -> None:
        if self.error is None and chunk:
            try:
                self._parser.write(chunk)
            except Exception as e:  # python-multipart's parse errors
                self._fail(Rejected(400, f"malformed multipart body ({e})", "bad_request"))


class UploadGuard:
    """ASGI middleware guarding the POST routes in `routes` ({path: {file field: most files}})."""

    def __init__(self, app, routes: Mapping[str, Mapping[str, int]], max_bytes: int):
        self.app = app
        self.routes = {p: dict(f) for p, f in routes.items()}
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        file_fields = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if file_fields is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            checker = self._start(headers, file_fields)
        except Rejected as e:
            return await e.response()(scope, receive, send)
        scope[SCOPE_KEY] = checker.names

        seen = 0
        tripped: Rejected | None = None

        async def guarded_receive() -> Message:
            nonlocal seen, tripped
            if tripped is not None:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen += len(body)
                if seen > self.max_bytes:
                    tripped = self._too_large()
                else:
                    checker.feed(body)
                    tripped = checker.error
                if tripped is not None:
                    # End the app's read here; its (failed) response is replaced by ours below.
                    return {"type": "http.disconnect"}
            return message

        replaced = False

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if tripped is None:
                return await send(message)
            if not replaced:
                replaced = True
                await tripped.response()(scope, receive, send)

        await self.app(scope, guarded_receive, guarded_send)
        if tripped is not None and not replaced:   # the app sent nothing at all
            await tripped.response()(scope, receive, send)

    def _too_large(self) -> Rejected:
        return Rejected(413, f"request body exceeds the upload limit of {self.max_bytes} bytes "
                             f"({self.max_bytes / 2**20:g} MiB)", "too_large")

    def _start(self, headers: dict[str, str], file_fields: Mapping[str, int]) -> _PartChecker:
        """Checks that need only the headers; returns the body checker."""
        ctype, options = parse_options_header(headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or not options.get(b"boundary"):
            raise Rejected(415, f"uploads must be multipart/form-data with file field(s) "
                                f"{', '.join(sorted(file_fields))}; got content type "
                                f"{headers.get('content-type') or 'none'!r} (a path or URL in a "
                                f"JSON body is refused)", "unsupported_media_type")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise Rejected(400, f"invalid Content-Length {length!r}", "bad_request")
            if int(length) > self.max_bytes:
                raise self._too_large()
        return _PartChecker(options[b"boundary"], file_fields)


def request_temp_dir() -> Path:
    """The per-request folder BentoML writes uploads to."""
    from bentoml._internal.context import request_temp_dir as _dir  # no public accessor in 1.4
    return Path(_dir()).resolve()


def collect(scope: Mapping[str, Any], field: str, paths: list[Path]) -> list[Upload]:
    """Pair BentoML's stored files with the client's names; refuse any path not from an upload.

    BentoML hands a file parameter to the handler as a server-side Path. The guard already
    admits only real file parts, but the handler checks again that each path lies in this
    request's upload folder: the service never opens a path a client named.
    """
    root = request_temp_dir()
    names = list(scope.get(SCOPE_KEY, {}).get(field, []))
    out = []
    for i, p in enumerate(paths):
        resolved = Path(p).resolve()
        if resolved.parent != root or not resolved.is_file():
            raise Rejected(400, f"field {field!r} must be an uploaded file; server-side paths are refused",
                           "not_a_file")
        label = f"{field}[{i}]" if len(paths) > 1 else field
        client = os.path.basename(names[i]) if i < len(names) and len(names) == len(paths) else ""
        out.append(Upload(resolved, f"{label} {client!r}" if client else label))
    return out

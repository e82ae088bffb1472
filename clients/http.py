"""Typed HTTP client for the dimml server (serving/service.py), synchronous and asynchronous.

    with Client("http://localhost:3000") as c:
        p = c.predict("clip.mp4")                                  # the model's one field (a video)
        p = c.predict({"video": "face.mp4", "audio": "voice.wav"})  # files by field: a video plus a
                                                                   # modality's own file
        p = c.predict({"front": "f.png", "rear": "r.png"})         # a model of two image views
        print(p.label, p.confidence, p.weight("fusion"))

    async with AsyncClient(url) as c:
        p = await c.predict(data)

429, 503 and connection failures are retried with exponential backoff (honouring Retry-After; a
429/503 with Retry-After, e.g. while the server's model process restarts, is retried for up to
RetryPolicy.max_wait_s whatever the retry count); any other non-2xx answer raises ServerError
carrying the status and the server's message.
"""
from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO

import httpx

from clients.result import Prediction

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

PREDICT, PREDICT_BATCH = "/predict", "/predict_batch"
READY, METADATA = "/readyz", "/metadata"
VIDEO_FIELD = "video"   # the upload field a lone source goes to (the server's /metadata lists its fields)

# Failures where the request never reached a model (or the answer never came back): retrying
# cannot do harm, inference is idempotent. A read timeout is not among them: the server is
# working on it, and resending would only queue the same work again.
RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                    httpx.ReadError, httpx.WriteError, httpx.PoolTimeout)


class ClientError(Exception):
    """Base of everything this client raises."""


class ServerError(ClientError):
    """The server answered with a non-2xx status; `message` is its error text."""

    def __init__(self, status: int, message: str, endpoint: str = "", body: Any = None):
        self.status, self.message, self.endpoint, self.body = status, message, endpoint, body
        super().__init__(f"HTTP {status} from {endpoint or 'server'}: {message}")


class ServerUnreachable(ClientError):
    """No answer from the server (connection refused, reset, ...) after every retry."""

    def __init__(self, url: str, attempts: int, cause: BaseException):
        self.url, self.attempts, self.cause = url, attempts, cause
        super().__init__(f"{url}: server unreachable after {attempts} attempt(s) "
                         f"({type(cause).__name__}: {cause or 'no detail'})")


class RequestTimeout(ClientError):
    """The server took longer than the client's timeout to answer."""

    def __init__(self, url: str, timeout: float | None):
        self.url, self.timeout = url, timeout
        super().__init__(f"{url}: no answer within {timeout} s (raise the client's timeout?)")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay k (0-based) ~ backoff_s * 2**k, capped."""

    retries: int = 3                  # attempts after the first one
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    statuses: frozenset[int] = frozenset({429, 503})
    # A 429/503 that carries Retry-After is the server saying when to come back (dimml's server sends it
    # while its model process restarts, ~12 s): such answers are retried past `retries`, as long as the
    # waits add up to at most this many seconds.
    max_wait_s: float = 120.0

    def __post_init__(self):
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_wait_s < 0:
            raise ValueError(f"retries, backoff and wait times must be >= 0, got {self}")

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number `retry`; a server's Retry-After wins (capped)."""
        hinted = _parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, self.max_backoff_s)
        base = min(self.backoff_s * 2 ** retry, self.max_backoff_s)
        return base * random.uniform(0.5, 1.0)   # jitter: parallel clients do not retry in lockstep

    def after_answer(self, retry: int, waited_s: float, status: int, retry_after: str | None) -> float | None:
        """Seconds to wait before retrying an answer with this status, or None: give up (raise it)."""
        if status not in self.statuses:
            return None
        delay = self.delay(retry, retry_after)
        if retry < self.retries:
            return delay
        if _parse_retry_after(retry_after) is not None and waited_s + delay <= self.max_wait_s:
            return delay   # the server said when to come back: keep coming back, within max_wait_s
        return None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# request bodies and responses (shared by both clients)

@dataclass(frozen=True)
class Upload:
    """One file part of a multipart request, read fully so that a retry can resend it."""

    filename: str
    data: bytes

    @property
    def content_type(self) -> str:
        return mimetypes.guess_type(self.filename)[0] or "application/octet-stream"

    def part(self) -> tuple[str, bytes, str]:
        return (self.filename, self.data, self.content_type)


def read_upload(src: Source, filename: str | None = None) -> Upload:
    """A path, bytes or binary file -> Upload; a missing path raises FileNotFoundError naming it."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        with open(path, "rb") as f:
            return Upload(filename or os.path.basename(path), f.read())
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Upload(filename or "upload", bytes(src))
    if hasattr(src, "seek"):
        src.seek(0)
    name = filename or os.path.basename(str(getattr(src, "name", "") or "")) or "upload"
    return Upload(name, src.read())


def error_message(response: httpx.Response) -> tuple[str, Any]:
    """The server's error text and the parsed body: BentoML's 4xx bodies are a JSON list
    ([{"error": ...}]) or object ({"error": ...} / {"detail": ...}); anything else is shown as text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip()
        return (text[:500] or response.reason_phrase or "no message"), text
    return _find_message(body) or json.dumps(body)[:500], body


def _find_message(body: Any) -> str | None:
    if isinstance(body, str):
        return body
    if isinstance(body, list):
        msgs = [m for m in (_find_message(x) for x in body) if m]
        return "; ".join(msgs) or None
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "msg"):
            if key in body:
                return _find_message(body[key]) or str(body[key])
    return None


def _raise_for(response: httpx.Response, endpoint: str) -> None:
    if response.is_success:
        return
    message, body = error_message(response)
    raise ServerError(response.status_code, message, endpoint, body)


def _json(response: httpx.Response, endpoint: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ServerError(response.status_code, f"answer is not JSON: {response.text[:200]!r}", endpoint) from None


def _prediction(obj: Any, endpoint: str) -> Prediction:
    if isinstance(obj, dict) and "error" in obj and "status" in obj:   # a /predict_batch slot's error
        raise ServerError(int(obj["status"]), str(obj["error"]), endpoint, obj)
    try:
        return Prediction.from_dict(obj)
    except ValueError as e:
        raise ServerError(200, str(e), endpoint, obj) from None


def source_fields(files: Source | Mapping[str, Source]) -> dict[str, Source]:
    """Files by upload field; a lone source is the video (the field of every video-reading model)."""
    if isinstance(files, Mapping):
        if not files:
            raise ValueError("no file given")
        return dict(files)
    return {VIDEO_FIELD: files}


def read_uploads(files: Source | Mapping[str, Source], filenames: Mapping[str, str] | None = None) -> dict[str, Upload]:
    """Read every file of one sample (so that a retry can resend it)."""
    names = filenames or {}
    return {f: read_upload(src, names.get(f)) for f, src in source_fields(files).items()}


def _parts(ups: Mapping[str, Upload]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(f, u.part()) for f, u in ups.items()]


class _Base:
    def __init__(self, url: str, timeout: float | None, retry: RetryPolicy | None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def _timeout(self) -> httpx.Timeout:
        # connecting should take well under the time a prediction may take
        return httpx.Timeout(self.timeout, connect=None if self.timeout is None else min(self.timeout, 10.0))


# ---------------------------------------------------------------------------------------
# synchronous

class Client(_Base):
    """Blocking client; thread-safe (one connection pool shared by all threads)."""

    def __init__(self, url: str, *, timeout: float | None = 60.0, retry: RetryPolicy | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(url, timeout, retry)
        self._http = httpx.Client(base_url=self.url, timeout=self._timeout(), headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, endpoint: str, **kw) -> httpx.Response:
        """Send with retries on RetryPolicy.statuses and connection failures; raise ServerError on non-2xx."""
        attempt, waited = 0, 0.0
        while True:
            try:
                r = self._http.request(method, endpoint, **kw)
            except RETRY_EXCEPTIONS as e:
                if attempt >= self.retry.retries:
                    raise ServerUnreachable(self.url + endpoint, attempt + 1, e) from e
                delay = self.retry.delay(attempt)
            except httpx.TimeoutException:
                raise RequestTimeout(self.url + endpoint, self.timeout) from None
            else:
                delay = self.retry.after_answer(attempt, waited, r.status_code, r.headers.get("retry-after"))
                if delay is None:
                    _raise_for(r, endpoint)
                    return r
            time.sleep(delay)
            attempt, waited = attempt + 1, waited + delay

    def predict(self, files: Source | Mapping[str, Source], *,
                filenames: Mapping[str, str] | None = None) -> Prediction:
        """Classify one sample: its files by upload field (the model's source fields, see
        metadata()["upload_fields"]), or one file for the `video` field. `filenames`: the names the
        server sees (default: each path's name)."""
        r = self.request("POST", PREDICT, files=_parts(read_uploads(files, filenames)))
        return _prediction(_json(r, PREDICT), PREDICT)

    def predict_batch(self, videos: Sequence[Source], filenames: Sequence[str] | None = None) -> list[Prediction]:
        """Classify several clips in one request; results in input order."""
        ups = [read_upload(v, None if filenames is None else filenames[i]) for i, v in enumerate(videos)]
        r = self.request("POST", PREDICT_BATCH, files=[("videos", u.part()) for u in ups])
        body = _json(r, PREDICT_BATCH)
        if not isinstance(body, list) or len(body) != len(ups):
            raise ServerError(r.status_code, f"expected a list of {len(ups)} predictions", PREDICT_BATCH, body)
        return [_prediction(x, PREDICT_BATCH) for x in body]

    def metadata(self) -> dict[str, Any]:
        """The served model: name, version, classes, modalities, source and upload fields,
        preprocessing, backend."""
        return _json(self.request("POST", METADATA, json={}), METADATA)

    def ready(self) -> bool:
        """True when the server answers /readyz with 2xx (never raises, never retries)."""
        try:
            return self._http.get(READY).is_success
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Block until ready; ServerUnreachable after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerUnreachable(self.url + READY, 0, TimeoutError(f"not ready within {timeout} s"))
            time.sleep(interval)


# ---------------------------------------------------------------------------------------
# asynchronous

class AsyncClient(_Base):
    """asyncio client with the same API as Client (methods are coroutines)."""

    def __init__(self, url: str, *, timeout: float | None = 60.0, retry: RetryPolicy | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(url, timeout, retry)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self._timeout(), headers=headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, endpoint: str, **kw) -> httpx.Response:
        """As Client.request."""
        attempt, waited = 0, 0.0
        while True:
            try:
                r = await self._http.request(method, endpoint, **kw)
            except RETRY_EXCEPTIONS as e:
                if attempt >= self.retry.retries:
                    raise ServerUnreachable(self.url + endpoint, attempt + 1, e) from e
                delay = self.retry.delay(attempt)
            except httpx.TimeoutException:
                raise RequestTimeout(self.url + endpoint, self.timeout) from None
            else:
                delay = self.retry.after_answer(attempt, waited, r.status_code, r.headers.get("retry-after"))
                if delay is None:
                    _raise_for(r, endpoint)
                    return r
            await asyncio.sleep(delay)
            attempt, waited = attempt + 1, waited + delay

    async def predict(self, files: Source | Mapping[str, Source], *,
                      filenames: Mapping[str, str] | None = None) -> Prediction:
        # reading a file is blocking I/O: keep it off the event loop
        ups = await asyncio.to_thread(read_uploads, files, filenames)
        r = await self.request("POST", PREDICT, files=_parts(ups))
        return _prediction(_json(r, PREDICT), PREDICT)

    async def predict_batch(self, videos: Sequence[Source], filenames: Sequence[str] | None = None) -> list[Prediction]:
        ups = [await asyncio.to_thread(read_upload, v, None if filenames is None else filenames[i])
               for i, v in enumerate(videos)]
        r = await self.request("POST", PREDICT_BATCH, files=[("videos", u.part()) for u in ups])
        body = _json(r, PREDICT_BATCH)
        if not isinstance(body, list) or len(body) != len(ups):
            raise ServerError(r.status_code, f"expected a list of {len(ups)} predictions", PREDICT_BATCH, body)
        return [_prediction(x, PREDICT_BATCH) for x in body]

    async def metadata(self) -> dict[str, Any]:
        return _json(await self.request("POST", METADATA, json={}), METADATA)

    async def ready(self) -> bool:
        try:
            return (await self._http.get(READY)).is_success
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() > deadline:
                raise ServerUnreachable(self.url + READY, 0, TimeoutError(f"not ready within {timeout} s"))
            await asyncio.sleep(interval)


__all__ = ["Client", "AsyncClient", "RetryPolicy", "ClientError", "ServerError", "ServerUnreachable",
           "RequestTimeout", "Source", "Upload", "read_upload", "read_uploads", "source_fields", "error_message"]

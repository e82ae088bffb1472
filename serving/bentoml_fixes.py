"""A fix for a BentoML 1.4 defect that makes a long-running server's memory creep (issue 19).

BentoML's request timeout (`bentoml._internal.server.http.traffic.TimeoutMiddleware`, the
`traffic.timeout` of every service) arms `loop.call_later(timeout, ...)` for each request and
never cancels it: every request leaves a live timer behind for `timeout` seconds (300 s on our
entry service, 120 s on the inference one). A timer keeps the context (contextvars) it was
armed in, and uvicorn arms it in a context copied from the connection's reader, which it sets
up anew inside the previous response's `send` (resuming reads on a keep-alive connection); that
context still holds BentoML's `request` variable. So each timer keeps the previous request of
its connection alive, with its scope, form, upload records and OpenTelemetry span, and the
asyncio loop, whose timers are then mostly live ones, never purges the cancelled timers either.
Measured (benchmarks/memprobe.py): every request of the last `timeout` seconds stayed in memory,
~25 kB each, e.g. 180 -> 630 MiB in the API worker at 58 requests/s.

`apply()` makes the middleware disarm its timer when the request ends, which is what the
middleware means to do; the timeout itself (504 when no response has started in time) is kept.
It patches one method, only on the BentoML versions it was written against and only while the
method is still BentoML's own: anything else is left alone with a warning.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger("bentoml.dimml")

FIXED_FOR = ("1.4.",)   # the BentoML versions whose TimeoutMiddleware this replaces
ORIGINAL_CALL = None    # BentoML's own TimeoutMiddleware.__call__, once replaced (tests compare the two)


async def _timeout_call(self, scope: dict[str, Any], receive, send) -> None:
    """TimeoutMiddleware.__call__ that disarms its timer when the request is over."""
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    started = loop.create_future()   # set when the response starts; the timeout covers the time until then
    timer = loop.call_later(self.timeout, self._set_timer_out, started)

    async def send_started(message) -> None:
        if not started.done():
            started.set_result(None)
        await send(message)

    task = asyncio.ensure_future(self.app(scope, receive, send_started))
    try:
        try:
            await started
        except asyncio.TimeoutError:
            if task.cancel():
                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
            return
        await task
    finally:
        timer.cancel()   # the fix: no timer (and no context it holds) outlives its request


def apply() -> bool:
    """Install the fix; True when it is in place (also when it already was)."""
    import bentoml
    from bentoml._internal.server.http import traffic

    cls = traffic.TimeoutMiddleware
    if cls.__call__ is _timeout_call:
        return True
    if not bentoml.__version__.startswith(FIXED_FOR) or not hasattr(cls, "_set_timer_out"):
        logger.warning("bentoml %s: its TimeoutMiddleware is not the one serving/bentoml_fixes.py fixes; "
                       "left as it is (check whether requests still outlive their timeout)", bentoml.__version__)
        return False
    global ORIGINAL_CALL
    ORIGINAL_CALL = cls.__call__
    cls.__call__ = _timeout_call
    return True


__all__ = ["apply"]

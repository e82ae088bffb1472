"""The entry service's link to the inference service: no accepted request ends in a 500 because the
model process is gone.

When the inference worker dies (killed, out of memory, a crash), BentoML restarts it (~12 s for
the tiny bundle on 2 CPUs) and the entry's calls in flight fail at the connection; calls made
while it restarts would wait in the listening socket's backlog (BentoML's arbiter holds it) until
the new worker accepts them. `Upstream.call` turns a connection failure into a 503 with
Retry-After and marks the link down; so does a watcher that sees every inference worker process
it was served by gone (they are this process's siblings under `bentoml serve`; checked every
WATCH_EVERY_S, so a death between two calls is noticed too). While down, new calls are refused at
once with the same 503, so no request piles up in front of a dead worker, and /readyz is false,
until a probe (every PROBE_EVERY_S) is answered by the restarted worker. The
inference service's own refusals (BentoML's adaptive batching sheds a clip it cannot serve within
DIMML_MAX_LATENCY_MS with a 503, its concurrency limit with a 429) become the same 503 without
marking the link down. Inference is idempotent, so the client's retry (clients.http retries a
503 for as long as the server keeps sending Retry-After, up to RetryPolicy.max_wait_s) is safe.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from serving.uploads import Rejected

logger = logging.getLogger("bentoml.dimml")

PROBE_EVERY_S = 0.5
PROBE_TIMEOUT_S = 2.0
WATCH_EVERY_S = 0.25
UNAVAILABLE = "unavailable"   # the `cause` of a 503
# failures of the inter-service connection (BentoML's client is aiohttp): the worker died, restarted,
# or closed a kept-alive connection as it was being reused
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
REFUSED = (429, 503)   # the inference service's own "not now"


class Upstream:
    """Calls to the inference service, with 503 + Retry-After instead of a 500 when it cannot answer."""

    def __init__(self, probe: Callable[[], Awaitable[Any]], retry_after_s: int,
                 workers: Callable[[], set[int]] | None = None):
        self._probe = probe                  # a call that succeeds once the inference service serves again
        self._workers = workers              # the inference worker processes' pids (None: not watched)
        self.retry_after_s = retry_after_s
        self.down_since: float | None = None
        self.reason = ""
        self.outages = 0
        self._serving: set[int] = set()      # the worker pids alive when it last answered
        self._inflight: set[asyncio.Future] = set()   # calls being answered
        self._dropped: set[asyncio.Future] = set()    # calls mark_down cancelled (answered 503)
        self._recover: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    def _unavailable(self, message: str) -> Rejected:
        return Rejected(503, message, UNAVAILABLE, headers={"Retry-After": str(self.retry_after_s)})

    def check(self) -> None:
        """Rejected(503) at once while the inference service is down (before an upload is decoded for nothing)."""
        self._watch()
        if self.down_since is not None:
            raise self._unavailable(f"the model is restarting (unavailable for {time.monotonic() - self.down_since:.0f} s: "
                                    f"{self.reason}); retry after {self.retry_after_s} s")

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """fn(*args), or Rejected(503) when the inference service is down or refuses the work."""
        from bentoml.exceptions import BentoMLException

        self.check()
        for attempt in (1, 2):
            task = asyncio.ensure_future(fn(*args))
            self._inflight.add(task)
            try:
                return await task
            except asyncio.CancelledError:
                if task in self._dropped:   # cancelled by mark_down, not by the request's own end
                    raise self._unavailable(f"the model process stopped while it had this request ({self.reason}); "
                                            f"retry after {self.retry_after_s} s") from None
                raise
            except CONNECTION_ERRORS as e:
                if attempt == 1 and self._workers_alive():
                    # The inference worker's uvicorn closes a connection idle for 5 s, BentoML's client
                    # keeps one for 15: reusing one as it closes fails at once. The worker is alive and
                    # the call is idempotent: once more, on a fresh connection.
                    logger.info("inference connection failed with its worker alive (%s: %s): sending again",
                                type(e).__name__, e)
                    continue
                self.mark_down(f"{type(e).__name__}: {e}")
                raise self._unavailable(f"the model process stopped answering ({type(e).__name__}); "
                                        f"retry after {self.retry_after_s} s") from None
            except BentoMLException as e:
                if int(getattr(e, "error_code", 500)) in REFUSED:
                    raise self._unavailable(f"the model is overloaded ({' '.join(str(e).split())[:200]}); "
                                            f"retry after {self.retry_after_s} s") from None
                raise
            finally:
                self._inflight.discard(task)
                self._dropped.discard(task)
        raise AssertionError("unreachable")

    def _workers_alive(self) -> bool:
        """Whether the inference worker processes that served are still there (True when not watched)."""
        if not self._serving:
            return True
        return bool(self._serving & self._live_workers())

    def mark_down(self, reason: str) -> None:
        """Refuse calls until the probe answers (started here, once per outage), and answer the calls in
        flight at once: a dead worker will not (those queued in its socket's backlog would wait for the
        restart, or time out if it never comes)."""
        if self.down_since is None:
            self.down_since, self.reason = time.monotonic(), reason
            self.outages += 1
            logger.warning("inference service unavailable (%s): answering 503 until it is back", reason)
            for task in self._inflight:
                if not task.done():
                    self._dropped.add(task)
                    task.cancel()
        if self._recover is None or self._recover.done():
            self._recover = asyncio.get_running_loop().create_task(self._wait_until_back())

    async def _wait_until_back(self) -> None:
        while self.down_since is not None:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await asyncio.wait_for(self._probe(), PROBE_TIMEOUT_S)
            except Exception:   # still restarting (refused, reset, timed out in the backlog)
                continue
            logger.warning("inference service back after %.1f s", time.monotonic() - self.down_since)
            self._serving = self._live_workers()
            self.down_since, self.reason = None, ""

    def _live_workers(self) -> set[int]:
        try:
            return set(self._workers()) if self._workers else set()
        except Exception:   # the watcher must never take the service down
            return set()

    def _watch(self) -> None:
        """Start the process watcher (once, on the serving loop), when there are processes to watch."""
        if self._workers is None or (self._watcher is not None and not self._watcher.done()):
            return
        self._serving = self._live_workers()
        if self._serving:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_workers())

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            if self.down_since is None and self._serving and not (self._serving & self._live_workers()):
                self.mark_down(f"inference worker process(es) {sorted(self._serving)} gone")


def sibling_workers(service_name: str) -> set[int]:
    """Pids of the live worker processes of `service_name` that share this process's parent (the
    processes `bentoml serve` started for it)."""
    import psutil

    out = set()
    for p in psutil.Process(os.getppid()).children():
        try:
            cmd = p.cmdline()
            if p.status() != psutil.STATUS_ZOMBIE and "--service-name" in cmd and \
                    cmd[cmd.index("--service-name") + 1] == service_name:
                out.add(p.pid)
        except (psutil.Error, IndexError):
            continue
    return out


__all__ = ["Upstream", "sibling_workers", "CONNECTION_ERRORS", "UNAVAILABLE"]

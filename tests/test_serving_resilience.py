"""The service loses no accepted request: its inference worker SIGKILLed while a scoring run posts
to it (a real `bentoml serve`, real HTTP, the real client and scorer), and BentoML's request
timeout no longer keeps finished requests alive (serving/bentoml_fixes.py)."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from clients.output import read_results
from clients.score import ScoreOptions, Stop, run_score

from conftest import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow


def inference_pids(server: subprocess.Popen) -> set[int]:
    out = set()
    for p in psutil.Process(server.pid).children(recursive=True):
        try:
            if "DIMMLInference" in p.cmdline():
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def predict_count(url: str, status: int) -> float:
    """The entry service's /predict answers with this status so far (BentoML's request counter)."""
    total = 0.0
    for labels, value in re.findall(r"^bentoml_service_request_total\{([^}]*)\} (\S+)$",
                                    httpx.get(f"{url}/metrics", timeout=10).text, re.M):
        if 'endpoint="/predict"' in labels and f'http_response_code="{status}"' in labels:
            total += float(value)
    return total


def ready_within(url: str, timeout: float) -> bool:
    """/readyz answered 200 within `timeout` (a readiness probe's view: no answer in time is not ready)."""
    try:
        return httpx.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except httpx.TimeoutException:
        return False


@pytest.fixture
def server(tiny_bundle, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"),
           "DIMML_BUNDLE": str(tiny_bundle("audio,visual")), "DIMML_MAX_LATENCY_MS": "30000",
           "DIMML_RETRY_AFTER_S": "1"}
    proc, url = start_server(env, tmp_path / "serve.log")
    try:
        wait_ready(proc, url, tmp_path / "serve.log")
        yield proc, url, tmp_path / "serve.log"
    finally:
        stop_server(proc)


def test_inference_worker_killed_during_a_scoring_run(server, tiny_corpus, tmp_path):
    """SIGKILL the model process mid-run: the requests it had and those sent while it restarts get 503
    with Retry-After (never 500), the client retries them, the run ends with every row answered, and
    the service is ready again by itself."""
    proc, url, log = server
    corpus = tiny_corpus("audio,visual")
    clips = sorted(corpus.rglob("*.mp4"))
    data = tmp_path / "data"
    for i in range(60):
        src = clips[i % len(clips)]
        (data / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, data / src.parent.name / f"{i:03d}.mp4")
    out = tmp_path / "r.csv"
    opts = ScoreOptions(inputs=[str(data)], out=out, server=url, recursive=True, workers=4, progress=False)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_score(opts, Stop())))
    [killed] = inference_pids(proc)
    runner.start()
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") > 10):
        assert runner.is_alive() and time.monotonic() < deadline, "no rows before the kill"
        time.sleep(0.02)
    os.kill(killed, signal.SIGKILL)
    # while it restarts (>= 8 s here): a request is refused with 503 + Retry-After, not queued, and
    # /readyz fails (as a probe with a 1 s timeout sees it: one in flight at the kill can wait in
    # BentoML's own probe of the dead worker)
    with open(clips[0], "rb") as f:
        r = httpx.post(f"{url}/predict", files={"video": (clips[0].name, f, "video/mp4")}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["cause"] == "unavailable", r.text
    deadline = time.monotonic() + 10
    while ready_within(url, 1.0):
        assert time.monotonic() < deadline, "still ready 10 s after the model process was killed"
        time.sleep(0.05)
    runner.join(timeout=240)
    assert not runner.is_alive()
    summary = result["summary"]
    assert summary.complete and summary.server_lost is None
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(data).as_posix() for p in data.rglob("*.mp4"))
    assert not [r for r in rows if r["error"]]                      # every row answered, none lost
    assert predict_count(url, 500) == 0 and predict_count(url, 503) >= 1
    wait_ready(proc, url, log, timeout=60)                          # ready again, by itself
    assert inference_pids(proc) and killed not in inference_pids(proc)
    text = log.read_text(errors="replace")
    assert "inference service unavailable" in text and "inference service back after" in text


# ---------------------------------------------------------------------------------------
# BentoML's request timeout (no server needed: the middleware itself, on an ASGI app)

async def _answer(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _requests(call, app, n: int, timeout: float) -> tuple[int, list[int]]:
    """n requests through TimeoutMiddleware(app) called as `call`: (its live timers left, statuses)."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    mw = TimeoutMiddleware(app, timeout=timeout)
    statuses: list[int] = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    for _ in range(n):
        await call(mw, {"type": "http", "path": "/predict"}, receive, send)
    loop = asyncio.get_running_loop()
    live = [h for h in loop._scheduled if not h.cancelled() and getattr(h._callback, "__name__", "") == "_set_timer_out"]
    return len(live), statuses


def test_request_timeout_leaves_no_timer_behind():
    """BentoML's TimeoutMiddleware leaves a live timer (holding its context) per finished request for
    `timeout` seconds; fixed, it leaves none and still answers 504 when no response starts in time."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from serving import bentoml_fixes

    assert bentoml_fixes.apply()
    original = bentoml_fixes.ORIGINAL_CALL
    assert original is not None and TimeoutMiddleware.__call__ is not original
    left, statuses = asyncio.run(_requests(original, _answer, 20, timeout=300))
    assert left == 20 and statuses == [200] * 20                    # the defect, as BentoML ships it
    left, statuses = asyncio.run(_requests(TimeoutMiddleware.__call__, _answer, 20, timeout=300))
    assert left == 0 and statuses == [200] * 20                     # fixed

    async def never(scope, receive, send):
        await asyncio.sleep(30)

    left, statuses = asyncio.run(_requests(TimeoutMiddleware.__call__, never, 1, timeout=0.2))
    assert statuses == [504] and left == 0

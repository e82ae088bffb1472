"""The service's inference worker SIGKILLed during a scoring run over HTTP: recovery time, rows lost.

    .venv/bin/python benchmarks/bench_worker_kill.py                  # tiny bundle, 3 kills, ~3 min
    .venv/bin/python benchmarks/bench_worker_kill.py --kills 1 --files 120 --work /tmp/bench-kill

Per kill: starts `bentoml serve serving.service:DIMML` (bench_serving.Server) on a tiny bundle with
random weights, runs `dimml score` through it (clients.score.run_score with the HTTP scorer,
--clients concurrent requests, its default retry policy) over --files copies of 3 s synth clips,
and once --kill-after rows are written SIGKILLs the DIMMLInference worker. Meanwhile a probe posts
one clip every PROBE_EVERY_S without retrying and /readyz is polled. Reported: the time from the
kill to the probe's first 503 (refused at once) and first 200 after it (answered again), to /readyz
back to 200, the entry service's /predict answers by status over the run (BentoML's counter:
200, 503, and 500 which must be 0), and the scoring run's rows: written, errors, lost (files
without a row; must be 0).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import make_corpus  # noqa: E402
from bench_soak import SOAK_CLIP, roles  # noqa: E402

from bench_serving import Server, log, machine, make_bundle  # noqa: E402

PROBE_EVERY_S = 0.2


def status_counts(url: str) -> Counter:
    import httpx

    out: Counter = Counter()
    for labels, value in re.findall(r"^bentoml_service_request_total\{([^}]*)\} (\S+)$",
                                    httpx.get(f"{url}/metrics", timeout=10).text, re.M):
        if 'endpoint="/predict"' in labels and "DIMMLInference" not in labels:
            code = re.search(r'http_response_code="(\d+)"', labels)
            out[code.group(1) if code else "?"] += int(float(value))
    return out


class Probe:
    """Posts one clip every PROBE_EVERY_S (no retry) and polls /readyz; records (t, what, status)."""

    def __init__(self, url: str, payload: tuple[str, bytes]):
        self.url, self.payload = url, payload
        self.events: list[tuple[float, str, int | str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post, daemon=True),
                         threading.Thread(target=self._ready, daemon=True)]

    def _post(self) -> None:
        import httpx

        with httpx.Client(timeout=120) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    r = c.post(f"{self.url}/predict", files={"video": (*self.payload, "video/mp4")})
                    status: int | str = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.events.append((t, "predict", status))
                self._stop.wait(PROBE_EVERY_S)

    def _ready(self) -> None:
        import httpx

        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status: int | str = httpx.get(f"{self.url}/readyz", timeout=10).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            self.events.append((t, "readyz", status))
            self._stop.wait(0.1)

    def first(self, what: str, after: float, status: int, before: float = float("inf")) -> float | None:
        ts = [t for t, w, s in self.events if w == what and s == status and after <= t < before]
        return min(ts) if ts else None

    def __enter__(self) -> Probe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=130)


def one_kill(bundle: Path, corpus: Path, args: argparse.Namespace, work: Path, n: int) -> dict:
    from clients.output import read_results
    from clients.score import ScoreOptions, Stop, run_score

    server = Server(bundle, {"DIMML_RETRY_AFTER_S": str(args.retry_after)}, work, f"kill{n}").start()
    with server:
        probe_clip = next(corpus.rglob("*.mp4"))
        out = work / f"kill{n}.csv"
        opts = ScoreOptions(inputs=[str(corpus)], out=out, server=server.url, recursive=True, workers=args.clients,
                            overwrite=True, progress=False)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(summary=run_score(opts, Stop())))
        [victim] = [pid for pid, role in roles(server.proc.pid).items() if role == "inference"]
        with Probe(server.url, (probe_clip.name, probe_clip.read_bytes())) as probe:
            t_start = time.monotonic()
            runner.start()
            while not (out.exists() and out.read_bytes().count(b"\n") > args.kill_after):
                if not runner.is_alive():
                    raise RuntimeError("the scoring run ended before the kill")
                time.sleep(0.01)
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            runner.join(timeout=600)
            t_end = time.monotonic()
            while probe.first("readyz", t_kill, 200) is None and time.monotonic() - t_kill < 120:
                time.sleep(0.2)
        counts = status_counts(server.url)
    summary = result["summary"]
    rows = read_results(out)
    files = {p.relative_to(corpus).as_posix() for p in corpus.rglob("*.mp4")}
    first_503 = probe.first("predict", t_kill, 503)
    first_200 = probe.first("predict", first_503 or t_kill, 200)
    not_ready = probe.first("readyz", t_kill, 503)
    ready = probe.first("readyz", not_ready or t_kill, 200)
    since = lambda t: None if t is None else round(t - t_kill, 2)
    return {"kill_after_rows": args.kill_after, "run_s": round(t_end - t_start, 1),
            "first_503_s": since(first_503), "first_200_after_s": since(first_200),
            "not_ready_s": since(not_ready), "ready_again_s": since(ready),
            "predict_status": dict(counts), "rows": len(rows), "row_errors": sum(bool(r["error"]) for r in rows),
            "rows_lost": len(files - {r["path"] for r in rows}), "run_complete": summary.complete,
            "probe_status": dict(Counter(s for _, w, s in probe.events if w == "predict"))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=3, help="servers started, one kill each (%(default)s)")
    p.add_argument("--files", type=int, default=200, help="files the scoring run sends (%(default)s)")
    p.add_argument("--clients", type=int, default=4, help="the scoring run's concurrent requests (%(default)s)")
    p.add_argument("--kill-after", type=int, default=40, help="rows written before the kill (%(default)s)")
    p.add_argument("--retry-after", type=int, default=1, help="DIMML_RETRY_AFTER_S (%(default)s)")
    p.add_argument("--work", type=Path, help="folder for the bundle, corpus, logs; reused (default: temporary)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimml-bench-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    kills = []
    loads = []
    try:
        bundle = make_bundle("tiny", work)
        corpus = make_corpus(SOAK_CLIP, args.files, min(24, args.files), work)
        for n in range(args.kills):
            loads.append(round(os.getloadavg()[0], 1))
            kills.append(one_kill(bundle, corpus, args, work, n))
            log(f"kill {n + 1}: {kills[-1]}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "files": args.files, "clients": args.clients, "kills": kills, "load_avg": loads}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"\n## Inference worker SIGKILLed during a scoring run over HTTP ({result['date']})\n")
    print(f"machine: {result['machine']}; {args.files} files, {args.clients} concurrent requests, kill after "
          f"{args.kill_after} rows; load average at each start: {loads}\n")
    print("| kill | first 503 (s after kill) | first 200 again | /readyz 503 / 200 again | /predict answers by status "
          "| rows / errors / lost | run s |")
    print("| ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for i, k in enumerate(kills, 1):
        print(f"| {i} | {k['first_503_s']} | {k['first_200_after_s']} | {k['not_ready_s']} / {k['ready_again_s']} "
              f"| {k['predict_status']} | {k['rows']} / {k['row_errors']} / {k['rows_lost']} | {k['run_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

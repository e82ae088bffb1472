"""Soak: the service's memory per worker under a steady load, over tens of minutes.

    .venv/bin/python benchmarks/bench_soak.py --minutes 30 --clients 8 --json soak.json --png soak.png
    .venv/bin/python benchmarks/bench_soak.py --minutes 12 --probe /tmp/probe      # where memory goes
    .venv/bin/python benchmarks/bench_soak.py --minutes 12 --env MALLOC_ARENA_MAX=2

Starts `bentoml serve serving.service:DIMML` (bench_serving.Server) on a tiny bundle with random
weights, then --clients threads post a 3 s clip (synth, 128x96 15 fps, as the issue's soak) to
/predict in a closed loop (each client sends its next request when the last is answered: the
load runs at the service's throughput) for --minutes. Every --sample-s seconds it records each
server process's RSS by role (api = the DIMML entry worker(s), inference = DIMMLInference, arbiter
= bentoml serve itself), the requests answered so far and the load average. Reported: requests by
status, clips/s, each worker's RSS at the start, the middle and the end, and its slope over the
second half (least squares, MiB per minute); the figures go to --json, the curves to --png.

--probe DIR serves benchmarks/memprobe.py instead (the same service plus a memory probe in each
worker: tracemalloc, glibc malloc statistics, top growing allocation sites; see that file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_serving: shared set-up helpers
from bench_serving import REPO, ClipShape, Server, log, machine, make_bundle, make_clips  # noqa: E402

SOAK_CLIP = ClipShape(duration_s=3.0)   # the tiny preset's synth clip shape, 3 s long
MIB = 2**20


def roles(server_pid: int) -> dict[int, str]:
    """pid -> role of the server's processes (api, inference, arbiter)."""
    import psutil

    out = {}
    try:
        root = psutil.Process(server_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        out[p.pid] = ("inference" if "--service-name DIMMLInference" in cmd else
                      "api" if "--service-name" in cmd else "arbiter")
    return out


def rss_mib(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.NoSuchProcess:
        return None


class Load:
    """`clients` threads posting /predict back to back until stopped; counts answers by status."""

    def __init__(self, url: str, payloads: list[tuple[str, bytes]], clients: int):
        self.url, self.payloads, self.clients = url, payloads, clients
        self.status: Counter = Counter()
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(clients)]

    def _worker(self, i: int) -> None:
        import httpx

        n = i
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                name, data = self.payloads[n % len(self.payloads)]
                n += self.clients
                try:
                    r = client.post(f"{self.url}/predict", files={"video": (name, data, "video/mp4")})
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                with self._lock:
                    self.status[key] += 1
                    self.done += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)


def slope_mib_per_min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of y (MiB) over t (s), in MiB per minute."""
    if len(ts) < 3:
        return float("nan")
    return float(np.polyfit(np.asarray(ts) / 60.0, np.asarray(ys), 1)[0])


def summarise(samples: list[dict], minutes: float) -> dict[str, dict]:
    """Per worker (role#n): RSS at start / middle / end and the slope over the second half."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for s in samples:
        for name, mib in s["rss"].items():
            series.setdefault(name, ([], []))
            series[name][0].append(s["t"])
            series[name][1].append(mib)
    half = minutes * 60 / 2
    out = {}
    for name, (ts, ys) in sorted(series.items()):
        second = [(t, y) for t, y in zip(ts, ys) if t >= half]
        mid = min(range(len(ts)), key=lambda i: abs(ts[i] - half))
        out[name] = {"start_mib": round(ys[0], 1), "middle_mib": round(ys[mid], 1), "end_mib": round(ys[-1], 1),
                     "max_mib": round(max(ys), 1),
                     "slope_second_half_mib_per_min": round(slope_mib_per_min(*zip(*second)) if second else float("nan"), 3),
                     "slope_whole_mib_per_min": round(slope_mib_per_min(ts, ys), 3)}
    return out


def plot(samples: list[dict], summary: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    for name in summary:
        pts = [(s["t"] / 60, s["rss"][name]) for s in samples if name in s["rss"]]
        ax.plot(*zip(*pts), label=f"{name} ({summary[name]['slope_second_half_mib_per_min']:+.2f} MiB/min, 2nd half)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="load duration (%(default)s)")
    p.add_argument("--clients", type=int, default=8, help="client threads, closed loop (%(default)s)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples (%(default)s)")
    p.add_argument("--bundle", type=Path, help="serve this bundle (default: a tiny one with random weights)")
    p.add_argument("--num-clips", type=int, default=8, help="distinct 3 s synth clips, sent round-robin")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra server environment, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    p.add_argument("--probe", type=Path, metavar="DIR", help="serve benchmarks.memprobe (memory probe) writing to DIR")
    p.add_argument("--probe-every-s", type=float, default=30.0)
    p.add_argument("--work", type=Path, help="folder for the bundle, clips, logs; reused (default: temporary)")
    p.add_argument("--json", type=Path, help="write samples and figures here")
    p.add_argument("--png", type=Path, help="plot RSS per worker over time here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimml-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    service = "serving.service:DIMML"
    if args.probe:
        service = "benchmarks.memprobe:DIMML"
        env.update(DIMML_MEMPROBE_DIR=str(args.probe.resolve()), DIMML_MEMPROBE_S=str(args.probe_every_s),
                   DIMML_MEMPROBE_DIFF_AT=str(args.minutes * 60 / 2),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        bundle = args.bundle or make_bundle("tiny", work)
        files = make_clips(SOAK_CLIP, args.num_clips, work)
        payloads = [(f.name, f.read_bytes()) for f in files]
        server = Server(bundle, env, work, "soak", service).start()
        samples: list[dict] = []
        with server:
            log(f"ready in {server.ready_s:.1f} s at {server.url}; warming up")
            with Load(server.url, payloads, args.clients) as warm:
                while warm.done < 4 * args.clients:
                    time.sleep(0.2)
            who = roles(server.proc.pid)
            counts: Counter = Counter()
            names = {}
            for pid, role in sorted(who.items()):
                names[pid] = f"{role}#{counts[role]}" if role != "arbiter" else role
                counts[role] += 1
            log(f"workers: {names}; load for {args.minutes:g} min with {args.clients} clients")
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            with Load(server.url, payloads, args.clients) as load:
                while True:
                    now = time.monotonic()
                    rss = {names[pid]: m for pid in names if (m := rss_mib(pid)) is not None}
                    samples.append({"t": round(now - t0, 1), "done": load.done, "rss": rss,
                                    "load1": os.getloadavg()[0]})
                    if len(samples) % max(1, int(60 / args.sample_s)) == 1:
                        log(f"{(now - t0) / 60:5.1f} min: {load.done} answered ({dict(load.status)}), "
                            + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()) + f", load {os.getloadavg()[0]:.1f}")
                    if now >= end:
                        break
                    time.sleep(min(args.sample_s, max(0.0, end - now)))
                wall = time.monotonic() - t0
                status = dict(load.status)
                done = load.done
            exceptions = dict(server.exceptions())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(samples, args.minutes)
    loads = [s["load1"] for s in samples]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "minutes": args.minutes, "clients": args.clients, "env": env, "service": service,
              "requests": done, "status": status, "clips_per_s": round(done / wall, 2),
              "load_avg_mean": round(float(np.mean(loads)), 2), "load_avg_max": round(max(loads), 2),
              "workers": summary, "server_exceptions": exceptions, "samples": samples}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.png:
        plot(samples, summary, f"{args.clients} clients, {args.minutes:g} min, {result['clips_per_s']} clips/s, "
                               f"load avg {result['load_avg_mean']}", args.png)
    print(f"\n## Soak ({result['date']}): {args.minutes:g} min, {args.clients} clients, env {env or '-'}\n")
    print(f"machine: {result['machine']}")
    print(f"requests: {done} ({status}), {result['clips_per_s']} clips/s, load average mean "
          f"{result['load_avg_mean']} (max {result['load_avg_max']})\n")
    print("| worker | start MiB | middle MiB | end MiB | slope 2nd half MiB/min | slope whole MiB/min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, w in summary.items():
        print(f"| {name} | {w['start_mib']} | {w['middle_mib']} | {w['end_mib']} | "
              f"{w['slope_second_half_mib_per_min']:+.3f} | {w['slope_whole_mib_per_min']:+.3f} |")
    if exceptions:
        print(f"\nserver log exceptions: {exceptions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray scoring against local scoring: `dimml score --engine ray` vs in-process, same machine, same files.

    .venv/bin/python benchmarks/bench_ray_scoring.py                          # tiny, 400 files, 2 rounds
    .venv/bin/python benchmarks/bench_ray_scoring.py --files 200 --rounds 1 --work /tmp/bench-ray

Runs `python -m clients score CORPUS -r --bundle B --out X.csv` as a user does, alternately local
(--workers W decode threads, one process) and with --engine ray (a local Ray started by the command:
--actors actors of --cpus-per-actor CPUs, each holding the model), --rounds times each, on the same
corpus (copies of synth clips, class folders; made as bench_scoring.py makes them). Reported per
engine: the steady files/s (rows in --out sampled every --sample-s: from the first row to the
last, start-up excluded: what a long run gets), its own files/s (the summary line: from the
scorer's start, for Ray its start and its actors' included, to the last row), the wall time of
the whole command (interpreter, Ray start, model load),
and the memory of the command's process tree, sampled every --sample-s s: peak RSS summed over its
processes and peak USS summed (memory no other process shares: the Ray object store's shared
pages are counted once in RSS of each process mapping them, not at all in USS). The ratio Ray / local
is taken from the same rounds. The two engines' rows are compared cell by cell (they must be equal).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import SUMMARY, make_corpus  # noqa: E402

from bench_serving import PRESET_CLIPS, REPO, log, machine, make_bundle  # noqa: E402

MIB = 2**20


class TreeMemory:
    """Peak summed RSS and USS of a process and its descendants, sampled in a thread, and the rows of
    its --out over time (the steady rate: first row to last, start-up excluded)."""

    def __init__(self, pid: int, every_s: float, out: Path):
        self.pid, self.every_s, self.out = pid, every_s, out
        self.peak_rss = self.peak_uss = 0.0
        self.peak_procs = 0
        self.rows: list[tuple[float, int]] = []   # (time, rows in --out)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = uss = 0
            for p in procs:
                try:
                    m = p.memory_full_info()
                    rss, uss = rss + m.rss, uss + m.uss
                except psutil.Error:
                    pass
            self.peak_rss, self.peak_uss = max(self.peak_rss, rss / MIB), max(self.peak_uss, uss / MIB)
            self.peak_procs = max(self.peak_procs, len(procs))
            try:
                self.rows.append((time.perf_counter(), max(0, self.out.read_bytes().count(b"\n") - 1)))
            except OSError:
                pass
            self._stop.wait(self.every_s)

    def steady_rate(self) -> float:
        """Rows per second from the first sample with a row to the first with them all (start-up and
        shut-down excluded)."""
        seen = [(t, n) for t, n in self.rows if n > 0]
        if len(seen) < 2:
            return float("nan")
        last = max(n for _, n in seen)
        t_end = min(t for t, n in seen if n == last)
        return (last - seen[0][1]) / (t_end - seen[0][0]) if t_end > seen[0][0] else float("nan")

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def score(corpus: Path, bundle: Path, out: Path, extra: list[str], sample_s: float) -> dict:
    """One `python -m clients score` run: its files/s, wall time, peak memory."""
    cmd = [sys.executable, "-m", "clients", "score", str(corpus), "-r", "--bundle", str(bundle), "--out", str(out),
           "--overwrite", "--no-progress", *extra]
    out.unlink(missing_ok=True)   # the rows counted are this run's
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})   # a Ray of its own, as a user's first run
    with TreeMemory(proc.pid, sample_s, out) as mem:
        stdout, stderr = proc.communicate(timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr[-3000:]}")
    m = SUMMARY.search(stdout)
    return {"files_per_s": float(m.group(3)), "steady_files_per_s": round(mem.steady_rate(), 1),
            "files": int(m.group(1)), "wall_s": round(wall, 1),
            "peak_rss_mib": round(mem.peak_rss), "peak_uss_mib": round(mem.peak_uss), "processes": mem.peak_procs,
            "failed": int(re.search(r"(\d+) failed", stdout).group(1))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="bundle preset, random weights (%(default)s)")
    p.add_argument("--bundle", type=Path, help="score with this bundle instead")
    p.add_argument("--files", type=int, default=400, help="corpus size (%(default)s)")
    p.add_argument("--unique", type=int, default=24, help="distinct synth clips (%(default)s)")
    p.add_argument("--workers", type=int, default=2, help="local: decode threads (%(default)s)")
    p.add_argument("--actors", type=int, default=0, help="ray: actors (default: the CPUs / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="ray: CPUs per actor (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per inference batch, both engines")
    p.add_argument("--rounds", type=int, default=2, help="local and ray runs each, alternating (%(default)s)")
    p.add_argument("--sample-s", type=float, default=0.5, help="memory sampling period (%(default)s s)")
    p.add_argument("--work", type=Path, help="folder for the bundle, corpus, outputs; reused (default: temporary)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    from clients.output import read_results

    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimml-bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    loads: list[float] = []
    try:
        bundle = args.bundle or make_bundle(args.preset, work)
        corpus = make_corpus(PRESET_CLIPS.get(args.preset, PRESET_CLIPS["tiny"]), args.files,
                             min(args.unique, args.files), work)
        engines = {"local": ["--workers", str(args.workers), "--batch-size", str(args.batch_size)],
                   "ray": ["--engine", "ray", "--shard-rows", "0", "--cpus-per-actor", str(args.cpus_per_actor),
                           "--batch-size", str(args.batch_size), *(["--actors", str(args.actors)] if args.actors else [])]}
        for r in range(args.rounds):
            for name, extra in engines.items():
                loads.append(os.getloadavg()[0])
                res = score(corpus, bundle, work / f"{name}.csv", extra, args.sample_s)
                runs[name].append(res)
                log(f"round {r + 1} {name}: {res['files_per_s']:.1f} files/s, {res['wall_s']} s wall, peak RSS "
                    f"{res['peak_rss_mib']} MiB / USS {res['peak_uss_mib']} MiB in {res['processes']} processes, "
                    f"load {loads[-1]:.1f}")
        local = {x["path"]: x for x in read_results(work / "local.csv")}
        ray = {x["path"]: x for x in read_results(work / "ray.csv")}
        same = local.keys() == ray.keys() and all(local[k] == ray[k] for k in local)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    keys = ("files_per_s", "steady_files_per_s", "wall_s", "peak_rss_mib", "peak_uss_mib")
    med = {name: {k: statistics.median(x[k] for x in rs) for k in keys} for name, rs in runs.items()}
    ratio = med["ray"]["files_per_s"] / med["local"]["files_per_s"]
    steady = med["ray"]["steady_files_per_s"] / med["local"]["steady_files_per_s"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "files": args.files, "rounds": args.rounds, "engines": engines, "runs": runs, "median": med,
              "ray_over_local_files_per_s": round(ratio, 3), "ray_over_local_steady": round(steady, 3),
              "rows_identical": same,
              "load_avg": [round(x, 1) for x in loads]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"\n## Ray vs local scoring ({result['date']}): {args.files} files, {args.rounds} round(s) each\n")
    print(f"machine: {result['machine']}; load average at each run's start: {result['load_avg']}")
    print(f"local: {' '.join(engines['local'])}; ray: {' '.join(engines['ray'])}\n")
    print("| engine | steady files/s (each round) | files/s from the scorer's start | wall s incl. start-up "
          "| peak RSS MiB (tree) | peak USS MiB (tree) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in runs.items():
        each = ", ".join(format(x["steady_files_per_s"], ".1f") for x in rs)
        m = med[name]
        print(f"| {name} | {m['steady_files_per_s']:.1f} ({each}) | {m['files_per_s']:.1f} | {m['wall_s']:.1f} "
              f"| {m['peak_rss_mib']:.0f} | {m['peak_uss_mib']:.0f} |")
    print(f"\nray / local: steady {steady:.2f}, from the scorer's start {ratio:.2f}; rows identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

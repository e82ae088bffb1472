"""Wall time of the two-node test run (tests/test_nodes.py's config, two torchrun agents on this
machine) against one process training the same config, measured in one run.

    .venv/bin/python benchmarks/bench_nodes.py [--reps 3] [--work DIR] [--json out.json]

Writes the test's corpus (2 classes x 6 one-second clips) and a copy for the second node,
prebuilds every cache with `dimml cache` (so only training is timed), then runs, per rep in rotating order:
one process with one thread (OMP_NUM_THREADS=1, as each node's process in the test), one process
with torch's default threads, and the two nodes (one process of one thread each). Each time is
the wall from launch to exit of every process (imports, rendezvous, training, evaluation); the
epochs' own seconds (RUN/metrics.csv time_s: training steps and validation) are reported beside.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torchrun_nodes as nodes  # noqa: E402  (tests/: the launcher the test uses)
from test_nodes import FIT  # noqa: E402  (the test's training options)

from conftest import free_port  # noqa: E402


def epoch_seconds(run: Path) -> float:
    """The run's training epochs (each with its validation pass), summed from RUN/metrics.csv."""
    with open(run / "metrics.csv") as f:
        return sum(float(r["time_s"]) for r in csv.DictReader(f))


def one_process(data: Path, out: Path, cache: Path, threads: int | None) -> tuple[float, float]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "training", "fit", "--data", str(data), "--out", str(out),
                    "--cache-dir", str(cache), "--force", *FIT], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return time.monotonic() - t0, epoch_seconds(out)


def two_nodes(work: Path, rep: int) -> tuple[float, float]:
    node = [nodes.Node(work / "data0", work / f"run-nodes{rep}-0", work / "cache0"),
            nodes.Node(work / "data1", work / f"run-nodes{rep}-1", work / "cache1", cache_env=True)]
    t0 = time.monotonic()
    procs = nodes.start(node, free_port(), FIT, work / f"logs{rep}")
    codes = nodes.wait(procs, 600)
    wall = time.monotonic() - t0
    if codes != [0, 0]:
        raise SystemExit(f"two-node run failed {codes}:\n{nodes.logs_text(work / f'logs{rep}', 2)}")
    return wall, epoch_seconds(node[0].out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from training.synth import SynthConfig, synthesize

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    synthesize(work / "data0", SynthConfig(classes=2, per_class=6, duration_s=1.0), workers=1, progress=False)
    shutil.copytree(work / "data0", work / "data1", dirs_exist_ok=True)
    for i in (0, 1):
        subprocess.run([sys.executable, "-m", "training", "cache", "--data", str(work / f"data{i}"),
                        "--cache-dir", str(work / f"cache{i}"), *FIT], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    load_before = os.getloadavg()
    runs = {"one process, 1 thread": lambda rep: one_process(work / "data0", work / "run-one1", work / "cache0", 1),
            "one process, default threads": lambda rep: one_process(work / "data0", work / "run-oneN",
                                                                    work / "cache0", None),
            "two nodes, 1 process x 1 thread each": lambda rep: two_nodes(work, rep)}
    order = list(runs)
    walls: dict[str, list[float]] = {k: [] for k in runs}
    epochs: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps):
        for name in order[rep % 3:] + order[:rep % 3]:   # rotated: load that drifts does not favour one
            wall, ep = runs[name](rep)
            walls[name].append(wall)
            epochs[name].append(ep)
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    load_after = os.getloadavg()
    median = {k: statistics.median(v) for k, v in walls.items()}
    median_epochs = {k: statistics.median(v) for k, v in epochs.items()}
    base, base_epochs = median["one process, 1 thread"], median_epochs["one process, 1 thread"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "python": platform.python_version(), "fit_args": FIT,
              "load_average_before": load_before, "load_average_after": load_after, "wall_s": walls,
              "epochs_s": epochs, "median_wall_s": median, "median_epochs_s": median_epochs,
              "wall_ratio_to_one_process_1_thread": {k: v / base for k, v in median.items()}}
    print("| run | wall s, median | wall s, all | wall ratio | epochs s, median | epochs ratio |\n"
          "| --- | ---: | --- | ---: | ---: | ---: |")
    for k, v in walls.items():
        print(f"| {k} | {median[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {median[k] / base:.2f} | "
              f"{median_epochs[k]:.1f} | {median_epochs[k] / base_epochs:.2f} |")
    print(f"load average before {load_before}, after {load_after}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

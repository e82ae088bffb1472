"""Batch scoring throughput: `python -m clients score --bundle` against decoding alone, same files and threads.

    .venv/bin/python benchmarks/bench_scoring.py                    # tiny + resnet18, workers 1 and 2, ~4 min
    .venv/bin/python benchmarks/bench_scoring.py --presets tiny --workers 2 --files 200
    .venv/bin/python benchmarks/bench_scoring.py --bundle bundles/tiny --data data/synth --workers 1,2

Per bundle and worker count W, on the same corpus:
  decode-only     every file through LocalScorer's own decode call (dimml.media.decode_clip with the
                  bundle's preprocessing) in a ThreadPoolExecutor(W), as clients/score.py runs it;
  inference-only  the decoded clips through Predictor.predict_clips in --batch-size batches;
  score           `python -m clients score CORPUS -r --bundle B --out X.csv --workers W` as a user runs
                  it: its own figure (timed inside, from after the model is loaded to the last row)
                  and the wall time of the whole command (interpreter start-up and model load too).
score / decode-only is the share of the decode rate that scoring keeps (target >= 0.8); the
"serial" figure 1 / (1/decode + 1/inference) is what decoding then inferring each batch in turn,
each at its measured rate, would give when both need the same cores.

Without --bundle, bundles with random weights (speed does not depend on them) and corpora are
made as bench_serving.py makes them: `tiny` on synth-default clips (128x96 15 fps 2 s), `resnet18`
on production-shaped clips (480x360 30 fps 3 s -> 3 s audio + 3 frames 224x224). A corpus holds
--unique distinct synth clips copied to --files files (class sub-folders): decoding a copy costs
what decoding another clip of the same shape costs, and writing hundreds of 480x360 synth clips
would take minutes. Measurements during which other processes used more than --busy-cores are
repeated (up to --tries); the CPU they used is reported.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_serving: shared set-up helpers
from bench_serving import (  # noqa: E402
    PRESET_CLIPS,
    REPO,
    ClipShape,
    _ints,
    bundle_preset,
    log,
    machine,
    make_bundle,
    make_clips,
    measure_quietly,
)

PRESET_FILES = {"tiny": 200, "resnet18": 64}   # default corpus size: resnet18 scores ~5 clips/s on 2 cores
SUMMARY = re.compile(r"scored (\d+) file\(s\) .* in ([\d.]+) s \(([\d.]+) files/s\)")


def make_corpus(shape: ClipShape, files: int, unique: int, work: Path) -> Path:
    """`files` media files in class sub-folders, copies of `unique` synth clips (reused if present)."""
    out = work / "corpora" / f"{shape.key}_u{unique}_n{files}"
    done = out / ".complete"
    if done.is_file():
        return out
    clips = make_clips(shape, unique, work)
    shutil.rmtree(out, ignore_errors=True)
    for i in range(files):
        src = clips[i % len(clips)]
        dst = out / src.parent.name / f"{i:05d}{src.suffix}"   # synth's class folder keeps the label
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    done.write_text("")
    return out


@dataclass
class Row:
    """One (bundle, workers) measurement."""

    label: str
    workers: int
    files: int
    decode_fps: float = 0.0          # files/s, decoding only
    infer_fps: float = 0.0           # clips/s, inference only (already decoded)
    score_fps: float = 0.0           # files/s, the CLI's own figure (model loaded, before the first file)
    score_wall_s: float = 0.0        # the whole CLI command
    failed: int = 0                  # rows with an error in the CLI's output
    cpu: dict[str, dict] = field(default_factory=dict)   # measurement -> CpuMonitor summary (median run)
    runs: dict[str, list] = field(default_factory=dict)  # measurement -> every run's rate, sorted

    @property
    def serial_fps(self) -> float:
        return 1 / (1 / self.decode_fps + 1 / self.infer_fps) if self.decode_fps and self.infer_fps else 0.0

    @property
    def ratio(self) -> float:
        return self.score_fps / self.decode_fps if self.decode_fps else 0.0


def decode_only(scorer, jobs, workers: int) -> tuple[float, list]:
    """Decode every job as LocalScorer does (its own _decode, a pool of `workers` threads): (s, clips)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        clips = list(pool.map(scorer._decode, jobs))
    return time.perf_counter() - t0, clips


def inference_only(predictor, clips: list, batch_size: int) -> float:
    """Seconds to answer already-decoded clips in batches, as LocalScorer batches them."""
    predictor.predict_clips(clips[:batch_size])   # warm-up: first-run allocations
    t0 = time.perf_counter()
    for i in range(0, len(clips), batch_size):
        predictor.predict_clips(clips[i:i + batch_size])
    return time.perf_counter() - t0


def score_cli(corpus: Path, bundle: Path, workers: int, batch_size: int, out: Path) -> tuple[float, float, int, int]:
    """`python -m clients score` as a user runs it: (its own files/s, wall s, files scored, failed rows)."""
    cmd = [sys.executable, "-m", "clients", "score", str(corpus), "--bundle", str(bundle), "--out", str(out),
           "--recursive", "--workers", str(workers), "--batch-size", str(batch_size), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    m = SUMMARY.search(r.stdout)
    if not m:
        raise RuntimeError(f"no summary line in the score output:\n{r.stdout[-2000:]}")
    failed = int(re.search(r"(\d+) failed", r.stdout).group(1))
    return float(m.group(3)), wall, int(m.group(1)), failed


def bench(label: str, bundle: Path, corpus: Path, workers: list[int], args: argparse.Namespace,
          work: Path) -> list[Row]:
    """Per worker count: --repeat rounds of decode-only, inference-only, score (interleaved, so a
    drift in machine speed hits all three alike); each figure is the median round's."""
    from clients.inputs import find_jobs
    from clients.score import LocalScorer

    jobs = find_jobs([str(corpus)], recursive=True)
    quiet = partial(measure_quietly, pids=None, busy_cores=args.busy_cores, tries=args.tries)
    rows = []
    for w in workers:
        row = Row(label, w, len(jobs))
        scorer = LocalScorer(str(bundle), workers=w, batch_size=args.batch_size)
        out = work / f"scores-{label}-w{w}.csv"
        runs: dict[str, list[tuple[float, dict, object]]] = {"decode": [], "inference": [], "score": []}
        for _ in range(args.repeat):
            (dt, clips), cpu = quiet(partial(decode_only, scorer, jobs, w))
            runs["decode"].append((len(jobs) / dt, cpu, None))
            if not args.skip_inference:
                dt, cpu = quiet(partial(inference_only, scorer.predictor, clips, args.batch_size))
                runs["inference"].append((len(clips) / dt, cpu, None))
            clips = None   # free the decoded arrays before the CLI runs
            (fps, wall, n, failed), cpu = quiet(partial(score_cli, corpus, bundle, w, args.batch_size, out))
            if n != len(jobs):
                raise RuntimeError(f"score wrote {n} rows for {len(jobs)} files")
            runs["score"].append((fps, cpu, (wall, failed)))
            log(f"{label} workers={w}: decode-only {runs['decode'][-1][0]:.1f} files/s, inference-only "
                f"{runs['inference'][-1][0] if runs['inference'] else 0:.1f} clips/s, score {fps:.1f} files/s "
                f"({len(jobs) / wall:.1f} with start-up, {wall:.1f} s)")
        scorer = None   # its engine's memory, before the next worker count loads another
        for name, rs in runs.items():
            if rs:
                rs.sort(key=lambda r: r[0])
                rate, row.cpu[name], extra = rs[len(rs) // 2]
                row.runs[name] = [round(r[0], 1) for r in rs]
                setattr(row, {"decode": "decode_fps", "inference": "infer_fps", "score": "score_fps"}[name], rate)
                if name == "score":
                    row.score_wall_s, row.failed = round(extra[0], 2), extra[1]
        log(f"{label} workers={w}: score is {row.ratio:.0%} of decode-only (medians)")
        rows.append(row)
    return rows


def _f(x: float, fmt: str = ".1f") -> str:
    return format(x, fmt) if x else "-"


def table(rows: list[Row]) -> str:
    lines = ["| bundle | files | workers | decode-only files/s | inference-only clips/s | serial bound files/s "
             "| score files/s | score / decode-only | score incl. start-up (wall s) | other CPU max (cores) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    spread = lambda r, k: f" ({r.runs[k][0]:g}-{r.runs[k][-1]:g})" if len(r.runs.get(k, [])) > 1 else ""
    for r in rows:
        other = max(c["other_cores"] for c in r.cpu.values())
        lines.append(f"| {r.label} | {r.files} | {r.workers} | {_f(r.decode_fps)}{spread(r, 'decode')} "
                     f"| {_f(r.infer_fps)}{spread(r, 'inference')} "
                     f"| {_f(r.serial_fps)} | {_f(r.score_fps)}{spread(r, 'score')}"
                     f"{f' ({r.failed} failed)' if r.failed else ''} "
                     f"| {r.ratio:.2f} | {r.files / r.score_wall_s:.1f} ({r.score_wall_s:.1f} s) | {other:.2f} |")
    return "\n".join(lines)


def load_table(rows: list[Row]) -> str:
    lines = ["| bundle | workers | measurement | our CPU (cores) | other CPU (cores) | load before / after | tries |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for name, c in r.cpu.items():
            lines.append(f"| {r.label} | {r.workers} | {name} | {c['ours_cores']:.2f} | {c['other_cores']:.2f} "
                         f"| {c['load_before']:.2f} / {c['load_after']:.2f} | {c['tries']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="measure this bundle folder instead of making --presets bundles")
    p.add_argument("--data", type=Path, help="score this folder (a layout `clients score` reads) instead of a synth corpus")
    p.add_argument("--presets", default="tiny,resnet18", help="bundles to make and measure (%(default)s)")
    p.add_argument("--workers", type=_ints, default=[1, 2], help="decode threads, comma-separated (1,2)")
    p.add_argument("--files", type=int, help="corpus size (default: 200 for tiny, 64 for resnet18)")
    p.add_argument("--unique", type=int, default=24, help="distinct synth clips in a corpus (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per inference batch, as score's (%(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of (decode-only, inference-only, score); medians are reported (%(default)s)")
    p.add_argument("--skip-inference", action="store_true", help="no inference-only measurement")
    p.add_argument("--busy-cores", type=float, default=0.3,
                   help="repeat a measurement when other processes used more CPU than this (%(default)s cores)")
    p.add_argument("--tries", type=int, default=3, help="attempts per measurement at most (%(default)s)")
    p.add_argument("--work", type=Path, help="folder for bundles, corpora, outputs; reused (default: temporary)")
    p.add_argument("--json", type=Path, help="also write all figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimml-bench-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows: list[Row] = []
    corpora: dict[str, str] = {}
    try:
        if args.bundle:
            targets = [(args.bundle.name, args.bundle, bundle_preset(args.bundle))]
        else:
            targets = [(p, make_bundle(p, work), p) for p in args.presets.split(",") if p.strip()]
        for label, bundle, preset in targets:
            if args.data:
                corpus, corpora[label] = args.data, str(args.data)
            else:
                shape = PRESET_CLIPS.get(preset or "resnet18", PRESET_CLIPS["resnet18"])
                files = args.files or PRESET_FILES.get(preset or "", 64)
                corpus = make_corpus(shape, files, min(args.unique, files), work)
                corpora[label] = f"{files} files ({min(args.unique, files)} distinct synth clips) {shape.describe()}"
            rows += bench(label, bundle, corpus, args.workers, args, work)
    finally:
        if args.json and rows:
            args.json.write_text(json.dumps({"machine": machine(), "rows": [
                {**asdict(r), "serial_fps": r.serial_fps, "ratio": r.ratio} for r in rows]}, indent=1))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n## Batch scoring: `python -m clients score --bundle` ({time.strftime('%Y-%m-%d')})\n")
    print(f"machine: {machine()}")
    print("corpora: " + "; ".join(f"{k}: {v}" for k, v in corpora.items()))
    print(f"batch size {args.batch_size}; median of {args.repeat} interleaved round(s), (min-max) when more than one; "
          f"total {time.monotonic() - t0:.0f} s\n")
    print(table(rows))
    print()
    print(load_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

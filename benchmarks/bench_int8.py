"""CPU inference, fp32 against int8, of one quantized bundle in one run: model time, local scoring, serving.

    .venv/bin/python benchmarks/bench_int8.py --work /tmp/bench-int8     # resnet18, random weights
    .venv/bin/python benchmarks/bench_int8.py --bundle BUNDLE --data DIR  # a quantized bundle of yours
    .venv/bin/python benchmarks/bench_int8.py --stages model,options      # model time only

Stages, in this order, each measuring fp32 and int8 of the same bundle (ONNX Runtime CPU) in
interleaved rounds (a drift of the machine's speed hits both alike; medians reported):
  model     decoded clips through Predictor.forward (every branch, fusion, the output rule) at
            batch 1 and --batch-size: ms per clip, with ONNX Runtime's intra-op threads at its
            default (the cores) and at 1;
  options   the same model call for what else the CPU path has: graph optimisation level
            (extended against all, the default), fp16 graphs (export.onnx_export.convert_fp16) on
            the CPU provider, and, where torch is installed, the torch programs in fp32 and under
            bf16 autocast (oneDNN uses AMX / AVX-512 BF16 where the CPU has them);
  scoring   decode-only files/s (the scorer's own decode call in a pool of --workers threads) and
            `python -m clients score --bundle B --precision P --workers W` (its own files/s),
            ratio to decode-only; plus the same scorer in process with ONNX Runtime's intra-op
            threads at its default and at 1, with CPU ms per file (decode-only's too), whose
            ratio is what a busy machine changes least;
  serving   `bentoml serve` with DIMML_PRECISION=fp32 and =int8, each with DIMML_INFER_THREADS at
            ONNX Runtime's default and at 1 (adaptive batching on), --clients
            client threads on /predict: clips/s, p50 / p99 latency, model ms per clip from /metrics,
            and decode-only clips/s of the server's decode call before the servers, as a ratio.

Without --bundle: a `resnet18` run with random weights (speed does not depend on them) whose data is
a corpus of production-shaped synth clips (480x360 30 fps 3 s h264/aac, as bench_serving.py), exported
by `python -m export bundle --quantize int8` (calibrated on its training clips). Random weights have no
accuracy to keep, so that bundle is exported with the check's tolerance off (--max-accuracy-drop 100
--min-agreement 0) and its recorded check is printed as such; accuracy figures need a trained run
(BENCHMARKS.md: the small preset on the competition corpus). The load average and the CPU other
processes took are printed with every figure; the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the other benchmarks' helpers
from bench_scoring import SUMMARY, make_corpus  # noqa: E402

from bench_serving import CLASSES, PRESET_CLIPS, REPO, SERVICE, bench_server, log, machine, make_clips, measure_quietly  # noqa: E402
from bench_serving import decode_only as serving_decode_only  # noqa: E402

PRECISIONS = ("fp32", "int8")
SERVERS = (("fp32", 0), ("int8", 0), ("fp32", 1), ("int8", 1))   # (DIMML_PRECISION, DIMML_INFER_THREADS)
STAGES = ("model", "options", "scoring", "serving")


def make_quantized_bundle(work: Path, clips: int, calibration: int) -> tuple[Path, Path]:
    """(bundle, its corpus): a random-weight resnet18 run over a synth corpus, exported with int8 (reused)."""
    out = work / "bundles" / "resnet18-int8"
    corpus = make_clips(PRESET_CLIPS["resnet18"], clips, work)[0].parents[1]   # synth's folder (manifest.csv)
    if (out / "manifest.json").is_file():
        return out, corpus
    import torch

    from dimml.modalities import preprocess_for
    from training.models import build_model, build_model_config
    from training.run import run_config_fields, save_run_model

    log(f"making a resnet18 bundle (random weights, fp32 + int8) in {out}")
    torch.manual_seed(0)
    pre = preprocess_for("resnet18", "audio,visual")
    cfg = build_model_config("resnet18", len(CLASSES), pre)
    run = work / "runs" / "resnet18-int8"
    save_run_model(run, {"method": "dimml", "train": {"data": str(corpus), "decode_workers": 2},
                         **run_config_fields(pre, cfg, CLASSES)}, build_model(cfg, pre))
    cmd = [sys.executable, "-m", "export", "bundle", "--run", str(run), "--out", str(out), "--name", "bench-resnet18",
           "--quantize", "int8", "--calibration-clips", str(calibration), "--max-accuracy-drop", "100",
           "--min-agreement", "0", "--quiet", "--force"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"export of the resnet18 bundle failed:\n{r.stderr[-3000:]}")
    log(f"exported in {time.monotonic() - t0:.0f} s: {r.stdout.strip()}")
    return out, corpus


def decoded(bundle: Path, files: list[Path]) -> list:
    from dimml.predict import Predictor

    p = Predictor(bundle, backend="onnxruntime-cpu", precision="fp32")
    return [p.decode({"video": f}) for f in files]


def _cpu_s() -> float:
    """CPU seconds of this process (all its threads) and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def model_ms(predictor, clips: list, batch: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per clip of Predictor.forward_clips over `clips` in batches (after a warm-up batch).
    CPU time counts every ONNX Runtime thread; it is what a busy machine changes least."""
    predictor.forward_clips(clips[:batch])
    t0, c0 = time.perf_counter(), _cpu_s()
    for i in range(0, len(clips), batch):
        predictor.forward_clips(clips[i:i + batch])
    return 1000 * (time.perf_counter() - t0) / len(clips), 1000 * (_cpu_s() - c0) / len(clips)


def interleaved(variants: dict[str, callable], rounds: int, busy: float, tries: int) -> dict[str, dict]:
    """Run every variant once per round, rounds times; a variant returns its figure, or (figure, CPU ms
    per item). {name: {"median", "runs", "cpu_ms" (of the median run), "cpu" (monitor)}}, quietest tries."""
    runs: dict[str, list] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            value, cpu = measure_quietly(fn, None, busy, tries)
            value, cpu_ms = value if isinstance(value, tuple) else (value, float("nan"))
            runs[name].append((value, cpu_ms, cpu))
    out = {}
    for name, rs in runs.items():
        rs.sort(key=lambda r: r[0])
        value, cpu_ms, cpu = rs[len(rs) // 2]
        out[name] = {"median": value, "cpu_ms": cpu_ms, "runs": [round(r[0], 2) for r in rs], "cpu": cpu}
    return out


def stage_model(bundle: Path, clips: list, args) -> dict:
    from dimml.engines import open_engine
    from dimml.predict import Predictor

    preds = {}
    for p in PRECISIONS:
        for threads in (None, 1):
            preds[(p, threads)] = Predictor(bundle, open_engine(bundle, "onnxruntime-cpu", precision=p, threads=threads),
                                            max_batch=args.batch_size)
    variants = {}
    for (p, threads), pred in preds.items():
        for b in (1, args.batch_size):
            name = f"{p} batch {b} threads {'default' if threads is None else threads}"
            variants[name] = (lambda pred=pred, b=b: model_ms(pred, clips, b))
    res = interleaved(variants, args.rounds, args.busy_cores, args.tries)
    for k, v in res.items():
        log(f"model {k}: {v['median']:.1f} ms/clip {v['runs']}, {v['cpu_ms']:.1f} CPU ms/clip")
    return res


class _Sessions:
    """A bundle's modules as raw ONNX Runtime sessions with given options (the `options` stage)."""

    def __init__(self, bundle, paths: dict[str, Path], level=None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if level is not None:
            opts.graph_optimization_level = level
        self.io = bundle.io
        self.names = bundle.modalities
        self.sessions = {m: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                         for m, p in paths.items()}

    def __call__(self, arrays: dict[str, np.ndarray]) -> None:
        feats = {}
        for m in self.names:
            feats[m] = self.sessions[m].run(None, {self.io[m][0][0]: arrays[m]})[0]
        self.sessions["fusion"].run(None, {f"{m}_features": feats[m] for m in self.names})


def stage_options(bundle_path: Path, clips: list, args, work: Path) -> dict:
    import onnx
    import onnxruntime as ort

    from dimml.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    b = args.batch_size
    arrays = {m: np.stack([c.arrays[m] for c in clips[:b]]) for m in bundle.modalities}
    paths = {p: {m: bundle.onnx_path(m, p) for m in bundle.modules} for p in PRECISIONS}
    L = ort.GraphOptimizationLevel
    runners = {f"{p} ORT_ENABLE_{lv}": _Sessions(bundle, paths[p], getattr(L, f"ORT_ENABLE_{lv}"))
               for p in PRECISIONS for lv in ("EXTENDED", "ALL")}
    try:
        from export.onnx_export import convert_fp16

        fp16 = {}
        for m in bundle.modules:
            fp16[m] = work / "fp16" / f"{m}.onnx"
            fp16[m].parent.mkdir(parents=True, exist_ok=True)
            onnx.save(convert_fp16(onnx.load(str(paths["fp32"][m]))), str(fp16[m]))
        runners["fp16 graphs (CPU provider)"] = _Sessions(bundle, fp16)
    except ImportError as e:
        log(f"options: no fp16 graphs ({e})")
    variants = {k: (lambda r=r: _timed(r, arrays)) for k, r in runners.items()}
    try:
        import torch

        from dimml.engines import TorchEngine

        te = TorchEngine(bundle, "cpu")

        def torch_run(dtype):
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    feats = [te.branch(m, arrays[m])[0] for m in bundle.modalities]
                    te.fusion(feats)
            return run

        variants["torch fp32"] = lambda: _timed(torch_run("fp32"), arrays, call=True)
        variants["torch bf16 autocast"] = lambda: _timed(torch_run("bf16"), arrays, call=True)
    except ImportError:
        log("options: torch is not installed; no torch rows")
    res = interleaved(variants, args.rounds, args.busy_cores, args.tries)
    for k, v in res.items():
        log(f"options {k}: {v['median']:.1f} ms/clip at batch {b} {v['runs']}, {v['cpu_ms']:.1f} CPU ms/clip")
    return res


def _timed(fn, arrays: dict[str, np.ndarray], call: bool = False, repeat: int = 2) -> tuple[float, float]:
    """(wall ms per clip, best of `repeat` calls; CPU ms per clip, their mean) of fn over one batch,
    after a warm-up call."""
    run = fn if call else (lambda: fn(arrays))
    run()
    n = len(next(iter(arrays.values())))
    best, c0 = float("inf"), _cpu_s()
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / n, 1000 * (_cpu_s() - c0) / (repeat * n)


def score_cli(corpus: Path, bundle: Path, precision: str, workers: int, batch: int, out: Path) -> float:
    """`python -m clients score` as a user runs it; its own files/s."""

    cmd = [sys.executable, "-m", "clients", "score", str(corpus), "--bundle", str(bundle), "--out", str(out),
           "--recursive", "--workers", str(workers), "--batch-size", str(batch), "--precision", precision,
           "--overwrite", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    m = SUMMARY.search(r.stdout)
    if not m or f"({precision})" not in r.stdout or " 0 failed" not in r.stdout:
        raise RuntimeError(f"unexpected score output:\n{r.stdout[-2000:]}")
    return float(m.group(3))


def score_in_process(corpus: Path, bundle: Path, precision: str, workers: int, batch: int, out: Path,
                     threads: int | None) -> tuple[float, float]:
    """clients.score.run_score with ONNX Runtime at `threads` intra-op threads (None: its default):
    (files/s, CPU ms per file of the whole process: decoding, inference, writing)."""
    from clients.score import LocalScorer, ScoreOptions, run_score
    from dimml.engines import open_engine
    from dimml.predict import Predictor

    scorer = LocalScorer(str(bundle), workers=workers, batch_size=batch, precision=precision)
    scorer.predictor = Predictor(bundle, open_engine(bundle, "onnxruntime-cpu", precision=precision, threads=threads),
                                 max_batch=batch)
    opts = ScoreOptions(inputs=[str(corpus)], out=out, bundle=str(bundle), workers=workers, recursive=True,
                        overwrite=True, batch_size=batch, precision=precision, progress=False)
    t0, c0 = time.perf_counter(), _cpu_s()
    s = run_score(opts, scorer=scorer)
    return s.scored / (time.perf_counter() - t0), 1000 * (_cpu_s() - c0) / s.scored


def stage_scoring(bundle: Path, corpus: Path, args, work: Path) -> dict:
    from clients.inputs import find_jobs
    from clients.score import LocalScorer

    jobs = find_jobs([str(corpus)], recursive=True)
    scorer = LocalScorer(str(bundle), workers=args.workers, batch_size=args.batch_size, precision="fp32")

    def decode() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), _cpu_s()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(scorer._decode, jobs))
        return len(jobs) / (time.perf_counter() - t0), 1000 * (_cpu_s() - c0) / len(jobs)

    variants = {"decode-only": decode}
    for p in PRECISIONS:
        variants[f"score {p} (CLI)"] = (lambda p=p: score_cli(corpus, bundle, p, args.workers, args.batch_size,
                                                              work / f"scores-{p}.csv"))
        for threads in (None, 1):
            variants[f"score {p} (in process, ORT threads {threads or 'default'})"] = (
                lambda p=p, t=threads: score_in_process(corpus, bundle, p, args.workers, args.batch_size,
                                                        work / f"scores-{p}-t{t}.csv", t))
    res = interleaved(variants, args.rounds, args.busy_cores, args.tries)
    base = res["decode-only"]["median"]
    for k, v in res.items():
        log(f"scoring {k}: {v['median']:.1f} files/s {v['runs']} = {v['median'] / base:.2f} x decode-only")
    return {"files": len(jobs), **res}


def stage_serving(bundle: Path, corpus: Path, args, work: Path) -> dict:
    files = sorted(corpus.rglob("*.mp4"))[:args.serve_clips]
    payloads = [(f.name, f.read_bytes()) for f in files]
    decode_cps, decode_cpu = serving_decode_only(files, bundle, os.cpu_count() or 1, args.decode_count)
    log(f"serving: decode-only {decode_cps:.1f} clips/s ({decode_cpu:.1f} CPU ms/clip)")
    ns = argparse.Namespace(concurrency=[args.clients], requests=args.requests, min_rounds=3, level_seconds=120.0,
                            busy_cores=args.busy_cores, tries=args.tries, warmup=8, service=SERVICE)
    out = {"decode_only_clips_per_s": decode_cps, "decode_only_cpu_ms": decode_cpu, "servers": {}}
    for p, threads in SERVERS:
        name = f"{p}, ORT threads {threads or 'default'}"
        env = {"DIMML_PRECISION": p, "DIMML_INFER_THREADS": str(threads)}
        run = bench_server(f"resnet18-{p}-t{threads}", "batched", bundle, payloads, env, ns, work)
        lv = run.levels[0]
        out["servers"][name] = {"clips_per_s": lv.clips_per_s, "p50_ms": lv.p50_ms, "p99_ms": lv.p99_ms,
                                "ok": lv.ok, "requests": lv.requests, "model_ms_per_clip": lv.infer_ms_per_clip,
                                "decode_ms": lv.decode_ms, "mean_batch": lv.mean_batch, "cpu": lv.cpu,
                                "ready_s": run.ready_s, "cpu_ms_per_clip": lv.cpu_ms_per_clip}
    after, _ = serving_decode_only(files, bundle, os.cpu_count() or 1, args.decode_count)
    out["decode_only_after_clips_per_s"] = after
    log(f"serving: decode-only {after:.1f} clips/s after the servers")
    return out


def report(results: dict, args) -> str:
    lines = [f"\n## fp32 / int8 on the CPU ({time.strftime('%Y-%m-%d %H:%M')})\n", f"machine: {machine()}",
             f"bundle: {results['bundle']}; int8 check recorded: {results['check']}",
             f"load average at start / end: {results['load_start']} / {results['load_end']}\n"]
    if "model" in results:
        lines += ["| model call (Predictor.forward_clips, all branches + fusion) | ms per clip | runs | CPU ms per clip "
                  "| other CPU (cores) |", "| --- | ---: | --- | ---: | ---: |"]
        lines += [f"| {k} | {v['median']:.1f} | {v['runs']} | {v['cpu_ms']:.1f} | {v['cpu']['other_cores']:.2f} |"
                  for k, v in results["model"].items()]
        m = results["model"]
        for b in (1, args.batch_size):
            for t in ("default", 1):
                f, i = m[f"fp32 batch {b} threads {t}"], m[f"int8 batch {b} threads {t}"]
                lines.append(f"\nbatch {b}, threads {t}: fp32 / int8 = {f['median'] / i['median']:.2f}x (wall), "
                             f"{f['cpu_ms'] / i['cpu_ms']:.2f}x (CPU)")
    if "options" in results:
        lines += ["", f"| variant (batch {args.batch_size}, ONNX Runtime threads default) | ms per clip | runs "
                  "| CPU ms per clip | other CPU (cores) |", "| --- | ---: | --- | ---: | ---: |"]
        lines += [f"| {k} | {v['median']:.1f} | {v['runs']} | {v['cpu_ms']:.1f} | {v['cpu']['other_cores']:.2f} |"
                  for k, v in results["options"].items()]
    if "scoring" in results:
        s = results["scoring"]
        base = s["decode-only"]["median"]
        base_cpu = s["decode-only"]["cpu_ms"]
        lines += ["", f"scoring {s['files']} files, {args.workers} workers, batch {args.batch_size} (CPU-bound ratio: "
                  "decode-only CPU ms / scoring CPU ms per file, the share of the decode rate scoring keeps when both "
                  "use every core):", "",
                  "| measurement | files/s | runs | / decode-only | CPU ms per file | CPU-bound ratio | other CPU (cores) |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['median']:.1f} | {v['runs']} | {v['median'] / base:.2f} | {v['cpu_ms']:.1f} | "
                  f"{base_cpu / v['cpu_ms']:.2f} | {v['cpu']['other_cores']:.2f} |"
                  for k, v in s.items() if isinstance(v, dict)]
    if "serving" in results:
        s = results["serving"]
        base = s["decode_only_clips_per_s"]
        lines += ["", f"serving, {args.clients} clients, adaptive batching; decode-only {base:.1f} clips/s before "
                  f"({s['decode_only_cpu_ms']:.1f} CPU ms per clip), {s['decode_only_after_clips_per_s']:.1f} after "
                  "(CPU-bound ratio: decode-only CPU ms / the server's CPU ms per clip):", "",
                  "| server | clips/s | / decode-only (before) | p50 / p99 ms | model ms per clip | clips per call "
                  "| server CPU ms per clip: API / inference | CPU-bound ratio | other CPU (cores) | load before / after |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p, v in s["servers"].items():
            c = v["cpu_ms_per_clip"]
            server = c.get("api", 0) + c.get("inference", 0) + c.get("arbiter", 0)
            lines.append(f"| {p} | {v['clips_per_s']:.1f} | {v['clips_per_s'] / base:.2f} | {v['p50_ms']:.0f} / "
                         f"{v['p99_ms']:.0f} | {v['model_ms_per_clip']:.1f} | {v['mean_batch']:.1f} | "
                         f"{c.get('api', float('nan')):.1f} / {c.get('inference', float('nan')):.1f} | "
                         f"{s['decode_only_cpu_ms'] / server:.2f} | "
                         f"{v['cpu']['other_cores']:.2f} | {v['cpu']['load_before']:.2f} / {v['cpu']['load_after']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="a quantized bundle (fp32 + int8) instead of the random resnet18 one")
    p.add_argument("--data", type=Path, help="with --bundle: media to decode, score and send (class folders)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of %(default)s")
    p.add_argument("--clips", type=int, default=48, help="distinct synth clips of the made corpus (%(default)s)")
    p.add_argument("--files", type=int, default=64, help="files scored (copies of the clips) (%(default)s)")
    p.add_argument("--calibration-clips", type=int, default=32, help="of the made bundle (%(default)s)")
    p.add_argument("--model-clips", type=int, default=16, help="decoded clips the model stage runs (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="model stage batch, scoring batch (%(default)s)")
    p.add_argument("--workers", type=int, default=2, help="scoring decode threads (%(default)s)")
    p.add_argument("--clients", type=int, default=16, help="serving client threads (%(default)s)")
    p.add_argument("--requests", type=int, default=96, help="serving requests per precision (%(default)s)")
    p.add_argument("--serve-clips", type=int, default=24, help="distinct clips sent (%(default)s)")
    p.add_argument("--decode-count", type=int, default=96, help="serving decode-only files (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (%(default)s)")
    p.add_argument("--busy-cores", type=float, default=0.3, help="repeat a measurement when others used more (%(default)s)")
    p.add_argument("--tries", type=int, default=2, help="attempts per measurement at most (%(default)s)")
    p.add_argument("--work", type=Path, help="folder for the bundle, corpora, logs; reused (default: temporary)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not set(stages) <= set(STAGES):
        raise SystemExit(f"--stages: of {', '.join(STAGES)}, got {args.stages!r}")
    work = args.work or Path(tempfile.mkdtemp(prefix="dimml-bench-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    from dimml.bundle import int8_check_summary, load_bundle

    try:
        if args.bundle:
            if not args.data:
                raise SystemExit("--bundle needs --data (media to score and send)")
            bundle, clips_dir = args.bundle, args.data
        else:
            bundle, clips_dir = make_quantized_bundle(work, args.clips, args.calibration_clips)
        b = load_bundle(bundle)
        if not b.int8:
            raise SystemExit(f"{bundle}: no int8 graphs (export with --quantize int8)")
        results = {"bundle": str(bundle), "check": int8_check_summary(b.int8["check"]),
                   "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()), "machine": machine()}
        files = sorted(p for p in clips_dir.rglob("*") if p.suffix in (".mp4", ".flv"))
        t0 = time.monotonic()
        if "model" in stages or "options" in stages:
            clips = decoded(bundle, files[:args.model_clips])
            if "model" in stages:
                results["model"] = stage_model(bundle, clips, args)
            if "options" in stages:
                results["options"] = stage_options(bundle, clips, args, work)
        if "scoring" in stages:
            corpus = make_corpus(PRESET_CLIPS["resnet18"], args.files, args.clips, work) if not args.bundle else clips_dir
            results["scoring"] = stage_scoring(bundle, corpus, args, work)
        if "serving" in stages:
            results["serving"] = stage_serving(bundle, clips_dir, args, work)
        results["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        results["seconds"] = round(time.monotonic() - t0)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(report(results, args))
    print(f"\ntotal {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

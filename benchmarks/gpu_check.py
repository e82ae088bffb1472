"""One prepared GPU check: CUDA tests, stage-1 step throughput, end-to-end training, GPU inference.

    python benchmarks/gpu_check.py --out DIR [--device auto|cuda|cpu] [--quick] [--work DIR]

Runs from the repository root without installing the package (the repository is put on the
path). Stages, each in its own process with a time limit (so a hang or a broken CUDA context
costs that stage only; the stages' limits add up to under 8 minutes on a GPU):

  step   the DI-MML "encoders" step (method.step + backward + SGD step, the trainer's wrap,
         autocast and GPU augmentation) on synthetic tensors of the resnet18 shapes: fp32 eager
         at batch 16 (the authors' setting) and bf16 + channels_last + torch.compile at batch
         16, 64 and 256; samples/s, peak memory, compile warm-up, ratio to the fp32 row; a
         torch profiler table of the largest row when it is under 3,000 samples/s
  train  `python -m training synth` then training.trainer.fit (resnet18 preset, the real decode
         cache and loader) for 2 epochs; samples/s of every epoch after the first (metrics.csv)
  infer  a bundle made by the export API, run by the torch-cuda backend (dimml.engines /
         dimml.predict.Predictor) at batch 1 and 32: clips/s and p50 latency
  tests  `pytest -m cuda` over the test files that hold cuda-marked tests

DIR/gpu_check.json holds every stage's figures (or its error); DIR/summary.txt the printed
table; DIR/cuda_tests.log the pytest output; DIR/profile.txt the profiler table when made.
Without CUDA (or with --quick) the same code runs with tiny sizes (tiny preset, small batches,
one timed step) in a minute or two on a CPU: torch.compile (its aot_eager backend there:
dynamo and AOTAutograd, the part the GPU run shares; --compile-backend inductor for the rest),
channels_last and the augmentation code still run, so only CUDA-specific failures are left for
the GPU run.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# The authors' code on an H100, batch 16, fp32 (issue 13): end to end, and the GPU step alone.
AUTHORS = {"end_to_end_samples_per_s": 166.0, "gpu_step_samples_per_s": 334.0,
           "setting": "batch 16, fp32, eager, H100"}
TARGET_SAMPLES_PER_S = 3000.0       # the goal for stage 1 on one H100/H200 (aim: 5,000)
ORT_CUDA_NOTE = ("onnxruntime-cuda not run: ONNX Runtime's CUDA build (onnxruntime-gpu, several hundred MB) "
                 "does not fit the device machine's 64 MiB transfer limit, and the machine has no network; "
                 "only the CPU build of onnxruntime is there")
STAGES = ("step", "train", "infer", "tests")
RESULT = "gpu_check.json"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the quick (CPU / CI) run."""

    preset: str
    classes: int                         # synthetic label count of the step and inference stages
    step_rows: tuple[tuple[str, int], ...]   # (setting, batch), most wanted first; "fp32-eager" or "default"
    compile_backend: str                 # torch.compile backend of the "default" rows (see compile_backend)
    warmup_steps: int                    # steps before timing (the first one compiles)
    step_seconds: float                  # timed seconds per row (at least min_steps steps)
    min_steps: int
    max_steps: int
    profile_steps: int
    synth_classes: int
    synth_per_class: int
    synth_duration: float
    train_batch: int
    train_epochs: int
    infer_batches: tuple[int, ...]
    infer_seconds: float
    infer_min_iters: int
    budgets: dict                        # stage -> seconds (cumulative deadlines; slack flows on)


GPU = Sizes(preset="resnet18", classes=6,
            # largest first: if compiling runs long, the headline rows are the ones already measured
            step_rows=(("fp32-eager", 16), ("default", 256), ("default", 64), ("default", 16)),
            compile_backend="inductor",
            warmup_steps=3, step_seconds=4.0, min_steps=10, max_steps=400, profile_steps=3,
            synth_classes=4, synth_per_class=600, synth_duration=3.0, train_batch=64, train_epochs=2,
            infer_batches=(1, 32), infer_seconds=4.0, infer_min_iters=10,
            budgets={"step": 200, "train": 110, "infer": 60, "tests": 80})
QUICK = Sizes(preset="tiny", classes=3,
              step_rows=(("fp32-eager", 4), ("default", 4)),
              # inductor's CPU C++ code generation takes minutes on 2 cores and is not what a GPU runs;
              # aot_eager still traces with dynamo and AOTAutograd, the part CPU and CUDA share
              compile_backend="aot_eager",
              warmup_steps=1, step_seconds=0.0, min_steps=1, max_steps=1, profile_steps=1,
              synth_classes=2, synth_per_class=4, synth_duration=2.0, train_batch=2, train_epochs=2,
              infer_batches=(1, 4), infer_seconds=0.0, infer_min_iters=2,
              budgets={"step": 300, "train": 300, "infer": 300, "tests": 300})

SETTINGS = {   # step-row setting -> TrainConfig execution fields
    "fp32-eager": dict(amp="off", compile="off", channels_last=False),
    "default": dict(amp="bf16", compile="on", channels_last=True),
}


def say(msg: str) -> None:
    """Progress on stdout, flushed (the device tool shows the tail of the output)."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def error_text(e: BaseException) -> str:
    """The exception and the last frames of its traceback (enough to fix it from the JSON alone)."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return f"{type(e).__name__}: {e}\n" + "".join(tb[-4:])[-3000:]


def child_env() -> dict[str, str]:
    """The environment for subprocesses: the repository importable without installing it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ---------------------------------------------------------------------------------------
# device helpers

def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> tuple[float, str]:
    """Peak memory since reset_peak: CUDA allocator peak, or the process's peak RSS on a CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (CPU run)"


def synthetic_inputs(preprocess, batch: int, device, seed: int = 0) -> dict:
    """{modality: tensor [B, *spec.shape]} of each spec's dtype (uint8 images, float spectrograms)."""
    import numpy as np
    import torch
    rng = np.random.default_rng(seed)
    out = {}
    for spec in preprocess.modalities:
        shape = (batch, *spec.shape)
        if np.issubdtype(spec.dtype, np.floating):
            a = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
        else:
            a = rng.integers(0, 256, shape, dtype=np.uint8).astype(spec.dtype)
        out[spec.name] = torch.from_numpy(a).to(device)
    return out


# ---------------------------------------------------------------------------------------
# stage: step

def make_step(setting: str, batch: int, sizes: Sizes, device_name: str, work: Path) -> tuple[Callable[[], None], Any, dict]:
    """One DI-MML stage-1 training step as the trainer takes it, on fixed synthetic tensors."""
    import torch

    from training.augment import augment_frames
    from training.evaluate import autocast
    from training.losses import transfer_dimensions
    from training.methods import Batch, get_method
    from training.models import build_model, build_model_config
    from training.trainer import TrainConfig, Trainer, augmented_names

    cfg = TrainConfig(data=str(work / "no-data"), out=str(work / "step-run"), method="dimml", preset=sizes.preset,
                      device=device_name, batch_size=batch, **SETTINGS[setting])
    trainer = Trainer(cfg, progress=False)
    trainer._setup()   # the trainer's device, autocast dtype and compile decision (and its _wrap below)
    device, c = trainer.device, trainer.cfg
    preprocess = c.preprocess_config()
    torch.manual_seed(0)
    model = build_model(build_model_config(c.preset, sizes.classes, preprocess, c.fusion), preprocess)
    method_cls = get_method(c.method)
    method = method_cls(model, method_cls.make_hparams(c.hparams, c.epochs), sizes.classes)
    for m in method.modules().values():
        m.to(device)
        if c.channels_last:   # the trainer does this on CUDA only; here on any device, so CPU runs cover it
            m.to(memory_format=torch.channels_last)
    # DUC on, as after the paper's dimension separation (epochs 21-150 of a run): random effective dims
    gen = torch.Generator().manual_seed(0)
    dim = model.branches[model.names[0]].head.in_features
    eff = {n: torch.rand(dim, generator=gen) > 0.5 for n in model.names}
    method.dims = {i: {j: d.to(device) for j, d in row.items()} for i, row in transfer_dimensions(eff).items()}

    stage = "encoders"
    for m in method.modules().values():
        m.requires_grad_(False).eval()
    for m in method.trainable(stage).values():
        m.requires_grad_(True).train()
    nets = method.nets(stage, trainer._wrap)
    optimizer = torch.optim.SGD(method.param_groups(stage), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    augmented = augmented_names(preprocess, c.augment)
    inputs = synthetic_inputs(preprocess, batch, device)
    label = torch.randint(0, sizes.classes, (batch,), generator=gen).to(device)

    def step() -> None:
        x = dict(inputs)
        for n in augmented:   # the trainer's GPU augmentation, on the device's tensors
            x[n] = augment_frames(x[n], generator=gen)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, trainer.amp_dtype):
            res = method.step(stage, Batch(x, label), nets)
        sum(res.losses.values()).backward()
        optimizer.step()

    info = {"amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
            "compile": trainer.compile, "channels_last": c.channels_last, "augmented": list(augmented),
            "shapes": {s.name: [batch, *s.shape] for s in preprocess.modalities}}
    return step, device, info


@contextlib.contextmanager
def compile_backend(name: str):
    """torch.compile with another backend while inside (the trainer's _wrap calls torch.compile(net))."""
    import torch
    if name == "inductor":
        yield
        return
    orig = torch.compile
    torch.compile = functools.partial(orig, backend=name)
    try:
        yield
    finally:
        torch.compile = orig


def time_row(setting: str, batch: int, sizes: Sizes, device_name: str, work: Path, out: Path,
             profile_if_slow: bool) -> dict:
    """Warm-up (reported apart), then timed steps: samples/s and peak memory of one row."""
    t_build = time.perf_counter()
    step, device, info = make_step(setting, batch, sizes, device_name, work)
    if info["compile"]:
        info["compile_backend"] = sizes.compile_backend
    row: dict[str, Any] = {"setting": setting, "batch": batch, **info,
                           "build_s": round(time.perf_counter() - t_build, 3)}
    reset_peak(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    row["first_step_s"] = round(time.perf_counter() - t0, 3)   # includes torch.compile when on
    t0 = time.perf_counter()
    for _ in range(sizes.warmup_steps - 1):
        step()
    sync(device)
    row["warmup_s"] = round(row["first_step_s"] + time.perf_counter() - t0, 3)
    # how many steps fill step_seconds (estimated from 2 synced steps; none in the quick run)
    n = sizes.min_steps
    if sizes.step_seconds > 0:
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        sync(device)
        per = (time.perf_counter() - t0) / 2
        n = int(min(sizes.max_steps, max(sizes.min_steps, sizes.step_seconds / max(per, 1e-6))))
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    mem, kind = peak_mb(device)
    row.update(timed_steps=n, timed_s=round(dt, 4), step_ms=round(1000 * dt / n, 3),
               samples_per_s=round(batch * n / dt, 2), peak_mem_mb=round(mem, 1), peak_mem_kind=kind)
    if profile_if_slow and row["samples_per_s"] < TARGET_SAMPLES_PER_S:
        try:   # a profiler failure must not cost the row its timing
            row["profile"] = profile_step(step, device, sizes.profile_steps, out / "profile.txt",
                                          f"{setting} batch {batch}: {row['samples_per_s']} samples/s")
        except Exception as e:
            row["profile"] = {"error": error_text(e)}
    return row


def profile_step(step: Callable[[], None], device, steps: int, path: Path, title: str) -> dict:
    """torch.profiler over a few steps: the table to a file, the top operators into the JSON."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    # self time: where the kernels (GPU) or operators (CPU) themselves spend it
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    avg = prof.key_averages()
    table = avg.table(sort_by=key, row_limit=30)
    path.write_text(f"{title}; {steps} profiled steps; sorted by {key}\n\n{table}\n")
    top = sorted(avg, key=lambda e: float(getattr(e, key)), reverse=True)[:12]
    return {"file": path.name, "steps": steps, "sorted_by": key,
            "top": [{"op": e.key, "self_ms": round(float(getattr(e, key)) / 1000, 3), "calls": e.count} for e in top]}


def stage_step(sizes: Sizes, device_name: str, work: Path, out: Path, save: Callable[[dict], None]) -> dict:
    """Every row of sizes.step_rows (an error in one row is recorded, the next one still runs)."""
    import torch
    res: dict[str, Any] = {"rows": [], "reference": AUTHORS, "target_samples_per_s": TARGET_SAMPLES_PER_S,
                           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                           "cudnn_benchmark": torch.backends.cudnn.benchmark,
                           "what": "method.step + backward + SGD step, GPU augmentation of the frames, DUC on; "
                                   "inputs already on the device (no loader)"}
    # the profiler table, when wanted, of the largest default-settings row
    prof_row = max((i for i, (s, _) in enumerate(sizes.step_rows) if s == "default"),
                   key=lambda i: sizes.step_rows[i][1])
    for i, (setting, batch) in enumerate(sizes.step_rows):
        say(f"step: {setting} batch {batch} ...")
        try:
            with compile_backend(sizes.compile_backend):
                row = time_row(setting, batch, sizes, device_name, work, out, profile_if_slow=i == prof_row)
            say(f"step: {setting} batch {batch}: {row['samples_per_s']} samples/s, first step "
                f"{row['first_step_s']} s, peak {row['peak_mem_mb']} MB")
        except Exception as e:   # record, free, go on with the next row
            row = {"setting": setting, "batch": batch, "error": error_text(e)}
            say(f"step: {setting} batch {batch} failed: {type(e).__name__}: {e}")
        res["rows"].append(row)
        base = next((r for r in res["rows"] if r["setting"] == "fp32-eager" and "samples_per_s" in r), None)
        for r in res["rows"]:
            if base and "samples_per_s" in r:
                r["ratio_to_fp32_b16"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
            if "samples_per_s" in r:
                r["ratio_to_authors_step"] = round(r["samples_per_s"] / AUTHORS["gpu_step_samples_per_s"], 3)
        save(res)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------
# stage: train

def trim_train(manifest: Path, batch: int) -> dict:
    """Move train rows to val so train is a multiple of the batch: no partial last batch, so the
    compiled step keeps its one static-shape graph (a partial batch would recompile it)."""
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    train = [r for r in rows if r.get("split") == "train"]
    extra = len(train) % batch
    for r in train[len(train) - extra:] if extra else []:
        r["split"] = "val"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return {"train_rows": len(train) - extra, "moved_to_val": extra}


def stage_train(sizes: Sizes, device_name: str, work: Path, out: Path, save: Callable[[dict], None]) -> dict:
    """Synthesize a corpus here, then fit stage 1 for train_epochs with the real cache and loader."""
    from training.trainer import METRICS, TrainConfig, Trainer, fit, prepare_data

    cores = os.cpu_count() or 1
    corpus, run = work / "corpus", work / "train-run"
    res: dict[str, Any] = {"cores": cores}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "training", "synth", "--out", str(corpus), "--classes", str(sizes.synth_classes),
           "--per-class", str(sizes.synth_per_class), "--duration", str(sizes.synth_duration),
           "--workers", str(cores), "--force"]
    say(f"train: {' '.join(cmd[1:])}")
    subprocess.run(cmd, cwd=REPO, env=child_env(), check=True, stdout=subprocess.DEVNULL)
    res["synth_s"] = round(time.perf_counter() - t0, 2)
    res["clips"] = sizes.synth_classes * sizes.synth_per_class
    res.update(trim_train(corpus / "manifest.csv", sizes.train_batch))
    save(res)

    cfg = TrainConfig(data=str(corpus), out=str(run), method="dimml", preset=sizes.preset, device=device_name,
                      epochs=sizes.train_epochs, stage2_epochs=0, batch_size=sizes.train_batch,
                      decode_workers=cores, cache_dir=str(work / "cache"),
                      # separation at epoch 0 (in the untimed first epoch): DUC is on in the timed ones
                      hparams={"warmup": 0})
    t0 = time.perf_counter()
    say(f"train: decode cache of {res['clips']} clips with {cores} workers ...")
    resolved = cfg.resolve()
    data = prepare_data(resolved, resolved.preprocess_config(), progress=False)
    res["cache_s"] = round(time.perf_counter() - t0, 2)
    res["cache_clips_per_s"] = round(res["clips"] / res["cache_s"], 1)
    res["split_sizes"] = data.sizes
    save(res)

    say(f"train: fit {sizes.train_epochs} epochs, batch {sizes.train_batch} ...")
    t0 = time.perf_counter()
    fit(cfg, force=True, progress=False)
    res["fit_s"] = round(time.perf_counter() - t0, 2)
    with open(run / METRICS, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "encoders"]
    n_train = data.sizes["train"]
    res["epochs"] = [{"epoch": int(r["epoch"]), "time_s": float(r["time_s"]),
                      "samples_per_s": round(n_train / float(r["time_s"]), 2)} for r in rows]
    res["steady_epochs"] = res["epochs"][1:]
    if res["steady_epochs"]:
        res["samples_per_s"] = round(statistics.mean(e["samples_per_s"] for e in res["steady_epochs"]), 2)
        res["ratio_to_authors_end_to_end"] = round(res["samples_per_s"] / AUTHORS["end_to_end_samples_per_s"], 3)
    trainer = Trainer(cfg, progress=False)
    trainer._setup()   # what fit resolved: device, autocast, compile, loader workers
    res["settings"] = {"batch_size": cfg.batch_size, "device": str(trainer.device), "workers": trainer.workers,
                       "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
                       "compile": trainer.compile, "channels_last": cfg.channels_last and trainer.device.type == "cuda",
                       "augment": cfg.augment}
    res["note"] = ("epoch time_s as metrics.csv gives it: the train pass and the validation pass; the first "
                   "epoch also compiles and separates dimensions. samples/s = train rows / time_s")
    log = run / "train.log"
    if log.is_file():
        (out / "train.log").write_text(log.read_text())
    return res


# ---------------------------------------------------------------------------------------
# stage: infer

def stage_infer(sizes: Sizes, device_name: str, work: Path, out: Path, save: Callable[[dict], None]) -> dict:
    """Export a random-weight run of the preset with the export API; time Predictor.forward."""
    import numpy as np
    import torch

    from dimml.engines import open_engine
    from dimml.modalities import preprocess_for
    from dimml.predict import Predictor
    from export.build import BundleOptions, build_bundle
    from training.models import build_model, build_model_config
    from training.run import run_config_fields, save_run_model

    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    backend = "torch-cuda" if cuda else "torch-cpu"
    res: dict[str, Any] = {"backend": backend, "onnxruntime_cuda": ORT_CUDA_NOTE, "batches": []}
    run, bundle_dir = work / "infer-run", work / "infer-bundle"
    classes = [f"c{i}" for i in range(sizes.classes)]
    torch.manual_seed(0)
    pp = preprocess_for(sizes.preset, "audio,visual")
    mcfg = build_model_config(sizes.preset, len(classes), pp)
    save_run_model(run, {"method": "dimml", "preset": sizes.preset, **run_config_fields(pp, mcfg, classes),
                         "lw_temperature": 1.0}, build_model(mcfg, pp))
    t0 = time.perf_counter()
    say(f"infer: export bundle ({sizes.preset}) ...")
    build_bundle(run, bundle_dir, BundleOptions(force=True), progress=False)
    res["export_s"] = round(time.perf_counter() - t0, 2)
    engine = open_engine(str(bundle_dir), backend)
    predictor = Predictor(str(bundle_dir), engine=engine, max_batch=max(sizes.infer_batches))
    res["backend"] = predictor.backend
    save(res)
    rng = np.random.default_rng(0)
    for b in sizes.infer_batches:
        arrays = {s.name: (rng.standard_normal((b, *s.shape)).astype(s.dtype) if np.issubdtype(s.dtype, np.floating)
                           else rng.integers(0, 256, (b, *s.shape), dtype=np.uint8).astype(s.dtype))
                  for s in pp.modalities}
        for _ in range(2):   # warm-up
            predictor.forward(arrays)
        lat: list[float] = []
        t_all = time.perf_counter()
        while len(lat) < sizes.infer_min_iters or time.perf_counter() - t_all < sizes.infer_seconds:
            t0 = time.perf_counter()
            o = predictor.forward(arrays)   # numpy in, numpy out: includes host<->device copies
            lat.append(time.perf_counter() - t0)
            if len(lat) >= 2000:
                break
        assert len(o) == b
        res["batches"].append({"batch": b, "iters": len(lat), "clips_per_s": round(b * len(lat) / sum(lat), 2),
                               "p50_ms": round(1000 * statistics.median(lat), 3),
                               "p90_ms": round(1000 * sorted(lat)[int(0.9 * (len(lat) - 1))], 3)})
        say(f"infer: batch {b}: {res['batches'][-1]['clips_per_s']} clips/s, p50 {res['batches'][-1]['p50_ms']} ms")
        save(res)
    res["what"] = ("Predictor.forward on decoded arrays (branches, fusion, certainty weighting), numpy in and "
                   "out; no decoding")
    return res


# ---------------------------------------------------------------------------------------
# stage: tests

def cuda_test_files() -> list[str]:
    """Test files holding cuda-marked tests (only these are collected: the others import serving
    and client packages a bare GPU machine lacks)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def stage_tests(sizes: Sizes, device_name: str, work: Path, out: Path, save: Callable[[dict], None]) -> dict:
    import xml.etree.ElementTree as ET

    files = cuda_test_files()
    xml = work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *files]
    res: dict[str, Any] = {"command": " ".join(cmd[1:]), "files": files}
    save(res)
    say(f"tests: {res['command']}")
    t0 = time.perf_counter()
    with open(out / "cuda_tests.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["exit_code"] = proc.returncode
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        res["cases"] = [{"name": c.get("name"), "time_s": float(c.get("time", 0)),
                         "outcome": next((ch.tag for ch in c if ch.tag in ("failure", "error", "skipped")), "passed"),
                         "message": next((ch.get("message", "")[:500] for ch in c
                                          if ch.tag in ("failure", "error", "skipped")), "")}
                        for c in root.iter("testcase")]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    res.update(counts)
    tail = (out / "cuda_tests.log").read_text().splitlines()[-3:]
    res["summary_line"] = tail[-1] if tail else ""
    say(f"tests: {res['summary_line']}")
    if proc.returncode not in (0, 5):
        res["error"] = f"pytest exit code {proc.returncode}: {res['summary_line']} (see cuda_tests.log)"
    return res


STAGE_FUNCS = {"step": stage_step, "train": stage_train, "infer": stage_infer, "tests": stage_tests}


def run_stage_here(name: str, sizes: Sizes, device_name: str, work: Path, out: Path) -> int:
    """The child side: run one stage, saving its partial result after every unit of work."""
    path = work / f"stage-{name}.json"
    partial: dict[str, Any] = {}
    def save(obj: dict) -> None:
        partial.clear()
        partial.update(obj)
        write_json(path, obj)
    try:
        res = STAGE_FUNCS[name](sizes, device_name, work, out, save)
        write_json(path, res)
        return 0
    except Exception as e:
        write_json(path, {**partial, "error": error_text(e)})
        say(f"{name}: failed: {type(e).__name__}: {e}")
        return 1


# ---------------------------------------------------------------------------------------
# the parent: stages in processes, deadlines, merge, summary

def run_child(cmd: list[str], timeout: float) -> tuple[int | None, list[str]]:
    """Run cmd (its own process group), echoing its output; kill the group at the timeout.
    Returns (exit code or None on timeout, last output lines)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(line, end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = None
    reader.join(timeout=5)
    return rc, list(tail)


def environment(device_name: str) -> dict:
    import torch
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform(), "device_arg": device_name}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), capability=f"{p.major}.{p.minor}")
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def fmt(v: Any, nd: int = 1) -> str:
    return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, (int, float)) else str(v))


def summary(result: dict) -> str:
    """The printed table (also DIR/summary.txt)."""
    st, env = result["stages"], result["environment"]
    lines = [f"gpu_check {result['mode']} run, {result['started_utc']}, device {env.get('gpu') or 'cpu'}, "
             f"torch {env['torch']}, {env['cpu_count']} cores, {result['seconds']:.0f} s",
             f"authors (H100, batch 16 fp32): {AUTHORS['gpu_step_samples_per_s']:.0f} samples/s GPU step, "
             f"{AUTHORS['end_to_end_samples_per_s']:.0f} end to end; target {TARGET_SAMPLES_PER_S:,.0f}", ""]
    s = st.get("step", {})
    lines += [f"[step] {s.get('status')}" + (f": {s['error'].splitlines()[0]}" if s.get("error") else ""),
              f"  {'setting':<12}{'batch':>6}{'samples/s':>12}{'x fp32 b16':>11}{'x authors':>10}"
              f"{'step ms':>9}{'peak MB':>10}{'warm-up s':>10}"]
    for r in s.get("rows", []):
        if "error" in r:
            lines.append(f"  {r['setting']:<12}{r['batch']:>6}  error: {r['error'].splitlines()[0][:80]}")
            continue
        lines.append(f"  {r['setting']:<12}{r['batch']:>6}{fmt(r['samples_per_s']):>12}{fmt(r.get('ratio_to_fp32_b16'), 2):>11}"
                     f"{fmt(r.get('ratio_to_authors_step'), 2):>10}{fmt(r['step_ms'], 1):>9}{fmt(r['peak_mem_mb'], 0):>10}"
                     f"{fmt(r['warmup_s'], 1):>10}")
    t = st.get("train", {})
    lines += ["", f"[train] {t.get('status')}" + (f": {t['error'].splitlines()[0]}" if t.get("error") else "")]
    if "epochs" in t:
        lines.append(f"  {t.get('clips')} clips (synth {fmt(t.get('synth_s'))} s, cache {fmt(t.get('cache_s'))} s), "
                     f"train rows {t['split_sizes']['train']}, batch {t['settings']['batch_size']}, "
                     f"workers {t['settings']['workers']}")
        for e in t["epochs"]:
            lines.append(f"  epoch {e['epoch']}: {fmt(e['time_s'], 2)} s, {fmt(e['samples_per_s'])} samples/s"
                         + ("  (first: compile when on, dimension separation)" if e["epoch"] == 1 else ""))
        lines.append(f"  after the first: {fmt(t.get('samples_per_s'))} samples/s "
                     f"= {fmt(t.get('ratio_to_authors_end_to_end'), 2)} x authors' 166")
    i = st.get("infer", {})
    lines += ["", f"[infer] {i.get('status')} {i.get('backend', '')}"
              + (f": {i['error'].splitlines()[0]}" if i.get("error") else "")]
    for b in i.get("batches", []):
        lines.append(f"  batch {b['batch']:>3}: {fmt(b['clips_per_s'])} clips/s, p50 {fmt(b['p50_ms'], 2)} ms")
    lines.append(f"  {ORT_CUDA_NOTE}")
    c = st.get("tests", {})
    lines += ["", f"[tests] {c.get('status')}: passed {c.get('passed')}, failed {c.get('failures')}, "
                  f"errors {c.get('errors')}, skipped {c.get('skipped')} ({c.get('summary_line', '')})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and the logs")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes (implied without CUDA)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (corpus, runs; default: a temp dir)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the default-settings step rows (inductor on CUDA, aot_eager "
                        "in the quick run)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)   # internal: run one stage here
    args = p.parse_args(argv)

    import torch
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    device_name = "cuda" if cuda else "cpu"
    quick = args.quick or not cuda
    sizes = QUICK if quick else GPU
    if args.compile_backend:
        sizes = dataclasses.replace(sizes, compile_backend=args.compile_backend)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage_here(args.stage, sizes, device_name, args.work.resolve(), out)

    import tempfile
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    start = time.perf_counter()
    result: dict[str, Any] = {"mode": "quick" if quick else "gpu", "device": device_name,
                              "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "environment": environment(device_name), "preset": sizes.preset,
                              "budgets_s": sizes.budgets, "stages": {}, "work": str(work), "seconds": 0.0}
    say(f"{result['mode']} run on {device_name} ({result['environment'].get('gpu', platform.processor() or 'cpu')}), "
        f"stages {','.join(stages)}, budget {sum(sizes.budgets[s] for s in stages)} s; work {work}")
    deadline = 0.0
    for name in stages:
        deadline += sizes.budgets[name]   # cumulative: time a stage leaves over goes to the next
        limit = deadline - (time.perf_counter() - start)
        say(f"stage {name}: up to {limit:.0f} s")
        t0 = time.perf_counter()
        (work / f"stage-{name}.json").unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out), "--work", str(work),
               "--device", device_name, "--compile-backend", sizes.compile_backend] + (["--quick"] if quick else [])
        rc, tail = run_child(cmd, limit)
        part = work / f"stage-{name}.json"
        data = json.loads(part.read_text()) if part.is_file() else {}
        if rc is None:
            data["error"] = f"timed out after {limit:.0f} s (what it had finished is kept)\n" + "\n".join(tail[-15:])
        elif rc != 0 and "error" not in data:
            data["error"] = f"exit code {rc}\n" + "\n".join(tail[-15:])
        data["status"] = "timeout" if rc is None else ("error" if data.get("error") else "ok")
        data["stage_s"] = round(time.perf_counter() - t0, 1)
        result["stages"][name] = data
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_json(out / RESULT, result)   # after every stage: a killed run still leaves the finished ones
        say(f"stage {name}: {data['status']} in {data['stage_s']} s")
    table = summary(result)
    (out / "summary.txt").write_text(table + "\n")
    print("\n" + table, flush=True)
    say(f"wrote {out / RESULT}")
    return 0 if all(s["status"] == "ok" for s in result["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

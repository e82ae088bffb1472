"""ONNX -> TensorRT engines with the TensorRT Python API (written for TensorRT 10 and 11).

Per module: a strongly typed network parsed from the ONNX file (with --fp16 from an fp16
copy made by `convert_fp16`, inputs/outputs kept fp32: TensorRT 11 has no FP16 builder
flag), one optimisation profile for batch 1..max with a typical `opt`, a workspace limit,
TF32 off (fp32 engines must match PyTorch), and a timing cache reused across modules and
builds. Engines are named `<module>.trt<version>.sm<cc>.<precision>.engine`.

Needs the full `tensorrt` package and a CUDA GPU; the runtime side is dimml/engines.py.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from dimml.fileio import atomic_write_bytes


@dataclass
class TrtOptions:
    """Engine build settings (CLI: --fp16, --max-batch, ...)."""

    fp16: bool = False
    max_batch: int = 32
    opt_batch: int | None = None        # profile's optimum; default min(8, max_batch)
    workspace_gb: float = 4.0
    timing_cache: Path | None = None    # default: ~/.cache/dimml/tensorrt/timing-<ver>-sm<cc>.cache
    version_compatible: bool = False    # runnable by later TensorRT runtimes incl. the lean one
    device_id: int = 0


def preflight(device_id: int = 0) -> str:
    """Fail fast, before any export work: the TensorRT builder and a GPU. Returns the GPU's cc."""
    import importlib.util

    import torch

    from dimml.engines import EngineError

    if importlib.util.find_spec("tensorrt") is None:
        raise EngineError("--tensorrt needs the TensorRT builder (pip install tensorrt); the lean "
                          "runtime (tensorrt_lean) can run engines but not build them")
    if not torch.cuda.is_available():
        raise EngineError("--tensorrt needs a CUDA GPU to build engines for (torch sees none)")
    major, minor = torch.cuda.get_device_capability(device_id)
    return f"{major}.{minor}"


def engine_filename(module: str, trt_version: str, cc: str, precision: str) -> str:
    return f"{module}.trt{trt_version}.sm{cc.replace('.', '')}.{precision}.engine"


def _default_cache(trt_version: str, cc: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dimml" / "tensorrt" / f"timing-{trt_version}-sm{cc.replace('.', '')}.cache"


def build_engine(trt, onnx_path: Path, out_path: Path, opts: TrtOptions, cache_blob: bytes) -> bytes:
    """Build one engine from an ONNX file; writes it to out_path, returns the updated timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: strong typing is opt-in by flag; TensorRT 11: always on (flag deprecated, ignored)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    strongly_typed_by_default = int(trt.__version__.split(".")[0]) >= 11
    network = builder.create_network(0 if flag is None or strongly_typed_by_default else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if opts.version_compatible:   # the plan embeds the lean runtime it needs (host code)
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = config.create_timing_cache(cache_blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another GPU (or a damaged file) is rejected: start a fresh one, never fail the build
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    opt = opts.opt_batch or min(8, opts.max_batch)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):   # the parsed network's inputs: batch -1, the rest fixed by export
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (opts.max_batch, *rest))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    atomic_write_bytes(out_path, bytes(memoryview(serialized)))
    return bytes(memoryview(cache.serialize()))   # the cache now holds this build's timings too


def build_engines(bundle_dir: Path, onnx_files: dict[str, Path], opts: TrtOptions, progress=None) -> dict:
    """Engines for every module into bundle_dir/tensorrt/; returns the manifest's `tensorrt` entry."""
    import tensorrt as trt

    from export.onnx_export import convert_fp16

    if not 1 <= (opts.opt_batch or 1) <= opts.max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opts.opt_batch} and {opts.max_batch}")
    cc = preflight(opts.device_id)
    precision = "fp16" if opts.fp16 else "fp32"
    cache_path = opts.timing_cache or _default_cache(trt.__version__, cc)
    cache_blob = cache_path.read_bytes() if cache_path.is_file() else b""
    (bundle_dir / "tensorrt").mkdir(exist_ok=True)
    engines = []
    with tempfile.TemporaryDirectory() as tmp:
        for module, onnx_path in onnx_files.items():
            src = onnx_path
            if opts.fp16:
                src = Path(tmp) / f"{module}.fp16.onnx"
                onnx.save(convert_fp16(onnx.load(str(onnx_path))), str(src))
            rel = f"tensorrt/{engine_filename(module, trt.__version__, cc, precision)}"
            cache_blob = build_engine(trt, src, bundle_dir / rel, opts, cache_blob)
            engines.append({"module": module, "file": rel, "tensorrt_version": trt.__version__,
                            "compute_capability": cc, "precision": precision,
                            "max_batch": opts.max_batch, "opt_batch": opts.opt_batch or min(8, opts.max_batch),
                            "version_compatible": opts.version_compatible})
            if progress is not None:
                progress.update(1)
    atomic_write_bytes(cache_path, cache_blob)
    return {"version": trt.__version__, "engines": engines}


__all__ = ["TrtOptions", "build_engines", "build_engine", "engine_filename"]

"""Inference backends over a bundle: TensorRT, ONNX Runtime (CUDA / CPU), PyTorch fallback.

Every engine runs the bundle's modules (one branch per modality, then fusion; the names come
from `dimml.bundle.module_io`) on numpy arrays and returns float32 numpy:
    engine.branch(name, x [B, *spec.shape] spec.dtype)  -> (features [B, D], logits [B, K])
    engine.fusion([features [B, D] per modality, model order]) -> logits [B, K]
and names itself in `backend` ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu",
"torch-cpu", "torch-cuda") and its numeric `precision` ("fp32"; "int8" for a quantized bundle's
graphs on onnxruntime-cpu; a TensorRT engine's own), with `precision_reason` saying why.
`open_engine` picks the best one that really works here.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dimml.bundle import FP32, FUSION, INT8, Bundle, BundleError, int8_check_summary, load_bundle
from dimml.extras import MissingExtra, onnxruntime_conflict, require

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "torch-cuda", "torch-cpu")
# what `prefer` may name: a backend, a family (best of it), or "auto" (best of all)
FAMILIES = {"auto": BACKENDS,
            "onnxruntime": ("onnxruntime-cuda", "onnxruntime-cpu"),
            "torch": ("torch-cuda", "torch-cpu")}
# what `precision` may name: "auto" serves a quantized bundle's int8 graphs on onnxruntime-cpu when
# they passed their accuracy check, fp32 otherwise
PRECISIONS = ("auto", FP32, INT8)
INT8_BACKEND = "onnxruntime-cpu"   # the one backend the int8 (QDQ) graphs are built and checked for
# CPU features with fast u8 x s8 dot products (ONNX Runtime's int8 kernels); without them int8 is
# slower and may saturate (ONNX Runtime's quantization docs)
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class EngineError(RuntimeError):
    """A requested backend that cannot run here (missing package, no GPU, no engine for this GPU)."""


class Engine:
    """Base: subclasses implement `run(module, *inputs) -> list of outputs` (module_io order)
    and set `names` (the modalities, model order) and `dtypes` (modality -> input dtype)."""

    backend: str = "?"
    precision: str = FP32          # the graphs' numeric precision
    precision_reason: str = ""     # why this precision (the choice open_engine made)
    max_batch: int | None = None   # largest batch accepted (TensorRT profile); None: any
    names: tuple[str, ...] = ()
    dtypes: dict[str, np.dtype] = {}

    def _setup(self, bundle: Bundle) -> None:
        cfg = bundle.preprocess
        self.names = cfg.names
        self.dtypes = {s.name: s.dtype for s in cfg.modalities}
        self.io = bundle.io

    def run(self, module: str, *inputs: np.ndarray) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def branch(self, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One modality's branch: input [B, *shape] -> (features [B, D], logits [B, K])."""
        if name not in self.dtypes:
            raise KeyError(f"no branch {name!r} (this model has {', '.join(self.names)})")
        f, z = self.run(name, np.ascontiguousarray(x, dtype=self.dtypes[name]))
        return f, z

    def fusion(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """The fusion head: one [B, D] feature array per modality, in model order -> logits [B, K]."""
        if len(features) != len(self.names):
            raise ValueError(f"fusion takes {len(self.names)} feature arrays ({', '.join(self.names)}), "
                             f"got {len(features)}")
        (z,) = self.run(FUSION, *(np.ascontiguousarray(f, dtype=np.float32) for f in features))
        return z

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


# ---------------------------------------------------------------------------------------
# ONNX Runtime

class OrtEngine(Engine):
    """The bundle's ONNX files in ONNX Runtime on the CPU or one CUDA GPU."""

    def __init__(self, bundle: Bundle, device: str = "cpu", device_id: int = 0,
                 threads: int | None = None, precision: str = FP32):
        ort = require("onnxruntime", "gpu" if device == "cuda" else "cpu", what=f"onnxruntime-{device}")
        conflict = onnxruntime_conflict()
        if conflict:
            log.warning(conflict)

        self._setup(bundle)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.backend = f"onnxruntime-{device}"
        if precision not in (FP32, INT8) or (precision == INT8 and self.backend != INT8_BACKEND):
            raise EngineError(f"{self.backend}: cannot run {precision} graphs (int8 runs on {INT8_BACKEND} only)")
        self.precision = precision
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError("onnxruntime-cuda: this onnxruntime has no CUDAExecutionProvider "
                                  "(pip install 'dimml[gpu]', without the CPU onnxruntime)")
            # TF32 off: fp32 results must match the PyTorch reference to 1e-4
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}),
                                    "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3   # a provider falling back is checked below, not logged
        # all graph optimisations (ONNX Runtime's default, pinned here): they fuse int8 QDQ graphs into
        # integer kernels and fp32 convs into NCHWc ones; "extended" ran fp32 and int8 slower (BENCHMARKS.md)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cpu":
            # idle ORT threads spin by default, taking the cores that decoding needs between runs
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for module in self.io:
            try:
                path = bundle.onnx_path(module, precision)
            except BundleError as e:
                raise EngineError(f"{self.backend}: {e}") from None
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:   # ORT raises its own exception types (Fail, InvalidGraph...)
                raise EngineError(f"{self.backend}: cannot load {path} ({e})") from None
            wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
            if sess.get_providers()[0] != wanted:
                # a GPU provider that silently fell back to CPU is an error, not a slow success
                raise EngineError(f"{self.backend}: {wanted} did not load for {path.name} "
                                  f"(session runs on {sess.get_providers()}); check CUDA/cuDNN libraries")
            self.sessions[module] = sess

    def run(self, module: str, *inputs: np.ndarray) -> list[np.ndarray]:
        names, _ = self.io[module]
        return self.sessions[module].run(None, dict(zip(names, inputs)))


# ---------------------------------------------------------------------------------------
# PyTorch (the `torch.export` programs saved in BUNDLE/torch/)

class TorchEngine(Engine):
    """The bundle's `torch.export` programs in PyTorch: the fallback backend and the parity
    reference. Loads what the bundle holds; needs no model code (never imports training)."""

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        self.backend = f"torch-{'cuda' if device.startswith('cuda') else 'cpu'}"
        torch = require("torch", "train", what=self.backend)

        self._setup(bundle)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("torch-cuda: torch sees no CUDA GPU")
        self.device = torch.device(device)
        self.modules = {}
        for module in self.io:
            try:
                path = bundle.torch_program(module)
            except BundleError as e:
                raise EngineError(f"{self.backend}: {e}") from None
            program = torch.export.load(str(path))
            self.modules[module] = program.module().to(self.device)
        self._torch = torch

    def run(self, module: str, *inputs: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.modules[module](*(torch.from_numpy(x).to(self.device) for x in inputs))
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return [o.float().cpu().numpy() for o in out]


# ---------------------------------------------------------------------------------------
# TensorRT (runtime only; engines are built by export/tensorrt_build.py)

def _import_tensorrt():
    """The full `tensorrt` package, else the lean runtime (which runs version-compatible engines)."""
    for name in ("tensorrt", "tensorrt_lean"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    raise EngineError("tensorrt: neither tensorrt nor tensorrt_lean is installed")


def cuda_compute_capability(device_id: int = 0) -> str | None:
    """'9.0' for an H100, from torch; None without a CUDA GPU (never touches TensorRT)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_id)
    return f"{major}.{minor}"


class TrtModule:
    """One TensorRT engine run on CUDA memory (torch tensors) on its own non-default stream."""

    def __init__(self, path: Path, trt, device_id: int = 0, version_compatible: bool = False):
        import torch

        self.torch, self.trt = torch, trt
        self.device = torch.device("cuda", device_id)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):   # engine and context live on the GPU current at creation
            self.runtime = trt.Runtime(self.logger)
            if version_compatible:   # such plans carry their own lean runtime, run as host code
                self.runtime.engine_host_code_allowed = True
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise EngineError(f"tensorrt: cannot deserialize {path} (built by another TensorRT "
                                  "version or for another GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(device=self.device)
        self.lock = threading.Lock()   # one execution context: one batch at a time

    def _torch_dtype(self, dt):
        t, trt = self.torch, self.trt
        table = {trt.DataType.FLOAT: t.float32, trt.DataType.HALF: t.float16,
                 trt.DataType.UINT8: t.uint8, trt.DataType.INT8: t.int8,
                 trt.DataType.INT32: t.int32, trt.DataType.INT64: t.int64, trt.DataType.BOOL: t.bool}
        return table[dt]

    def __call__(self, *inputs) -> list:
        """Torch tensors (any device) or numpy arrays in, CUDA torch tensors out."""
        torch = self.torch
        with self.lock, torch.cuda.stream(self.stream):
            feeds = []
            for name, x in zip(self.inputs, inputs):
                x = torch.as_tensor(x).to(self.device, self.dtypes[name], non_blocking=True).contiguous()
                feeds.append(x)   # kept alive until the stream is done with it
                if not self.context.set_input_shape(name, tuple(x.shape)):
                    raise ValueError(f"tensorrt: input {name} of shape {tuple(x.shape)} is outside "
                                     "the engine's optimisation profile")
                self.context.set_tensor_address(name, x.data_ptr())
            outs = []
            for name in self.outputs:
                y = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                device=self.device)
                self.context.set_tensor_address(name, y.data_ptr())
                outs.append(y)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("tensorrt: execute_async_v3 failed")
            self.stream.synchronize()
        return outs


def usable_engines(bundle: Bundle, device_id: int = 0) -> tuple[dict[str, dict], str]:
    """The bundle's engines for this GPU and TensorRT, by module; or ({}, why not)."""
    if not bundle.engines:
        return {}, "the bundle has no TensorRT engines (export with --tensorrt)"
    for name in ("tensorrt", "tensorrt_lean"):
        if importlib.util.find_spec(name) is not None:
            break
    else:
        return {}, "tensorrt is not installed"
    cc = cuda_compute_capability(device_id)
    if cc is None:
        return {}, "no CUDA GPU visible to torch"
    trt = _import_tensorrt()
    lean = trt.__name__ == "tensorrt_lean"   # the lean runtime loads version-compatible plans only
    found = {e["module"]: e for e in bundle.engines
             if _runs_here(e, trt.__version__, cc) and (e.get("version_compatible") or not lean)}
    if set(found) != set(bundle.io):
        have = sorted({(e["tensorrt_version"], e["compute_capability"]) for e in bundle.engines})
        return {}, (f"no complete engine set for TensorRT {trt.__version__} on compute capability "
                    f"{cc} (bundle has {have})")
    return found, ""


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def _runs_here(entry: dict, trt_version: str, cc: str) -> bool:
    """Engines are specific to a GPU architecture and, unless built version-compatible, to
    the exact TensorRT version. Version-compatible ones run on later runtimes of the same major,
    and across majors only where NVIDIA supports it (10 -> 11, 8 -> 10)."""
    if entry["compute_capability"] != cc:
        return False
    built, here = _version(entry["tensorrt_version"]), _version(trt_version)
    if built == here:
        return True
    majors_ok = built[:1] == here[:1] or (built[:1] + here[:1]) in {(10, 11), (8, 10)}
    return bool(entry.get("version_compatible")) and majors_ok and here > built


class TensorRTEngine(Engine):
    """The bundle's TensorRT engines for this GPU; numpy in, numpy out (via CUDA torch tensors)."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, device_id: int = 0):
        found, why = usable_engines(bundle, device_id)
        if not found:
            raise EngineError(f"tensorrt: {why}")
        self._setup(bundle)
        trt = _import_tensorrt()
        self.modules = {m: TrtModule(bundle.file(e["file"]), trt, device_id, bool(e.get("version_compatible")))
                        for m, e in found.items()}
        self.max_batch = min(int(e["max_batch"]) for e in found.values())
        self.precision = found[FUSION].get("precision", "fp32")

    def run(self, module: str, *inputs: np.ndarray) -> list[np.ndarray]:
        return [y.float().cpu().numpy() for y in self.modules[module](*inputs)]


# ---------------------------------------------------------------------------------------
# selection

def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def int8_cpu_features() -> list[str] | None:
    """Which of INT8_CPU_FLAGS this CPU has (None: unknown)."""
    flags = cpu_flags()
    return None if flags is None else [f for f in INT8_CPU_FLAGS if f in flags]


def choose_precision(bundle: Bundle, backend: str, precision: str = "auto") -> tuple[str, str]:
    """(precision, why) for a backend: "auto" runs a quantized bundle's int8 graphs on onnxruntime-cpu
    when the manifest records that they passed their accuracy check against fp32, fp32 otherwise.
    An explicit "int8" that cannot run (another backend, no int8 graphs, a failed check) raises EngineError."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    entry = bundle.int8
    if backend != INT8_BACKEND and precision == INT8:
        raise EngineError(f"{backend}: int8 graphs run on {INT8_BACKEND} only")
    if backend == "tensorrt":   # (TensorRTEngine sets its engines' precision itself)
        return FP32, "the TensorRT engines' own precision, as built (fp32 or fp16)"
    if precision == FP32:
        return FP32, "fp32 asked for" + (" (the bundle also holds int8 graphs)" if entry else "")
    if backend != INT8_BACKEND:
        return FP32, (f"int8 graphs run on {INT8_BACKEND} only" if entry else "the bundle holds fp32 graphs only")
    if not entry:
        if precision == INT8:
            raise EngineError(f"{backend}: {bundle.path} holds no int8 graphs (export with --quantize int8)")
        return FP32, "the bundle holds fp32 graphs only (export with --quantize int8 for int8)"
    check = entry.get("check") or {}
    if not check.get("passed"):
        why = f"its int8 graphs did not pass their accuracy check ({int8_check_summary(check)})"
        if precision == INT8:
            raise EngineError(f"{backend}: {why}")
        return FP32, f"fp32: {why}"
    why = f"int8: passed its accuracy check against fp32 at export ({int8_check_summary(check)})"
    here = int8_cpu_features()
    if here is not None and not here:
        why += (f"; this CPU has none of {', '.join(INT8_CPU_FLAGS)}: int8 may be slow or less accurate "
                "here (run dimml verify on this machine; DIMML_PRECISION=fp32 serves fp32)")
    return INT8, why


def _make(backend: str, bundle: Bundle, device_id: int, threads: int | None, precision: str = "auto") -> Engine:
    chosen, why = choose_precision(bundle, backend, precision)
    engine = _open(backend, bundle, device_id, threads, chosen)
    engine.precision_reason = why
    return engine


def _open(backend: str, bundle: Bundle, device_id: int, threads: int | None, precision: str) -> Engine:
    if backend == "tensorrt":
        return TensorRTEngine(bundle, device_id)
    if backend.startswith("onnxruntime-"):
        return OrtEngine(bundle, backend.split("-", 1)[1], device_id, threads, precision)
    if backend == "torch-cuda":
        return TorchEngine(bundle, f"cuda:{device_id}")
    if backend == "torch-cpu":
        return TorchEngine(bundle, "cpu")
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def expand_backends(prefer: str | Sequence[str]) -> list[str]:
    """Backend names in order, families ("auto", "onnxruntime", "torch") expanded, each once."""
    order: list[str] = []
    for n in [prefer] if isinstance(prefer, str) else prefer:
        if n not in FAMILIES and n not in BACKENDS:
            raise ValueError(f"unknown backend {n!r}; choose from {', '.join(('auto', *FAMILIES, *BACKENDS))}")
        order += [b for b in FAMILIES.get(n, (n,)) if b not in order]
    return order


def open_engine(bundle: Bundle | str, prefer: str | Sequence[str] = "auto", *, device_id: int = 0,
                threads: int | None = None, precision: str = "auto") -> Engine:
    """The first backend of `prefer` that loads here, in the precision `choose_precision` picks.

    prefer: "auto" (tensorrt > onnxruntime-cuda > onnxruntime-cpu > torch-cuda > torch-cpu),
    a family ("onnxruntime", "torch"), one backend name, or a sequence of them. A backend
    named alone that cannot run raises EngineError with the reason; in a list, failures
    are logged and the next one is tried. precision: "auto" (a quantized bundle's checked int8
    graphs on onnxruntime-cpu, else fp32), "fp32" or "int8" (onnxruntime-cpu only).
    """
    bundle = load_bundle(bundle)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    order = expand_backends(prefer)
    reasons = []
    for backend in order:
        why = _unavailable(backend, bundle, device_id) if len(order) > 1 else ""
        if why:   # in a list, skip cheaply what cannot work here
            reasons.append(f"{backend}: {why}")
            continue
        try:
            engine = _make(backend, bundle, device_id, threads, precision)
        except (EngineError, ImportError, OSError) as e:
            reasons.append(str(e))
            log.info("backend %s unavailable: %s", backend, e)
            continue
        if reasons:
            log.info("using %s (skipped: %s)", engine.backend, "; ".join(reasons))
        log.info("%s runs %s: %s", engine.backend, engine.precision, engine.precision_reason)
        return engine
    names = [prefer] if isinstance(prefer, str) else list(prefer)
    raise EngineError(f"no inference backend of {names} works here: " + "; ".join(reasons))


def _unavailable(backend: str, bundle: Bundle, device_id: int) -> str:
    """Why a backend cannot run here, from cheap checks (no session, no GPU context); '' if it may."""
    if backend == "tensorrt":
        return usable_engines(bundle, device_id)[1]
    if backend == "onnxruntime-cuda":
        try:
            ort = require("onnxruntime", "gpu", what=backend)
        except MissingExtra as e:
            return str(e)
        return "" if "CUDAExecutionProvider" in ort.get_available_providers() else "no CUDAExecutionProvider"
    if backend == "torch-cuda":
        return "" if cuda_compute_capability(device_id) else "no CUDA GPU visible to torch"
    return ""


__all__ = ["Engine", "EngineError", "OrtEngine", "TorchEngine", "TensorRTEngine", "TrtModule",
           "open_engine", "expand_backends", "usable_engines", "cuda_compute_capability", "choose_precision",
           "cpu_flags", "int8_cpu_features", "BACKENDS", "PRECISIONS", "INT8_BACKEND", "INT8_CPU_FLAGS"]

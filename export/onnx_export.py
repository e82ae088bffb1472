"""A run's modules -> `<modality>.onnx` per branch + fusion.onnx (dynamic batch, fixed opset),
and the same modules as `torch.export` programs (`torch/<module>.pt2`) for the PyTorch backend.

Graph input/output names come from dimml.bundle.module_io (derived from the modality specs).
Also the fp16 conversion used before a TensorRT --fp16 build (TensorRT 11 has no FP16
builder flag: precision comes from the ONNX types of a strongly typed network).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from dimml.bundle import FUSION, module_io
from dimml.modalities import PreprocessConfig

OPSET = 18             # supported by ONNX Runtime >= 1.14 and TensorRT 10/11's ONNX parser
EXPORTERS = ("dynamo", "torchscript")
MAX_BATCH_DIM = 1 << 16
# ONNX protobufs cannot exceed 2 GB; above this, weights go to an external-data file
INLINE_LIMIT_BYTES = 1 << 30


class CastFirst(nn.Module):
    """A branch of a uint8 modality with the uint8 -> float cast as the graph's first op.

    The stack encoder normalises inside ((x.float() - mean) / std), so numerics are unchanged;
    casting before the transpose/reshape keeps uint8 only on the graph input, which TensorRT
    requires of uint8 tensors.
    """

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.branch(x.float())


def run_modules(model: Any) -> dict[str, nn.Module]:
    """The model's exported modules {modality: branch, ..., "fusion": head}, in eval mode."""
    return {k: m.eval() for k, m in model.modules().items()}


def example_inputs(module: str, preprocess: PreprocessConfig, feature_dim: int, batch: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the module's exact input shapes and dtypes."""
    g = torch.Generator().manual_seed(seed)
    if module == FUSION:
        return tuple(torch.randn(batch, feature_dim, generator=g) for _ in preprocess.names)
    spec = preprocess.spec(module)
    if np.issubdtype(spec.dtype, np.floating):   # e.g. a log spectrogram: values around -8 +- 3
        return (torch.randn(batch, *spec.shape, generator=g) * 3 - 8,)
    info = np.iinfo(spec.dtype)
    return (torch.randint(int(info.min), int(info.max) + 1, (batch, *spec.shape), generator=g,
                          dtype=getattr(torch, spec.dtype.name)),)


def dynamic_batch(module: nn.Module, n_args: int, batch: Any) -> dict[str, Any]:
    """torch.export's dynamic_shapes: dim 0 of every positional argument (varargs included)."""
    out: dict[str, Any] = {}
    taken = 0
    for p in list(inspect.signature(module.forward).parameters.values()):
        if taken >= n_args:
            break
        if p.kind == p.VAR_POSITIONAL:
            out[p.name] = tuple({0: batch} for _ in range(n_args - taken))
            taken = n_args
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            out[p.name] = {0: batch}
            taken += 1
    return out


def onnx_module(module: str, m: nn.Module, preprocess: PreprocessConfig) -> nn.Module:
    """What goes into the ONNX graph: integer-input branches cast first (CastFirst)."""
    if module != FUSION and not np.issubdtype(preprocess.spec(module).dtype, np.floating):
        return CastFirst(m)
    return m


def export_module(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
                  output_names: tuple[str, ...], path: Path, *, opset: int = OPSET,
                  exporter: str = "dynamo") -> list[Path]:
    """Export one module with a symbolic batch dimension; returns the files written.

    Small models are saved with every tensor inline (one self-contained .onnx file); over
    INLINE_LIMIT_BYTES the weights go to `<name>.onnx.data` beside it, which the caller
    must ship (the bundle checksums every file in its folder).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    n_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    external = n_bytes > INLINE_LIMIT_BYTES
    data_name = path.name + ".data"
    module = module.eval()
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH_DIM)
        with _quiet_exporter():
            program = torch.onnx.export(module, args, dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=opset,
                                        dynamic_shapes=dynamic_batch(module, len(args), batch),
                                        verbose=False)
        program.save(str(path), external_data=external)
        if external:   # the exporter names the data file itself; normalise so we know it
            model = onnx.load(str(path))
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # legacy exporter, chosen on purpose
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset,
                              dynamic_axes={n: {0: "batch"} for n in (*input_names, *output_names)})
        if external:
            model = onnx.load(str(path))
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name)
    return [path] + ([path.with_name(data_name)] if external else [])


def export_program(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> Path:
    """`torch.export` the module with a dynamic batch and save it (`torch.export.save`)."""
    import io

    from dimml.fileio import atomic_write_bytes

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH_DIM)
    with _quiet_exporter():
        program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_batch(module, len(args), batch))
    buf = io.BytesIO()   # (torch.export.save wants a name ending in .pt2 or a buffer)
    torch.export.save(program, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter's noise (a warning per missing torchvision op...): not ours to show."""
    lg = logging.getLogger("torch.onnx._internal.exporter._registration")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch-internal deprecations and a note on our one shared batch axis name
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
            yield
    finally:
        lg.setLevel(old)


def export_model(model: Any, preprocess: PreprocessConfig, feature_dim: int, out_dir: Path, *,
                 opset: int = OPSET, exporter: str = "dynamo", progress=None) -> dict[str, dict]:
    """Write `<module>.onnx` for every module into out_dir; returns the manifest's onnx.modules entries."""
    modules = run_modules(model)
    io = module_io(preprocess)
    if list(modules) != list(io):
        raise ValueError(f"the model's modules {list(modules)} are not the preprocessing's {list(io)}")
    entries = {}
    for name, module in modules.items():
        inputs, outputs = io[name]
        path = out_dir / f"{name}.onnx"
        files = export_module(onnx_module(name, module, preprocess),
                              example_inputs(name, preprocess, feature_dim), inputs, outputs,
                              path, opset=opset, exporter=exporter)
        check_onnx(path, inputs, outputs, opset)
        entries[name] = {"file": path.name, "inputs": list(inputs), "outputs": list(outputs),
                         "external_data": [f.name for f in files[1:]]}
        if progress is not None:
            progress.update(1)
    return entries


def export_programs(model: Any, preprocess: PreprocessConfig, feature_dim: int, out_dir: Path,
                    progress=None) -> dict[str, str]:
    """Write `torch/<module>.pt2` for every module; returns {module: path relative to out_dir}."""
    programs = {}
    for name, module in run_modules(model).items():
        rel = f"torch/{name}.pt2"
        export_program(module, example_inputs(name, preprocess, feature_dim), out_dir / rel)
        programs[name] = rel
        if progress is not None:
            progress.update(1)
    return programs


def check_onnx(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], opset: int) -> None:
    """Full onnx.checker (with shape inference) plus our contract: names, opset, symbolic batch."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    got_in = tuple(i.name for i in model.graph.input)
    got_out = tuple(o.name for o in model.graph.output)
    if got_in != inputs or got_out != outputs:
        raise RuntimeError(f"{path}: graph io {got_in} -> {got_out}, expected {inputs} -> {outputs}")
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version != opset:
        raise RuntimeError(f"{path}: opset {version}, expected {opset}")
    for v in (*model.graph.input, *model.graph.output):
        d0 = v.type.tensor_type.shape.dim[0]
        if not d0.dim_param:
            raise RuntimeError(f"{path}: {v.name} has a fixed batch dimension ({d0.dim_value})")


def check_parity(model: Any, preprocess: PreprocessConfig, feature_dim: int, out_dir: Path,
                 programs: Mapping[str, str] | None = None, batches: tuple[int, ...] = (1, 3),
                 atol: float = 1e-4) -> float:
    """ONNX Runtime (CPU) and the saved torch programs vs the PyTorch modules on random inputs
    at a few batch sizes; raises over atol (relative to the output's scale: scaled_diff).

    A cheap guard at export time; `python -m export verify` does the real check on decoded clips.
    """
    import onnxruntime as ort

    io = module_io(preprocess)
    worst = 0.0
    for name, module in run_modules(model).items():
        sess = ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        program = torch.export.load(str(out_dir / programs[name])).module() if programs else None
        for b in batches:
            args = example_inputs(name, preprocess, feature_dim, batch=b, seed=b)
            with torch.inference_mode():
                ref = _tuple(module(*args))
                got = {"onnx": sess.run(None, {n: a.numpy() for n, a in zip(io[name][0], args)})}
                if program is not None:
                    got["torch.export"] = [t.numpy() for t in _tuple(program(*args))]
            for what, outs in got.items():
                for r, g in zip(ref, outs):
                    diff = scaled_diff(r.numpy(), g)
                    worst = max(worst, diff)
                    if not diff <= atol:
                        raise RuntimeError(f"{name} ({what}) differs from PyTorch by {diff:.3g} (> {atol}, "
                                           f"relative to the output's scale) at batch {b}: the export is wrong")
    return worst


def scaled_diff(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref - got| / max(1, max |ref|): float32 agreement for outputs of any magnitude.

    A trained branch can give logits of 100+ on inputs far from its data; float32 rounding of
    a different kernel order then differs by ~1e-6 relative, i.e. > 1e-4 absolute.
    """
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(ref - np.asarray(got, dtype=np.float64)).max(initial=0.0)) / max(1.0, float(np.abs(ref).max(initial=0.0)))


def _tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---------------------------------------------------------------------------------------
# fp16 (for TensorRT strongly typed builds)

def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 graph -> fp16 compute with fp32 inputs/outputs kept (a Cast at each float IO).

    Float initializers and float constants become fp16, Cast-to-float becomes Cast-to-fp16
    (a uint8 branch's cast to float), and intermediate type annotations are dropped so
    they are re-inferred. Non-float IO (uint8 frames, flow, images) is untouched. Written for the graphs
    exported here (conv/gemm/pool/elementwise); accumulation precision is TensorRT's choice.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())   # never edit the caller's copy
    g = model.graph
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16

    def half(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)

    for i, init in enumerate(g.initializer):
        if init.data_type == F:
            g.initializer[i].CopyFrom(half(init))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == F:
                a.i = H
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F:
                a.t.CopyFrom(half(a.t))

    def rename(old: str, new: str) -> None:
        for node in g.node:
            node.input[:] = [new if x == old else x for x in node.input]
            node.output[:] = [new if x == old else x for x in node.output]

    head, tail = [], []
    for v in g.input:
        if v.type.tensor_type.elem_type == F:
            rename(v.name, v.name + "__fp16")
            head.append(helper.make_node("Cast", [v.name], [v.name + "__fp16"], to=H, name=v.name + "__to_fp16"))
    for v in g.output:
        if v.type.tensor_type.elem_type == F:
            rename(v.name, v.name + "__fp16")
            tail.append(helper.make_node("Cast", [v.name + "__fp16"], [v.name], to=F, name=v.name + "__to_fp32"))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


__all__ = ["export_model", "export_module", "export_programs", "export_program", "check_onnx", "check_parity",
           "scaled_diff",
           "convert_fp16", "example_inputs", "dynamic_batch", "CastFirst", "OPSET", "EXPORTERS"]

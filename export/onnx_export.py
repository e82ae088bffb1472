"""A run's three modules -> audio.onnx, visual.onnx, fusion.onnx (dynamic batch, fixed opset).

Also the fp16 conversion used before a TensorRT --fp16 build (TensorRT 11 has no FP16
builder flag: precision comes from the ONNX types of a strongly typed network).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from dimml.bundle import MODULE_IO
from dimml.config import PreprocessConfig
from training.models import AVModel

OPSET = 18             # supported by ONNX Runtime >= 1.14 and TensorRT 10/11's ONNX parser
EXPORTERS = ("dynamo", "torchscript")
MAX_BATCH_DIM = 1 << 16
# ONNX protobufs cannot exceed 2 GB; above this, weights go to an external-data file
INLINE_LIMIT_BYTES = 1 << 30


class CastFirst(nn.Module):
    """Visual branch with the uint8 -> float cast as the graph's first op.

    VisualEncoder normalises inside (x.float() - mean) / std, so numerics are unchanged;
    casting before the transpose/reshape keeps uint8 only on the graph input, which TensorRT
    requires of uint8 tensors.
    """

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.branch(frames.float())


def example_inputs(module: str, preprocess: PreprocessConfig, feature_dim: int, batch: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the module's exact input shapes and dtypes."""
    g = torch.Generator().manual_seed(seed)
    if module == "audio":
        return (torch.randn(batch, *preprocess.spectrogram_shape, generator=g) * 3 - 8,)
    if module == "visual":
        return (torch.randint(0, 256, (batch, *preprocess.frames_shape), generator=g, dtype=torch.uint8),)
    return (torch.randn(batch, feature_dim, generator=g), torch.randn(batch, feature_dim, generator=g))


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
        params = list(inspect.signature(module.forward).parameters)
        with _quiet_exporter():
            program = torch.onnx.export(module, args, dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=opset,
                                        dynamic_shapes={p: {0: batch} for p in params[:len(args)]},
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


def export_model(model: AVModel, preprocess: PreprocessConfig, feature_dim: int, out_dir: Path, *,
                 opset: int = OPSET, exporter: str = "dynamo", progress=None) -> dict[str, dict]:
    """Write the three ONNX files into out_dir; returns the manifest's onnx.modules entries."""
    modules = {"audio": model.audio, "visual": CastFirst(model.visual), "fusion": model.fusion}
    entries = {}
    for name, module in modules.items():
        inputs, outputs = MODULE_IO[name]
        path = out_dir / f"{name}.onnx"
        files = export_module(module, example_inputs(name, preprocess, feature_dim), inputs, outputs,
                              path, opset=opset, exporter=exporter)
        check_onnx(path, inputs, outputs, opset)
        entries[name] = {"file": path.name, "inputs": list(inputs), "outputs": list(outputs),
                         "external_data": [f.name for f in files[1:]]}
        if progress is not None:
            progress.update(1)
    return entries


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


def check_parity(model: AVModel, preprocess: PreprocessConfig, feature_dim: int, out_dir: Path,
                 batches: tuple[int, ...] = (1, 3), atol: float = 1e-4) -> float:
    """ONNX Runtime (CPU) vs PyTorch on random inputs at a few batch sizes; raises over atol.

    A cheap guard at export time; `python -m export verify` does the real check on decoded clips.
    """
    import onnxruntime as ort

    modules = {"audio": model.audio, "visual": model.visual, "fusion": model.fusion}
    worst = 0.0
    for name, module in modules.items():
        sess = ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for b in batches:
            args = example_inputs(name, preprocess, feature_dim, batch=b, seed=b)
            with torch.inference_mode():
                ref = module(*args)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = sess.run(None, {n: a.numpy() for n, a in zip(MODULE_IO[name][0], args)})
            for r, g in zip(ref, got):
                diff = float(np.abs(r.numpy() - g).max())
                worst = max(worst, diff)
                if not diff <= atol:
                    raise RuntimeError(f"{name}.onnx differs from PyTorch by {diff:.3g} (> {atol}) "
                                       f"at batch {b}: the export is wrong")
    return worst


# ---------------------------------------------------------------------------------------
# fp16 (for TensorRT strongly typed builds)

def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 graph -> fp16 compute with fp32 inputs/outputs kept (a Cast at each float IO).

    Float initializers and float constants become fp16, Cast-to-float becomes Cast-to-fp16
    (the visual graph's uint8 -> float), and intermediate type annotations are dropped so
    they are re-inferred. Non-float IO (uint8 frames) is untouched. Written for the graphs
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


__all__ = ["export_model", "export_module", "check_onnx", "check_parity", "convert_fp16",
           "example_inputs", "CastFirst", "OPSET", "EXPORTERS"]

"""Export: tiny run -> bundle (ONNX checked, parity on real clips), tamper refusal, model store."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dimml.bundle import MANIFEST, SCHEMA_VERSION, BundleError, load_bundle, sha256_file, write_manifest
from dimml.config import PREPROCESS_PRESETS
from export.cli import main
from training.models import build_av_model, build_model_config
from training.run import load_run, run_config_fields, save_run_model

CLASSES = ["cat", "dog", "owl"]
REPO = Path(__file__).resolve().parents[1]


def make_tiny_run(run_dir: Path, seed: int = 0, temperature: float = 0.7) -> Path:
    """A random-weight tiny run with a report, as training would leave it."""
    torch.manual_seed(seed)
    pp = PREPROCESS_PRESETS["tiny"]
    cfg = build_model_config("tiny", len(CLASSES), pp.num_frames, fusion="concat")
    config = {"method": "dimml", "preset": "tiny", **run_config_fields(pp, cfg, CLASSES), "lw_temperature": 1.0}
    save_run_model(run_dir, config, build_av_model(cfg))
    # the shape training.evaluate writes (abridged)
    (run_dir / "report.json").write_text(json.dumps({
        "method": "dimml", "primary": "weighted", "eval_split": "test", "lw_temperature": temperature,
        "metrics": {"weighted": {"accuracy": 0.42}, "fused": {"accuracy": 0.4}}}))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny-run")


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory) -> Path:
    """Built once through the CLI with the default (dynamo) exporter."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assert main(["bundle", "--run", str(run_dir), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from training.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("data") / "synth"
    synthesize(out, SynthConfig(classes=3, per_class=3, width=64, height=48, duration_s=1.0), progress=False)
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bundle_layout_and_onnx_checker(bundle_dir, run_dir):
    names = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
    assert names == ["audio.onnx", "fusion.onnx", MANIFEST, "torch/config.json", "torch/model.pt",
                     "torch/report.json", "visual.onnx"]   # small models: weights inline, no .data
    pp = PREPROCESS_PRESETS["tiny"]
    want_inputs = {"audio": [("spectrogram", onnx.TensorProto.FLOAT, list(pp.spectrogram_shape))],
                   "visual": [("frames", onnx.TensorProto.UINT8, list(pp.frames_shape))],
                   "fusion": [("audio_features", onnx.TensorProto.FLOAT, [64]),
                              ("visual_features", onnx.TensorProto.FLOAT, [64])]}
    for module, inputs in want_inputs.items():
        path = bundle_dir / f"{module}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert model.opset_import[0].version == 18
        got = [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim[1:]])
               for v in model.graph.input]
        assert got == inputs
        for v in [*model.graph.input, *model.graph.output]:
            assert v.type.tensor_type.shape.dim[0].dim_param, f"{module}:{v.name} batch is not dynamic"
    # the visual graph casts uint8 first: normalisation inside, uint8 only at the input
    vis = onnx.load(str(bundle_dir / "visual.onnx"))
    assert vis.graph.node[0].op_type == "Cast" and vis.graph.node[0].input[0] == "frames"


def test_manifest_contents_and_roundtrip(bundle_dir, run_dir):
    run = load_run(run_dir)
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert b.classes == CLASSES and b.preprocess == run.preprocess
    assert m["preprocess"] == json.loads((run_dir / "config.json").read_text())["preprocess"]
    assert b.temperature == 0.7 == run.lw_temperature        # the fitted T from the report
    assert m["metrics"] == {"eval_split": "test", "primary": "weighted",
                            "weighted": {"accuracy": 0.42}, "fused": {"accuracy": 0.4}}
    assert (m["feature_dim"], m["num_frames"], m["fusion"]) == (64, 2, "concat")
    assert m["onnx"]["opset"] == 18 and set(m["onnx"]["modules"]) == {"audio", "visual", "fusion"}
    assert {"dimml", "torch", "onnx", "onnxruntime", "python"} <= set(m["versions"])
    files = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == files
    for rel, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(bundle_dir / rel)
    # round trip: the manifest rewritten from its own fields is the same manifest
    again = json.loads(json.dumps(m))
    assert load_bundle(bundle_dir).manifest == again
    assert b.model_info() == {"name": "tiny-run", "version": m["version"]}


def test_tampered_or_incompatible_bundle_refused(bundle_dir, tmp_path):
    b = copy_bundle(bundle_dir, tmp_path / "flip")
    data = bytearray((b / "fusion.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "fusion.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"fusion\.onnx: checksum mismatch"):
        load_bundle(b)

    b = copy_bundle(bundle_dir, tmp_path / "missing")
    (b / "torch" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"model\.pt: file of the bundle is missing"):
        load_bundle(b)

    b = copy_bundle(bundle_dir, tmp_path / "schema")
    m = json.loads((b / MANIFEST).read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 2 is not supported"):
        load_bundle(b)

    b = copy_bundle(bundle_dir, tmp_path / "escape")
    m = json.loads((b / MANIFEST).read_text())
    m["files"]["../outside"] = {"sha256": "0", "bytes": 0}
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="points outside the bundle"):
        load_bundle(b)

    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json missing"):
        load_bundle(tmp_path / "empty")


def test_export_refuses_existing_out(run_dir, bundle_dir, capsys):
    assert main(["bundle", "--run", str(run_dir), "--out", str(bundle_dir), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_bundle(bundle_dir)   # untouched


def test_verify_passes_on_real_clips(bundle_dir, data_dir, tmp_path, capsys):
    report = tmp_path / "verify.json"
    rc = main(["verify", str(bundle_dir), "--data", str(data_dir), "--batch-sizes", "1,4",
               "--quiet", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(report.read_text())
    assert summary["passed"] and summary["clips"] == 9
    checks = {(c["backend"], c["batch_size"]) for c in summary["checks"]}
    assert {("onnxruntime-cpu", 1), ("onnxruntime-cpu", 4)} <= checks
    for c in summary["checks"]:
        assert c["max_abs_diff"] <= 1e-4 and c["top1_agreement"] == 1.0


def test_verify_fails_when_onnx_and_weights_disagree(bundle_dir, data_dir, tmp_path, capsys):
    """A bundle whose torch weights are not what was exported: verify must exit non-zero."""
    b = copy_bundle(bundle_dir, tmp_path / "drift")
    state = torch.load(b / "torch" / "model.pt", weights_only=True)
    state["fusion"]["fc.bias"] += 0.5   # fusion logits drift, branches stay equal
    torch.save(state, b / "torch" / "model.pt")
    m = json.loads((b / MANIFEST).read_text())
    write_manifest(b, {k: v for k, v in m.items() if k not in ("schema_version", "format", "version", "files")})
    rc = main(["verify", str(b), "--data", str(data_dir), "--batch-sizes", "2", "--limit", "4", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out and "parity FAILED" in out


def test_fp16_conversion_keeps_fp32_io(bundle_dir, tmp_path):
    """The mixed-precision ONNX fed to TensorRT --fp16, checked in ONNX Runtime on the CPU."""
    import onnxruntime as ort
    from export.onnx_export import convert_fp16

    rng = np.random.default_rng(0)
    pp = PREPROCESS_PRESETS["tiny"]
    feeds = {"audio": {"spectrogram": (rng.normal(size=(5, *pp.spectrogram_shape)) * 3 - 8).astype(np.float32)},
             "visual": {"frames": rng.integers(0, 256, (5, *pp.frames_shape), dtype=np.uint8)}}
    for module, feed in feeds.items():
        half = convert_fp16(onnx.load(str(bundle_dir / f"{module}.onnx")))
        onnx.checker.check_model(half, full_check=True)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
        path = tmp_path / f"{module}.fp16.onnx"
        onnx.save(half, str(path))
        ref = ort.InferenceSession(str(bundle_dir / f"{module}.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        for r, g in zip(ref, got):
            assert g.dtype == np.float32
            cos = (r * g).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(g, axis=1)
            assert cos.min() >= 0.999
            assert not np.array_equal(r, g)   # it really computed in fp16


def test_register_and_load_from_model_store(bundle_dir, tmp_path):
    """In a subprocess: BentoML resolves BENTOML_HOME once per process."""
    code = f"""
import json
from dimml.bundle import load_bundle, register_bundle
tag = register_bundle({str(bundle_dir)!r}, "tiny-av")
b = load_bundle(tag)
latest = load_bundle("tiny-av")
print(json.dumps({{"tag": tag, "path": str(b.path), "classes": b.classes, "version": b.version,
                  "latest": latest.tag}}))
"""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["tag"].startswith("tiny-av:") and got["latest"] == got["tag"]
    assert got["path"].startswith(str(tmp_path / "bentoml" / "models"))
    assert got["classes"] == CLASSES and got["version"] == load_bundle(bundle_dir).version
    # a tampered copy in the store is refused like a folder
    stored = Path(got["path"])
    (stored / "audio.onnx").write_bytes(b"not a model")
    res = subprocess.run([sys.executable, "-c", f"from dimml.bundle import load_bundle; load_bundle({got['tag']!r})"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "checksum mismatch" in res.stderr


def _tensorrt_ready() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if not torch.cuda.is_available():   # never construct a TensorRT runtime without a GPU
        return "no CUDA GPU"
    return ""


@pytest.mark.tensorrt
@pytest.mark.skipif(bool(_tensorrt_ready()), reason=_tensorrt_ready() or "ready")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engines(run_dir, data_dir, tmp_path, fp16):
    out = tmp_path / "trt"
    args = ["bundle", "--run", str(run_dir), "--out", str(out), "--tensorrt", "--max-batch", "8",
            "--timing-cache", str(tmp_path / "timing.cache"), "--quiet"] + (["--fp16"] if fp16 else [])
    assert main(args) == 0
    b = load_bundle(out)
    assert len(b.engines) == 3 and {e["precision"] for e in b.engines} == {"fp16" if fp16 else "fp32"}
    assert (tmp_path / "timing.cache").stat().st_size > 0
    from dimml.engines import open_engine
    assert open_engine(b).backend == "tensorrt"
    assert main(["verify", str(out), "--data", str(data_dir), "--backend", "tensorrt",
                 "--batch-sizes", "1,4", "--quiet"]) == 0

"""Export: tiny runs of every setting -> bundles (ONNX checked, parity with the torch programs and
the run's modules, verify on real media), the schema-1 bundle format, tamper refusal, model store."""
from __future__ import annotations

import ast
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

from dimml.bundle import (
    FUSION,
    MANIFEST,
    SCHEMA_VERSION,
    BundleError,
    load_bundle,
    module_io,
    sha256_file,
    write_manifest,
)
from dimml.engines import EngineError, open_engine
from dimml.modalities import preprocess_for
from dimml.predict import Predictor
from export.cli import main
from training.run import load_run

from conftest import REPO, SETTINGS, TINY_CLASSES, default_fast, make_tiny_run, random_arrays, setting_id

CLASSES = list(TINY_CLASSES)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny-run", "audio,visual")


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory) -> Path:
    """audio,visual built once through the CLI with the default (dynamo) exporter."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assert main(["bundle", "--run", str(run_dir), "--out", str(out), "--quiet"]) == 0
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def check_bundle_files(bundle: Path, setting: str) -> None:
    """One graph and one torch program per modality and fusion, the run's config and report."""
    cfg = preprocess_for("tiny", setting)
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    modules = [*cfg.names, FUSION]
    assert names == sorted([MANIFEST, "torch/config.json", "torch/report.json",
                            *(f"{m}.onnx" for m in modules), *(f"torch/{m}.pt2" for m in modules)])
    io = module_io(cfg)
    for spec in cfg.modalities:
        model = onnx.load(str(bundle / f"{spec.name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 18
        [inp] = model.graph.input
        want_type = onnx.helper.np_dtype_to_tensor_dtype(spec.dtype)
        assert (inp.name, inp.type.tensor_type.elem_type) == (spec.onnx_input, want_type) == (io[spec.name][0][0], want_type)
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(spec.shape)
        assert [o.name for o in model.graph.output] == ["features", "logits"]
        if spec.dtype == np.uint8:   # the branch casts uint8 first: uint8 only at the graph input
            readers = [n.op_type for n in model.graph.node if spec.onnx_input in n.input]
            assert readers == ["Cast"]
        for v in [*model.graph.input, *model.graph.output]:
            assert v.type.tensor_type.shape.dim[0].dim_param, f"{spec.name}:{v.name} batch is not dynamic"
    fusion = onnx.load(str(bundle / "fusion.onnx"))
    onnx.checker.check_model(fusion, full_check=True)
    assert [i.name for i in fusion.graph.input] == [f"{n}_features" for n in cfg.names]
    assert [o.name for o in fusion.graph.output] == ["logits"]


def test_module_io_is_derived_from_the_specs():
    assert module_io(preprocess_for("tiny", "front:image,rear:image")) == {
        "front": (("image",), ("features", "logits")), "rear": (("image",), ("features", "logits")),
        "fusion": (("front_features", "rear_features"), ("logits",))}
    # audio,visual: exactly the names of schema-1 bundles
    assert module_io(preprocess_for("tiny", "audio,visual")) == {
        "audio": (("spectrogram",), ("features", "logits")), "visual": (("frames",), ("features", "logits")),
        "fusion": (("audio_features", "visual_features"), ("logits",))}
    assert list(module_io(preprocess_for("tiny", "audio,visual,flow"))["fusion"][0]) == [
        "audio_features", "visual_features", "flow_features"]


def test_parity_tolerance_scales_with_the_outputs():
    """1e-4 of the output's scale: float32 rounding of large trained logits passes, a real drift does not."""
    from export.onnx_export import scaled_diff

    big = np.array([[150.0, -20.0]], dtype=np.float32)
    assert scaled_diff(big, big + np.float32(3e-4)) < 1e-4          # ~2e-6 relative: rounding
    assert scaled_diff(big, big + np.float32(0.1)) > 1e-4           # a drift
    small = np.array([[0.5, -0.2]], dtype=np.float32)
    assert scaled_diff(small, small + np.float32(3e-4)) > 1e-4      # below 1: absolute


def test_dynamo_bundle_layout_and_onnx_checker(bundle_dir):
    check_bundle_files(bundle_dir, "audio,visual")


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_bundle_layout_per_setting(tiny_bundle, setting):
    check_bundle_files(tiny_bundle(setting), setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_export_parity_onnxruntime_vs_torch(tiny_bundle, setting):
    """ORT and the torch.export programs (the PyTorch backend) agree with the run's own modules."""
    bundle = tiny_bundle(setting)
    run = load_run(bundle.parent / "tiny-run")
    ort_engine, torch_engine = open_engine(bundle, "onnxruntime-cpu"), open_engine(bundle, "torch-cpu")
    assert (ort_engine.backend, torch_engine.backend) == ("onnxruntime-cpu", "torch-cpu")
    for n in (1, 3):
        arrays = random_arrays(setting, n, seed=n)
        feats = {}
        for name, x in arrays.items():
            with torch.inference_mode():
                ref = [t.numpy() for t in run.model.branches[name](torch.from_numpy(x))]
            for engine in (ort_engine, torch_engine):
                got = engine.branch(name, x)
                for r, g in zip(ref, got):
                    assert g.dtype == np.float32 and g.shape == r.shape
                    np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)
            feats[name] = ref[0]
        with torch.inference_mode():
            ref = run.model.fusion(*(torch.from_numpy(feats[m]) for m in run.model.names)).numpy()
        for engine in (ort_engine, torch_engine):
            np.testing.assert_allclose(engine.fusion([feats[m] for m in run.model.names]), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="fusion takes"):
        ort_engine.fusion([feats[run.model.names[0]]])


def test_manifest_contents_and_roundtrip(bundle_dir, run_dir):
    run = load_run(run_dir)
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION == 2
    assert b.classes == CLASSES and b.preprocess == run.preprocess
    assert m["preprocess"] == run.preprocess.to_dict() and "modalities" in m["preprocess"]
    assert m["modalities"] == ["audio", "visual"] and m["fields"] == ["video"] and b.fields == ("video",)
    assert b.temperature == 0.7 == run.lw_temperature        # the fitted T from the report
    assert m["metrics"] == {"eval_split": "test", "final": {"accuracy": 0.42}, "fusion": {"accuracy": 0.4}}
    assert m["final_output"]["name"] == "paper-lw" and m["final_output"]["temperature"] == 0.7
    assert b.final_output == run.final_output and b.final_output.reason == run.final_output.reason
    assert (m["feature_dim"], m["fusion"]) == (64, "concat") and "num_frames" not in m
    assert m["onnx"]["opset"] == 18 and set(m["onnx"]["modules"]) == {"audio", "visual", "fusion"}
    assert m["torch"]["programs"] == {k: f"torch/{k}.pt2" for k in ("audio", "visual", "fusion")}
    assert {"dimml", "torch", "onnx", "onnxruntime", "python"} <= set(m["versions"])
    files = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == files
    for rel, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(bundle_dir / rel)
    again = json.loads(json.dumps(m))
    assert load_bundle(bundle_dir).manifest == again
    assert b.model_info() == {"name": "tiny-run", "version": m["version"]}


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_manifest_lists_the_specs(tiny_bundle, setting):
    b = load_bundle(tiny_bundle(setting))
    cfg = preprocess_for("tiny", setting)
    assert b.preprocess == cfg and b.modalities == cfg.names and b.fields == cfg.fields
    assert [s["name"] for s in b.manifest["preprocess"]["modalities"]] == list(cfg.names)
    assert b.manifest["fields"] == list(cfg.fields)
    assert b.modules == (*cfg.names, FUSION)


# the manifest of a schema-1 bundle (the format before modalities were declared), for the tiny preset
SCHEMA1_PREPROCESS = {"sample_rate": 16000, "audio_seconds": 2.0, "nperseg": 512, "noverlap": 353,
                      "log_eps": 1e-7, "num_frames": 2, "frame_height": 64, "frame_width": 64,
                      "max_duration_s": 600.0, "max_pixels": 4096 * 4096}


def make_schema1_bundle(src: Path, out: Path) -> Path:
    """A schema-1 bundle as dimml wrote it before: audio.onnx, visual.onnx, fusion.onnx (the io
    names of the time), torch/config.json + model.pt, and the old manifest fields."""
    out.mkdir(parents=True)
    for m in ("audio", "visual", "fusion"):
        shutil.copyfile(src / f"{m}.onnx", out / f"{m}.onnx")
    (out / "torch").mkdir()
    shutil.copyfile(src / "torch" / "config.json", out / "torch" / "config.json")
    (out / "torch" / "model.pt").write_bytes(b"weights of the run (never opened by this dimml)")
    io = {"audio": (["spectrogram"], ["features", "logits"]), "visual": (["frames"], ["features", "logits"]),
          "fusion": (["audio_features", "visual_features"], ["logits"])}
    write_manifest(out, {
        "schema_version": 1, "name": "old-bundle", "classes": CLASSES, "modalities": ["audio", "visual"],
        "preprocess": SCHEMA1_PREPROCESS, "feature_dim": 64, "num_frames": 2, "fusion": "concat",
        "method": "dimml", "lw_temperature": 0.7, "output": "weighted", "metrics": {},
        "onnx": {"opset": 18, "exporter": "dynamo",
                 "modules": {m: {"file": f"{m}.onnx", "inputs": i, "outputs": o, "external_data": []}
                             for m, (i, o) in io.items()}},
        "torch": {"config": "torch/config.json", "weights": "torch/model.pt"}, "max_batch": 32, "versions": {}})
    return out


def test_schema1_bundle_still_loads_and_runs_as_audio_visual(bundle_dir, tmp_path):
    old = make_schema1_bundle(bundle_dir, tmp_path / "old")
    b = load_bundle(old)
    assert b.schema == 1 and b.modalities == ("audio", "visual") and b.fields == ("video",)
    assert b.preprocess == preprocess_for("tiny", "audio,visual")
    assert b.io == load_bundle(bundle_dir).io
    # it runs on ONNX Runtime, with the same answers as the schema-2 bundle of the same graphs
    p_old, p_new = Predictor(old), Predictor(bundle_dir, prefer="onnxruntime-cpu")
    assert p_old.backend == "onnxruntime-cpu"
    arrays = random_arrays("audio,visual", 3, seed=7)
    for a, b2 in zip(p_old.predict_arrays(arrays), p_new.predict_arrays(arrays)):
        assert a["label"] == b2["label"] and a["modalities_used"] == ["audio", "visual"]
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b2["probabilities"].values()), atol=1e-9)
    [solo] = p_old.predict_arrays({"visual": arrays["visual"][:1]})
    assert solo["modalities_used"] == ["visual"] and list(solo["branches"]) == ["visual"]
    # it holds no torch programs: the PyTorch backend says so (and auto never needs it)
    with pytest.raises(EngineError, match="no torch program.*re-export"):
        open_engine(old, "torch-cpu")


def test_tampered_or_incompatible_bundle_refused(bundle_dir, tmp_path):
    b = copy_bundle(bundle_dir, tmp_path / "flip")
    data = bytearray((b / "fusion.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "fusion.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"fusion\.onnx: checksum mismatch"):
        load_bundle(b)

    b = copy_bundle(bundle_dir, tmp_path / "missing")
    (b / "torch" / "visual.pt2").unlink()
    with pytest.raises(BundleError, match=r"visual\.pt2: file of the bundle is missing"):
        load_bundle(b)

    b = copy_bundle(bundle_dir, tmp_path / "schema")
    m = json.loads((b / MANIFEST).read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 3 is not supported"):
        load_bundle(b)

    b = copy_bundle(bundle_dir, tmp_path / "modules")
    m = json.loads((b / MANIFEST).read_text())
    m["modalities"] = ["visual", "audio"]   # not the preprocessing's order
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="differ from the preprocessing"):
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


@pytest.mark.parametrize("setting", default_fast(), ids=setting_id)
def test_verify_passes_on_real_media(tiny_bundle, tiny_corpus, setting, tmp_path, capsys):
    report = tmp_path / "verify.json"
    rc = main(["verify", str(tiny_bundle(setting)), "--data", str(tiny_corpus(setting)), "--batch-sizes", "1,4",
               "--quiet", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(report.read_text())
    names = "+".join(preprocess_for("tiny", setting).names)
    assert summary["passed"] and summary["clips"] == 6 and summary["modalities"] == {names: 6}
    checks = {(c["backend"], c["batch_size"]) for c in summary["checks"]}
    assert {("onnxruntime-cpu", 1), ("onnxruntime-cpu", 4)} <= checks
    for c in summary["checks"]:
        assert c["max_scaled_diff"] <= 1e-4 and c["top1_agreement"] == 1.0


@pytest.mark.slow
def test_verify_on_the_dynamo_bundle(bundle_dir, tiny_corpus, capsys):
    rc = main(["verify", str(bundle_dir), "--data", str(tiny_corpus("audio,visual")), "--batch-sizes", "3", "--quiet"])
    assert rc == 0, capsys.readouterr().out


def test_verify_fails_when_onnx_and_torch_program_disagree(bundle_dir, tiny_corpus, tmp_path, capsys):
    """A bundle whose torch fusion program is not what was exported to ONNX: verify must exit non-zero."""
    b = copy_bundle(bundle_dir, tmp_path / "drift")
    program = torch.export.load(str(b / "torch" / "fusion.pt2"))
    bias = next(k for k in program.state_dict if k.endswith("bias"))
    with torch.no_grad():
        program.state_dict[bias] += 0.5   # fusion logits drift, branches stay equal
    torch.export.save(program, str(b / "torch" / "fusion.pt2"))
    m = json.loads((b / MANIFEST).read_text())
    write_manifest(b, {k: v for k, v in m.items() if k not in ("schema_version", "format", "version", "files")})
    rc = main(["verify", str(b), "--data", str(tiny_corpus("audio,visual")), "--batch-sizes", "2", "--limit", "4",
               "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out and "parity FAILED" in out


@pytest.mark.parametrize("setting", ["audio,visual", "visual,flow"], ids=setting_id)
def test_fp16_conversion_keeps_fp32_io(tiny_bundle, setting, tmp_path):
    """The mixed-precision ONNX fed to TensorRT --fp16, checked in ONNX Runtime on the CPU."""
    import onnxruntime as ort

    from export.onnx_export import convert_fp16

    bundle = tiny_bundle(setting)
    cfg = preprocess_for("tiny", setting)
    for name, x in random_arrays(setting, 5).items():
        feed = {cfg.spec(name).onnx_input: x}
        half = convert_fp16(onnx.load(str(bundle / f"{name}.onnx")))
        onnx.checker.check_model(half, full_check=True)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
        path = tmp_path / f"{name}.fp16.onnx"
        onnx.save(half, str(path))
        ref = ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
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


def _imports(path: Path) -> set[str]:
    """Top-level package names a Python file imports (anywhere in it, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_core_and_clients_never_import_training():
    """dimml/ and clients/ hold no import of training/ (lazy imports included)."""
    offenders = [str(p.relative_to(REPO)) for d in ("dimml", "clients") for p in sorted((REPO / d).rglob("*.py"))
                 if "training" in _imports(p)]
    assert offenders == []


@pytest.mark.slow
def test_torch_backend_and_clients_load_no_training_module(tiny_bundle):
    """Predicting with the PyTorch backend and importing the clients load no training module."""
    code = f"""
import sys
import clients, clients.cli, clients.score
from dimml.predict import Predictor
from dimml.engines import open_engine
p = Predictor({str(tiny_bundle('audio,visual'))!r}, open_engine({str(tiny_bundle('audio,visual'))!r}, "torch-cpu"))
import numpy as np
from dimml.modalities import preprocess_for
arrays = {{s.name: np.zeros((1, *s.shape), s.dtype) for s in preprocess_for("tiny", "audio,visual").modalities}}
assert p.predict_arrays(arrays)[0]["backend"] == "torch-cpu"
print(sorted(m for m in sys.modules if m == "training" or m.startswith("training.")))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def _tensorrt_ready() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if not torch.cuda.is_available():   # never construct a TensorRT runtime without a GPU
        return "no CUDA GPU"
    return ""


@pytest.mark.tensorrt
@pytest.mark.skipif(bool(_tensorrt_ready()), reason=_tensorrt_ready() or "ready")
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_tensorrt_engines(tiny_corpus, tmp_path, fp16, setting):
    run = make_tiny_run(tmp_path / "run", setting)
    out = tmp_path / "trt"
    args = ["bundle", "--run", str(run), "--out", str(out), "--tensorrt", "--max-batch", "8",
            "--timing-cache", str(tmp_path / "timing.cache"), "--quiet"] + (["--fp16"] if fp16 else [])
    assert main(args) == 0
    b = load_bundle(out)
    assert len(b.engines) == len(b.modules) and {e["precision"] for e in b.engines} == {"fp16" if fp16 else "fp32"}
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert open_engine(b).backend == "tensorrt"
    assert main(["verify", str(out), "--data", str(tiny_corpus(setting)), "--backend", "tensorrt",
                 "--batch-sizes", "1,4", "--quiet"]) == 0

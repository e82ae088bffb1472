"""INT8 bundles: a trained tiny run exported with --quantize int8 (calibrated on its training split,
checked against fp32 on its test split), verified, served by a real `bentoml serve` and scored with;
verify refusing int8 graphs whose scales are corrupted, and export refusing a calibration on blank
clips (real accuracy drops, measured on real media); the precision choice and its reasons."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dimml.bundle import FP32, INT8, MANIFEST, load_bundle, write_manifest
from dimml.engines import EngineError, OrtEngine, choose_precision, open_engine
from dimml.predict import Predictor
from export.cli import main as export_main
from export.quantize import ClipSet, Int8Refused, QuantizeOptions, precision_check, quantize_bundle, quantize_modules, run_clips
from training.run import load_run
from training.synth import SynthConfig, synthesize
from training.trainer import TrainConfig, fit

from conftest import SETTINGS, random_arrays, setting_id, start_server, stop_server, wait_ready

# A clean 3-class corpus (48 clips: 24 train, 6 val, 15 test after the synth split) and a short
# `unimodal` run on it: both heads learn it within a few epochs (test accuracy 1.0 measured), so a
# broken int8 graph shows as an accuracy drop. Audio at 8 kHz, 1 s: a 65 x 124 spectrogram keeps
# the run to seconds.
CORPUS = SynthConfig(classes=3, per_class=16, audio_noise=0.0, visual_noise=0.0, duration_s=1.0,
                     val_frac=0.15, test_frac=0.3)
AUDIO = {"audio.sample_rate": 8000, "audio.seconds": 1.0, "audio.nperseg": 128, "audio.noverlap": 64}
CALIBRATION_CLIPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("q-corpus")
    synthesize(root, CORPUS, workers=2, progress=False)
    return root


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q-run") / "run"
    fit(TrainConfig(data=str(corpus), out=str(out), method="unimodal", preset="tiny", batch_size=8, epochs=6,
                    stage2_epochs=2, lr=0.02, preprocess=AUDIO), progress=False)
    return out


@pytest.fixture(scope="module")
def quantized(run_dir, tmp_path_factory) -> Path:
    """The run exported with --quantize int8 by the CLI (default tolerance)."""
    out = tmp_path_factory.mktemp("q-bundle") / "bundle"
    rc = export_main(["bundle", "--run", str(run_dir), "--out", str(out), "--exporter", "torchscript",
                      "--quantize", "int8", "--calibration-clips", str(CALIBRATION_CLIPS), "--quiet"])
    assert rc == 0
    return out


def rewrite_manifest(bundle: Path) -> None:
    """Checksum the bundle's files again after a test changed one (the manifest's other fields kept)."""
    m = json.loads((bundle / MANIFEST).read_text())
    write_manifest(bundle, {k: v for k, v in m.items() if k not in ("schema_version", "format", "version", "files")})


def test_export_records_int8_graphs_calibration_and_check(quantized, run_dir, corpus):
    b = load_bundle(quantized)
    assert b.precisions == (FP32, INT8) and b.manifest["onnx"]["precision"] == FP32
    entry = b.int8
    assert set(entry["modules"]) == set(b.io) == {"audio", "visual", "fusion"}
    for module, e in entry["modules"].items():
        assert e["file"] == f"int8/{module}.onnx" and e["file"] in b.manifest["files"]   # checksummed
        graph = onnx.load(str(quantized / e["file"])).graph
        assert [i.name for i in graph.input] == e["inputs"] == list(b.io[module][0])
        assert [o.name for o in graph.output] == e["outputs"] == list(b.io[module][1])
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        inits = {i.name: i for i in graph.initializer}
        # per-channel int8 weights: a 1-D scale of one value per output channel for every conv/gemm weight
        weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
        assert weight_dq and all(numpy_helper.to_array(inits[n.input[1]]).size > 1 for n in weight_dq)
        # graph outputs stay float (no QDQ pair rounding the logits), and nothing of the pairs is left
        producers = {o: n.op_type for n in graph.node for o in n.output}
        assert all(producers[o.name] != "DequantizeLinear" for o in graph.output)
        assert set(inits) <= {i for n in graph.node for i in n.input}
    cal = entry["calibration"]
    train = {s["files"]["video"] for s in _manifest_rows(corpus) if s["split"] == "train"}
    assert cal["split"] == "train" and cal["clips"] == len(cal["samples"]) == CALIBRATION_CLIPS
    assert set(cal["samples"]) <= train and Path(cal["cache"]).parent.name == ".dimml-cache"
    check = entry["check"]
    assert check["split"] == "test" and check["clips"] == 15
    assert (check["max_accuracy_drop"], check["min_top1_agreement"]) == (1.0, 0.95)
    assert check["passed"] and check["problems"] == []
    # the run is good, and int8 within the tolerance of it
    assert check["fp32_accuracy"] >= 0.9
    assert check["accuracy_drop"] <= 1.0 and check["top1_agreement"] >= 0.95
    assert check["fp32_accuracy"] == pytest.approx(load_run(run_dir).report["metrics"]["final"]["accuracy"])


def _manifest_rows(corpus: Path) -> list[dict]:
    import csv

    with open(corpus / "manifest.csv") as f:
        return [{"files": {"video": r["path"]}, "split": r["split"], "label": r["label"]} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_verify_passes_serves_and_scores_int8(quantized, corpus, tmp_path, capsys):
    # verify: fp32 parity with the torch programs, and int8 against fp32 on the test split
    report = tmp_path / "verify.json"
    rc = export_main(["verify", str(quantized), "--data", str(corpus), "--batch-sizes", "4", "--limit", "8",
                      "--quiet", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS  int8 vs fp32 (onnxruntime-cpu)" in out and "parity OK, int8 OK" in out
    summary = json.loads(report.read_text())
    assert summary["passed"] and summary["int8"]["passed"] and summary["int8"]["clips"] == 15
    assert summary["int8"]["top1_agreement"] >= 0.95 and summary["int8"]["accuracy_drop"] <= 1.0

    # auto serves the checked int8 graphs on the CPU and says why; fp32 on request
    int8 = Predictor(quantized, backend="onnxruntime-cpu")
    assert int8.engine.precision == INT8 and "passed its accuracy check" in int8.engine.precision_reason
    fp32 = Predictor(quantized, backend="onnxruntime-cpu", precision=FP32)
    assert fp32.engine.precision == FP32
    test_files = sorted(str(corpus / r["files"]["video"]) for r in _manifest_rows(corpus) if r["split"] == "test")
    offline = [int8.predict_files({"video": f}) for f in test_files]
    assert all(a["model"]["precision"] == INT8 for a in offline)

    # a real `bentoml serve` of the bundle answers with the int8 graphs, as the Predictor does
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "DIMML_BUNDLE": str(quantized),
           "DIMML_MAX_LATENCY_MS": "30000"}
    proc, url = start_server(env, tmp_path / "serve.log")
    try:
        wait_ready(proc, url, tmp_path / "serve.log")
        meta = httpx.post(f"{url}/metadata", json={}, timeout=30).json()
        assert (meta["backend"], meta["precision"]) == ("onnxruntime-cpu", INT8)
        assert "passed its accuracy check" in meta["precision_reason"]
        for f, want in zip(test_files[:4], offline):
            with open(f, "rb") as fh:
                r = httpx.post(f"{url}/predict", files={"video": (Path(f).name, fh.read())}, timeout=60)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["label"] == want["label"] and got["model"]["precision"] == INT8
            np.testing.assert_allclose(list(got["probabilities"].values()), list(want["probabilities"].values()),
                                       atol=1e-6)
    finally:
        stop_server(proc)

    # batch scoring with the bundle: the int8 answers, and the accuracy of the labelled corpus
    from clients.cli import main as score_main

    results = tmp_path / "scores.csv"
    rc = score_main(["score", str(corpus), "--bundle", str(quantized), "--out", str(results), "--workers", "2",
                     "--recursive", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    import csv

    with open(results) as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 48 and all(not r["error"] for r in rows.values())
    for f, want in zip(test_files, offline):
        assert rows[os.path.relpath(f, corpus)]["label"] == want["label"]
    assert "on onnxruntime-cpu (int8)" in printed
    labels = {r["files"]["video"]: r["label"] for r in _manifest_rows(corpus)}
    right = sum(rows[k]["label"] == labels[k] for k in labels)
    assert f"accuracy {right / 48:.4f} ({right}/48 labelled files)" in printed
    # fp32 on request, from the same bundle
    assert score_main(["score", str(corpus), "--bundle", str(quantized), "--out", str(tmp_path / "fp32.csv"),
                       "--recursive", "--precision", "fp32", "--no-progress"]) == 0
    assert "on onnxruntime-cpu (fp32)" in capsys.readouterr().out


def corrupt_activation_scales(bundle: Path, factor: float) -> None:
    """Scale every activation's quantization scale of every int8 branch by `factor` (a broken
    calibration table), then checksum again: a bundle that still claims its export-time check passed."""
    m = json.loads((bundle / MANIFEST).read_text())
    for module in m["modalities"]:
        path = bundle / m[INT8]["modules"][module]["file"]
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
        assert scales
        for name in scales:
            t = inits[name]
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * factor).astype(np.float32), name))
        onnx.save(model, str(path))
    rewrite_manifest(bundle)


def test_verify_refuses_int8_past_the_tolerance(quantized, corpus, tmp_path, capsys):
    bad = shutil.copytree(quantized, tmp_path / "bad")
    corrupt_activation_scales(bad, 0.1)   # ranges a tenth of the calibrated ones: activations saturate
    assert load_bundle(bad).int8["check"]["passed"]   # what it claims
    report = tmp_path / "verify.json"
    rc = export_main(["verify", str(bad), "--data", str(corpus), "--batch-sizes", "4", "--limit", "4", "--quiet",
                      "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL  int8 vs fp32" in out and "int8 REFUSED: int8 loses" in out and "parity OK, int8 REFUSED" in out
    check = json.loads(report.read_text())["int8"]
    assert not check["passed"] and check["clips"] == 15
    assert check["accuracy_drop"] > check["max_accuracy_drop"] == 1.0
    assert check["int8_accuracy"] < check["fp32_accuracy"] - 0.1     # a real drop, measured on real media
    # the fp32 graphs of the same bundle still verify: the refusal is about int8 only
    assert all(c["passed"] for c in json.loads(report.read_text())["checks"])
    # a tolerance given to verify replaces the bundle's (here: one the corrupted graphs still exceed)
    assert export_main(["verify", str(bad), "--data", str(corpus), "--batch-sizes", "4", "--limit", "4", "--quiet",
                        "--max-accuracy-drop", "5", "--min-agreement", "0.5"]) == 1
    capsys.readouterr()


def test_export_refuses_int8_calibrated_on_blank_clips(quantized, run_dir, tmp_path):
    """Calibrated on silent black clips, the activation ranges are far too narrow: the check on the test
    split fails, nothing int8 is left behind, and the fp32 bundle is untouched."""
    bundle = shutil.copytree(quantized, tmp_path / "fp32")
    shutil.rmtree(bundle / INT8)
    m = json.loads((bundle / MANIFEST).read_text())
    del m[INT8]
    (bundle / MANIFEST).write_text(json.dumps(m))
    rewrite_manifest(bundle)
    calib, check, source = run_clips(load_run(run_dir), QuantizeOptions(calibration_clips=CALIBRATION_CLIPS),
                                     progress=False)
    blank = ClipSet.of_arrays("train", {k: np.zeros_like(v) for k, v in calib.read(slice(None)).items()},
                              calib.labels, calib.keys)
    with pytest.raises(Int8Refused, match=r"int8 refused: int8 loses [\d.]+ points of accuracy"):
        quantize_bundle(load_bundle(bundle), bundle, (blank, check, source), progress=False)
    assert not (bundle / INT8).exists()
    assert load_bundle(bundle).precisions == (FP32,)


def test_precision_check_thresholds():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    tol = {"max_accuracy_drop": 10.0, "min_top1_agreement": 0.9}
    same = precision_check(labels, labels, labels, "test", tol)
    assert same["passed"] and (same["fp32_accuracy"], same["int8_accuracy"], same["top1_agreement"]) == (1.0, 1.0, 1.0)
    one = labels.copy()
    one[0] = 1   # one clip of ten lost: 10 points, 90 % agreement, both exactly at the limits
    r = precision_check(labels, labels, one, "test", tol)
    assert r["passed"] and r["accuracy_drop"] == pytest.approx(10.0) and r["top1_agreement"] == pytest.approx(0.9)
    two = one.copy()
    two[1] = 2
    r = precision_check(labels, labels, two, "test", tol)
    assert not r["passed"] and len(r["problems"]) == 2
    # int8 disagreeing with fp32 without losing accuracy: the agreement alone refuses it
    fp32 = labels.copy()
    fp32[:3] = [1, 2, 0]
    swapped = labels.copy()
    swapped[3:6] = [1, 2, 0]
    r = precision_check(labels, fp32, swapped, "test", tol)
    assert r["accuracy_drop"] == 0 and not r["passed"] and "top-1 on 40.0%" in r["problems"][0]


def test_precision_choice_on_bundles_without_int8(tiny_bundle):
    """Old and fp32-only bundles: auto runs fp32 and says so; int8 asked for is an error naming the fix."""
    b = load_bundle(tiny_bundle("audio,visual"))
    assert b.int8 is None and b.precisions == (FP32,)
    assert choose_precision(b, "onnxruntime-cpu") == (FP32, "the bundle holds fp32 graphs only (export with "
                                                            "--quantize int8 for int8)")
    engine = open_engine(b, "onnxruntime-cpu")
    assert engine.precision == FP32 and "fp32 graphs only" in engine.precision_reason
    with pytest.raises(EngineError, match="holds no int8 graphs.*--quantize int8"):
        open_engine(b, "onnxruntime-cpu", precision=INT8)
    with pytest.raises(EngineError, match="int8 graphs run on onnxruntime-cpu only"):
        open_engine(b, "torch-cpu", precision=INT8)
    with pytest.raises(ValueError, match="unknown precision"):
        open_engine(b, precision="bf16")


def test_precision_choice_on_a_quantized_bundle(quantized):
    b = load_bundle(quantized)
    assert choose_precision(b, "onnxruntime-cpu")[0] == INT8
    assert choose_precision(b, "onnxruntime-cpu", FP32)[0] == FP32
    # the PyTorch fallback runs the fp32 programs whatever the bundle holds; auto picks int8 on the CPU
    torch_engine = open_engine(b, "torch-cpu")
    assert torch_engine.precision == FP32 and "int8 graphs run on onnxruntime-cpu only" in torch_engine.precision_reason
    assert open_engine(b, ["torch-cpu", "onnxruntime-cpu"], precision=INT8).backend == "onnxruntime-cpu"
    # a manifest whose int8 check did not pass: auto falls back to fp32, int8 asked for is refused
    m = dict(b.manifest)
    m[INT8] = {**m[INT8], "check": {**m[INT8]["check"], "passed": False}}
    failed = type(b)(b.path, m)
    precision, why = choose_precision(failed, "onnxruntime-cpu")
    assert precision == FP32 and why.startswith("fp32: its int8 graphs did not pass")
    with pytest.raises(EngineError, match="did not pass their accuracy check"):
        choose_precision(failed, "onnxruntime-cpu", INT8)


def test_quantize_needs_the_runs_data(tiny_bundle, tmp_path, capsys):
    """A run that records no dataset (and no --data): one line naming the fix, before any export work."""
    run = tiny_bundle("audio,visual").parent / "tiny-run"
    rc = export_main(["bundle", "--run", str(run), "--out", str(tmp_path / "b"), "--quantize", "int8", "--quiet"])
    assert rc == 2 and "the run records no dataset" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert export_main(["bundle", "--run", str(run), "--out", str(tmp_path / "b"), "--data", "x", "--quiet"]) == 2
    assert "--data and --cache-dir are for --quantize int8" in capsys.readouterr().err


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_every_setting_quantizes(tiny_bundle, setting, tmp_path):
    """Every kind's branch (float spectrograms, uint8 frames, flow and images) and the fusion head
    quantize, load on ONNX Runtime as int8 and stay close to fp32 (random weights, random inputs)."""
    bundle = shutil.copytree(tiny_bundle(setting), tmp_path / "b")
    b = load_bundle(bundle)
    calib = random_arrays(setting, 16, seed=1)
    modules = quantize_modules(b, ClipSet.of_arrays("train", calib, np.zeros(16), [str(i) for i in range(16)]), bundle)
    staged = type(b)(b.path, {**b.manifest, INT8: {"modules": modules}})
    fp32, int8 = (OrtEngine(staged, "cpu", precision=p) for p in (FP32, INT8))
    assert int8.precision == INT8
    feats = {}
    for name, x in random_arrays(setting, 6, seed=2).items():
        (f32, z32), (f8, z8) = fp32.branch(name, x), int8.branch(name, x)
        assert f8.dtype == z8.dtype == np.float32 and f8.shape == f32.shape and z8.shape == z32.shape
        assert _cosine(f32, f8).min() > 0.99 and _cosine(z32, z8).min() > 0.99
        feats[name] = f32
    order = list(b.modalities)
    assert _cosine(fp32.fusion([feats[n] for n in order]), int8.fusion([feats[n] for n in order])).min() > 0.99


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

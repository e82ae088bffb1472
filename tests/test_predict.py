"""Predictor: arrays and decoded clips -> answers, against the PyTorch modules computed by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dimml.config import PREPROCESS_PRESETS
from dimml.engines import EngineError, open_engine
from dimml.media import decode_clip
from dimml.predict import Predictor
from dimml.weighting import softmax, weigh_named
from export.build import BundleOptions, build_bundle
from training.models import build_av_model, build_model_config
from training.run import load_run, run_config_fields, save_run_model

CLASSES = ["alpha", "beta", "gamma", "delta"]
PP = PREPROCESS_PRESETS["tiny"]
T = 0.3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    cfg = build_model_config("tiny", len(CLASSES), PP.num_frames, fusion="gated")
    run = tmp_path_factory.mktemp("run") / "predict-run"
    save_run_model(run, {"method": "dimml", **run_config_fields(PP, cfg, CLASSES), "lw_temperature": T},
                   build_av_model(cfg))
    return run


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory) -> Path:
    # the TorchScript exporter is ~10x faster than dynamo; test_export covers the default one
    out = tmp_path_factory.mktemp("bundle") / "b"
    return build_bundle(run_dir, out, BundleOptions(exporter="torchscript"), progress=False)


@pytest.fixture(scope="module")
def predictor(bundle_dir) -> Predictor:
    return Predictor(bundle_dir, open_engine(bundle_dir, "onnxruntime-cpu"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Real files: two audio-video clips, an audio-only wav, a silent video."""
    from training.synth import write_clip

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000

    def frames(seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        return (r.integers(0, 256, (1, 1, 1, 3)) * np.ones((10, 48, 64, 1)) +
                r.integers(0, 40, (10, 48, 64, 3))).clip(0, 255).astype(np.uint8)

    return {
        "av1": write_clip(d / "av1.mp4", frames(1), fps=10, audio=(0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)),
        "av2": write_clip(d / "av2.mp4", frames(2), fps=10, audio=(0.3 * rng.normal(size=t.size)).astype(np.float32)),
        "audio": write_clip(d / "tone.wav", None, audio=(0.4 * np.sin(2 * np.pi * 1200 * t)).astype(np.float32)),
        "video": write_clip(d / "silent.mp4", frames(3), fps=10),
    }


def reference(run_dir: Path, spec: np.ndarray | None, frames: np.ndarray | None) -> dict:
    """The answer computed straight from the PyTorch modules and the weighting equations."""
    model = load_run(run_dir).model
    logits, feats = {}, {}
    with torch.inference_mode():
        if spec is not None:
            feats["audio"], logits["audio"] = model.audio(torch.from_numpy(spec))
        if frames is not None:
            feats["visual"], logits["visual"] = model.visual(torch.from_numpy(frames))
        if len(feats) == 2:
            logits["fusion"] = model.fusion(feats["audio"], feats["visual"])
    logits = {k: v.numpy() for k, v in logits.items()}
    z, w, c = weigh_named(logits, T)
    return {"probs": softmax(z), "weights": w, "certainties": c, "logits": logits}


def random_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = (rng.normal(size=(n, *PP.spectrogram_shape)) * 3 - 8).astype(np.float32)
    frames = rng.integers(0, 256, (n, *PP.frames_shape), dtype=np.uint8)
    return spec, frames


def test_predict_arrays_matches_reference(predictor, run_dir):
    spec, frames = random_inputs(5)
    answers = predictor.predict_arrays(spec, frames)
    ref = reference(run_dir, spec, frames)
    assert len(answers) == 5
    for i, a in enumerate(answers):
        assert json.loads(json.dumps(a)) == a   # JSON-ready as is
        assert set(a) == {"label", "probabilities", "branches", "modalities_used", "model", "backend"}
        assert list(a["probabilities"]) == CLASSES
        np.testing.assert_allclose(list(a["probabilities"].values()), ref["probs"][i], atol=1e-5)
        assert a["label"] == CLASSES[int(ref["probs"][i].argmax())]
        assert a["modalities_used"] == ["audio", "visual"]
        assert set(a["branches"]) == {"audio", "visual", "fusion"}
        assert sum(b["weight"] for b in a["branches"].values()) == pytest.approx(1.0, abs=1e-9)
        for name, b in a["branches"].items():
            assert b["weight"] == pytest.approx(ref["weights"][name][i], abs=1e-5)
            assert b["certainty"] == pytest.approx(ref["certainties"][name][i], abs=1e-5)
            assert b["certainty"] == pytest.approx(max(b["probabilities"].values()), abs=1e-12)
        assert a["backend"] == "onnxruntime-cpu"
        assert a["model"] == {"name": "predict-run", "version": predictor.bundle.version}


def test_predict_clips_with_missing_modalities(predictor, media, run_dir):
    order = ["video", "av1", "audio", "av2"]
    clips = [predictor.decode(media[k]) for k in order]
    answers = predictor.predict_clips(clips)
    assert [a["modalities_used"] for a in answers] == [["visual"], ["audio", "visual"], ["audio"], ["audio", "visual"]]

    # one modality: that branch alone, weight 1, no fusion; equal to its own softmax
    for i, branch in ((0, "visual"), (2, "audio")):
        a, clip = answers[i], clips[i]
        assert set(a["branches"]) == {branch} and a["branches"][branch]["weight"] == 1.0
        ref = reference(run_dir, None if branch == "visual" else clip.spectrogram[None],
                        None if branch == "audio" else clip.frames[None])
        np.testing.assert_allclose(list(a["probabilities"].values()), softmax(ref["logits"][branch])[0], atol=1e-5)
        assert a["probabilities"] == a["branches"][branch]["probabilities"]

    # clips through predict_clips equal the same clip alone through predict_arrays
    for i in (1, 3):
        alone = predictor.predict_arrays(clips[i].spectrogram[None], clips[i].frames[None])[0]
        np.testing.assert_allclose(list(answers[i]["probabilities"].values()),
                                   list(alone["probabilities"].values()), atol=1e-6)
        ref = reference(run_dir, clips[i].spectrogram[None], clips[i].frames[None])
        np.testing.assert_allclose(list(answers[i]["probabilities"].values()), ref["probs"][0], atol=1e-5)


def test_batching_does_not_change_answers(bundle_dir, predictor):
    spec, frames = random_inputs(7, seed=3)
    full = predictor.forward(spec, frames)
    for max_batch in (1, 3):
        small = Predictor(bundle_dir, predictor.engine, max_batch=max_batch).forward(spec, frames)
        np.testing.assert_allclose(small.combined, full.combined, atol=1e-5)
        for b in full.logits:
            np.testing.assert_allclose(small.logits[b], full.logits[b], atol=1e-5)
    assert predictor.predict_arrays(spec[:0], frames[:0]) == []


def test_engine_selection(bundle_dir, predictor):
    import onnxruntime as ort

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    auto = open_engine(bundle_dir)
    assert auto.backend == ("onnxruntime-cuda" if has_cuda_ep else "onnxruntime-cpu")
    if not has_cuda_ep:
        with pytest.raises(EngineError, match="CUDAExecutionProvider"):
            open_engine(bundle_dir, "onnxruntime-cuda")
    with pytest.raises(EngineError, match="no TensorRT engines"):
        open_engine(bundle_dir, "tensorrt")
    with pytest.raises(ValueError, match="unknown backend"):
        open_engine(bundle_dir, "tensorflow")

    # the PyTorch fallback (weights from the bundle's torch/) answers the same
    torch_pred = Predictor(bundle_dir, prefer="torch-cpu")
    assert torch_pred.backend == "torch-cpu"
    spec, frames = random_inputs(3, seed=5)
    a = torch_pred.predict_arrays(spec, frames)
    b = predictor.predict_arrays(spec, frames)
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and x["backend"] == "torch-cpu"
        np.testing.assert_allclose(list(x["probabilities"].values()), list(y["probabilities"].values()), atol=1e-5)


def test_bad_inputs_are_refused_clearly(predictor, media):
    spec, frames = random_inputs(2)
    with pytest.raises(ValueError, match=r"frames must be uint8 \[B, 2, 64, 64, 3\]"):
        predictor.predict_arrays(spec, frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"spectrogram must be float \[B, 1, 257, 199\]"):
        predictor.predict_arrays(spec[:, :, :, :100], frames)
    with pytest.raises(ValueError, match="batch sizes differ"):
        predictor.predict_arrays(spec, frames[:1])
    with pytest.raises(ValueError, match="need a spectrogram, frames, or both"):
        predictor.predict_arrays(None, None)
    # a clip decoded with another model's preprocessing: the error names the file
    other = decode_clip(media["av1"], PREPROCESS_PRESETS["resnet18"])
    with pytest.raises(ValueError, match=r"av1\.mp4: spectrogram must be float \[B, 1, 257, 199\]"):
        predictor.predict_clips([other])


def test_fused_output_bundle_answers_by_the_fusion_head(run_dir, tmp_path, media):
    """A run whose final output is its fusion head (report primary "fused") is served as such."""
    import shutil

    fused_run = tmp_path / "fused-run"
    shutil.copytree(run_dir, fused_run)
    (fused_run / "report.json").write_text(json.dumps({"method": "joint", "primary": "fused", "metrics": {}}))
    bundle = build_bundle(fused_run, tmp_path / "b", BundleOptions(exporter="torchscript"), progress=False)
    assert json.loads((bundle / "manifest.json").read_text())["output"] == "fused"
    p = Predictor(bundle, open_engine(bundle, "onnxruntime-cpu"))
    clip = decode_clip(media["av1"], PP)
    [got] = p.predict_clips([clip])
    ref = reference(run_dir, clip.spectrogram[None], clip.frames[None])
    fusion_probs = softmax(ref["logits"]["fusion"])[0]
    np.testing.assert_allclose(list(got["probabilities"].values()), fusion_probs, rtol=1e-4, atol=1e-5)
    assert {b: v["weight"] for b, v in got["branches"].items()} == {"audio": 0.0, "visual": 0.0, "fusion": 1.0}
    # one modality: still that branch alone
    [solo] = p.predict_clips([decode_clip(media["audio"], PP, allow_missing=True)])
    assert solo["modalities_used"] == ["audio"] and solo["branches"]["audio"]["weight"] == 1.0

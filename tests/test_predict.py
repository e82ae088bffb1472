"""Predictor: arrays and decoded samples of every setting -> answers, against the run's PyTorch
modules and the weighting equations computed by hand."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dimml.bundle import load_bundle
from dimml.engines import EngineError, open_engine
from dimml.media import MediaError
from dimml.modalities import preprocess_for
from dimml.predict import Predictor
from dimml.weighting import OutputRule, softmax, weigh_named
from export.build import BundleOptions, build_bundle
from training.run import load_run

from conftest import SETTINGS, TINY_CLASSES, make_tiny_run, random_arrays, setting_id, write_sample

CLASSES = list(TINY_CLASSES)
T = 0.7   # the report's temperature (conftest.make_tiny_run)


@pytest.fixture(scope="module")
def predictors(tiny_bundle):
    made = {}

    def get(setting: str) -> Predictor:
        if setting not in made:
            b = tiny_bundle(setting)
            made[setting] = Predictor(b, open_engine(b, "onnxruntime-cpu"))
        return made[setting]

    return get


def run_of(predictor: Predictor):
    return load_run(predictor.bundle.path.parent / "tiny-run")


def reference(run, arrays: dict[str, np.ndarray]) -> dict:
    """The answer computed straight from the run's PyTorch modules and the weighting equations."""
    model = run.model
    logits, feats = {}, {}
    with torch.inference_mode():
        for name in model.names:
            if name in arrays:
                feats[name], logits[name] = model.branches[name](torch.from_numpy(arrays[name]))
        if len(feats) == len(model.names):
            logits["fusion"] = model.fusion(*(feats[n] for n in model.names))
    logits = {k: v.numpy() for k, v in logits.items()}
    z, w, c = weigh_named(logits, T)
    return {"probs": softmax(z), "weights": w, "certainties": c, "logits": logits}


def check_answer(a: dict, ref: dict, i: int, used: list[str], model_name: str, version: str) -> None:
    assert json.loads(json.dumps(a)) == a   # JSON-ready as is
    assert set(a) == {"label", "probabilities", "branches", "modalities_used", "model", "backend", "final_output",
                      "warnings"}
    assert a["warnings"] == []   # clean synthetic media: no damage
    assert set(a["final_output"]) == {"rule", "reason"} and a["final_output"]["rule"] == "paper-lw"
    assert list(a["probabilities"]) == CLASSES
    np.testing.assert_allclose(list(a["probabilities"].values()), ref["probs"][i], atol=1e-5)
    assert a["label"] == CLASSES[int(ref["probs"][i].argmax())]
    assert a["modalities_used"] == used
    assert list(a["branches"]) == list(ref["logits"])
    assert sum(b["weight"] for b in a["branches"].values()) == pytest.approx(1.0, abs=1e-9)
    for name, b in a["branches"].items():
        assert b["weight"] == pytest.approx(ref["weights"][name][i], abs=1e-5)
        assert b["certainty"] == pytest.approx(ref["certainties"][name][i], abs=1e-5)
        assert b["certainty"] == pytest.approx(max(b["probabilities"].values()), abs=1e-12)
    assert a["model"] == {"name": model_name, "version": version, "precision": "fp32"}


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_predict_arrays_matches_reference(predictors, setting):
    p = predictors(setting)
    run = run_of(p)
    arrays = random_arrays(setting, 5)
    answers = p.predict_arrays(arrays)
    ref = reference(run, arrays)
    assert len(answers) == 5 and list(ref["logits"]) == [*p.names, "fusion"]
    for i, a in enumerate(answers):
        check_answer(a, ref, i, list(p.names), "tiny-run", p.bundle.version)
        assert a["backend"] == "onnxruntime-cpu"


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_missing_modalities_are_answered_by_the_rest(predictors, setting):
    """Every proper subset of the modalities: weights over those branches only, no fusion."""
    p = predictors(setting)
    run = run_of(p)
    arrays = random_arrays(setting, 3, seed=1)
    names = list(p.names)
    subsets = [[n] for n in names] + ([[n for n in names if n != drop] for drop in names] if len(names) > 2 else [])
    for used in subsets:
        sub = {n: arrays[n] for n in used}
        answers = p.predict_arrays(sub)
        ref = reference(run, sub)
        assert "fusion" not in ref["logits"]
        for i, a in enumerate(answers):
            check_answer(a, ref, i, used, "tiny-run", p.bundle.version)
        if len(used) == 1:   # one branch: weight 1, its own softmax
            assert all(a["branches"][used[0]]["weight"] == 1.0 and a["probabilities"] == a["branches"][used[0]]["probabilities"]
                       for a in answers)


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_predict_files_decodes_with_the_bundle(predictors, setting, tmp_path):
    """Real files by field -> decode_sample with the bundle's preprocessing -> the same answer as the arrays."""
    p = predictors(setting)
    files = write_sample(tmp_path, setting, seed=3)
    full = p.predict_files(files)
    assert full["modalities_used"] == list(p.names)
    clip = p.decode(files)
    [alone] = p.predict_arrays({n: clip.arrays[n][None] for n in p.names})
    np.testing.assert_allclose(list(full["probabilities"].values()), list(alone["probabilities"].values()), atol=1e-9)
    # a sample lacking a source: answered by the modalities that remain
    own = [f for f in p.fields if f != "video"]
    if own:
        rest = {f: v for f, v in files.items() if f != own[-1]}
        got = p.predict_files(rest)
        assert got["modalities_used"] == [n for n in p.names if n != own[-1]]
        assert "fusion" not in got["branches"]
    if "audio" in p.names:   # a video without an audio track: the other modalities answer
        silent = write_sample(tmp_path / "silent", "visual", seed=3)
        got = p.predict_files(silent)
        assert got["modalities_used"] == [n for n in p.names if n != "audio"]
    if len(p.fields) == 1:   # a lone file is the model's one field
        assert p.predict_files(files[p.fields[0]])["probabilities"] == full["probabilities"]
    else:
        with pytest.raises(ValueError, match="give files keyed by field"):
            p.decode(files[own[0]])
    with pytest.raises(ValueError, match="unknown field"):
        p.decode({**files, "sonar": files[p.fields[0]]})
    # a file given in a modality's own field must hold it: a broken one is an error, not a missing modality
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    for m in p.names:
        with pytest.raises(MediaError, match="broken.png") as e:
            p.decode({**files, m: broken})
        assert e.value.cause in ("not_media", "undecodable", "no_audio", "no_video")   # never "absent"


def test_predict_clips_groups_by_modalities(predictors, tmp_path):
    p = predictors("audio,visual")
    av = write_sample(tmp_path / "av", "audio,visual", seed=1)
    silent = write_sample(tmp_path / "v", "visual", seed=2)
    av2 = write_sample(tmp_path / "av2", "audio,visual", seed=4)
    clips = [p.decode(f) for f in (silent, av, av2, {"audio": av["video"]})]
    answers = p.predict_clips(clips)
    assert [a["modalities_used"] for a in answers] == [["visual"], ["audio", "visual"], ["audio", "visual"], ["audio"]]
    for clip, a in zip(clips, answers):
        [alone] = p.predict_arrays({n: x[None] for n, x in clip.arrays.items()})
        np.testing.assert_allclose(list(a["probabilities"].values()), list(alone["probabilities"].values()), atol=1e-6)


@pytest.mark.parametrize("setting", ["audio,visual", "audio,visual,flow"], ids=setting_id)
def test_batching_does_not_change_answers(predictors, setting):
    p = predictors(setting)
    arrays = random_arrays(setting, 7, seed=3)
    full = p.forward(arrays)
    for max_batch in (1, 3):
        small = Predictor(p.bundle, p.engine, max_batch=max_batch).forward(arrays)
        np.testing.assert_allclose(small.combined, full.combined, atol=1e-5)
        for b in full.logits:
            np.testing.assert_allclose(small.logits[b], full.logits[b], atol=1e-5)
    assert p.predict_arrays({n: x[:0] for n, x in arrays.items()}) == []


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_engine_selection_and_torch_fallback(predictors, setting):
    import onnxruntime as ort

    p = predictors(setting)
    bundle = p.bundle
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    assert open_engine(bundle).backend == ("onnxruntime-cuda" if has_cuda_ep else "onnxruntime-cpu")
    if not has_cuda_ep:
        with pytest.raises(EngineError, match="CUDAExecutionProvider"):
            open_engine(bundle, "onnxruntime-cuda")
    with pytest.raises(EngineError, match="no TensorRT engines"):
        open_engine(bundle, "tensorrt")
    with pytest.raises(ValueError, match="unknown backend"):
        open_engine(bundle, "tensorflow")

    # the PyTorch fallback (the bundle's torch.export programs) answers the same
    torch_pred = Predictor(bundle, prefer="torch-cpu")
    assert torch_pred.backend == "torch-cpu"
    arrays = random_arrays(setting, 3, seed=5)
    for x, y in zip(torch_pred.predict_arrays(arrays), p.predict_arrays(arrays)):
        assert x["label"] == y["label"] and x["backend"] == "torch-cpu"
        np.testing.assert_allclose(list(x["probabilities"].values()), list(y["probabilities"].values()), atol=1e-5)


def test_bad_inputs_are_refused_clearly(predictors, tmp_path):
    p = predictors("audio,visual")
    arrays = random_arrays("audio,visual", 2)
    with pytest.raises(ValueError, match=r"visual must be uint8 \[B, 2, 64, 64, 3\]"):
        p.predict_arrays({**arrays, "visual": arrays["visual"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"audio must be float \[B, 1, 257, 199\]"):
        p.predict_arrays({**arrays, "audio": arrays["audio"][:, :, :, :100]})
    with pytest.raises(ValueError, match="batch sizes differ"):
        p.predict_arrays({**arrays, "visual": arrays["visual"][:1]})
    with pytest.raises(ValueError, match="need at least one of audio, visual"):
        p.predict_arrays({})
    with pytest.raises(ValueError, match=r"unknown modality\(ies\) \['flow'\]"):
        p.predict_arrays({"flow": arrays["visual"]})
    # a sample decoded with another model's preprocessing: the error names the file
    files = write_sample(tmp_path, "audio,visual", seed=1)
    other = p.decode(files, cfg=preprocess_for("resnet18", "audio,visual"))
    with pytest.raises(ValueError, match=r"clip1\.mp4: audio must be float \[B, 1, 257, 199\]"):
        p.predict_clips([other])


def test_a_fusion_head_final_output_answers_by_the_fusion_head(tmp_path):
    """A run whose final output is its fusion head is served as such, and answers say so."""
    rule = OutputRule.head("fusion", T).because("the method's final output is its fusion head")
    run = make_tiny_run(tmp_path / "fusion-run", "visual,flow", rule=rule)
    bundle = build_bundle(run, tmp_path / "b", BundleOptions(exporter="torchscript"), progress=False)
    assert load_bundle(bundle).final_output == OutputRule("fusion", "branch", "fusion", temperature=T)
    p = Predictor(bundle, open_engine(bundle, "onnxruntime-cpu"))
    arrays = random_arrays("visual,flow", 2)
    got = p.predict_arrays(arrays)
    ref = reference(load_run(run), arrays)
    fusion_probs = softmax(ref["logits"]["fusion"])
    for i, a in enumerate(got):
        np.testing.assert_allclose(list(a["probabilities"].values()), fusion_probs[i], rtol=1e-4, atol=1e-5)
        assert {b: v["weight"] for b, v in a["branches"].items()} == {"visual": 0.0, "flow": 0.0, "fusion": 1.0}
        assert a["final_output"] == {"rule": "fusion", "reason": rule.reason}
    # one modality: still that branch alone, by the weighting (the fusion head needs both)
    [solo] = p.predict_arrays({"flow": arrays["flow"][:1]})
    assert solo["modalities_used"] == ["flow"] and solo["branches"]["flow"]["weight"] == 1.0
    assert solo["final_output"]["rule"] == "paper-lw" and "missing modality" in solo["final_output"]["reason"]


def test_output_rule_from_the_report_is_used(tmp_path):
    """A report that chose an output rule on validation (e.g. one modality's head): the bundle
    records it and the Predictor answers by it; without that branch, the weighting over the rest."""
    rule = OutputRule.head("rear").because("the best rule on validation")
    run = make_tiny_run(tmp_path / "rule-run", "front:image,rear:image", rule=rule)
    bundle = build_bundle(run, tmp_path / "b", BundleOptions(exporter="torchscript"), progress=False)
    assert json.loads((bundle / "manifest.json").read_text())["final_output"] == rule.to_dict()
    p = Predictor(bundle, open_engine(bundle, "onnxruntime-cpu"))
    assert p.rule == rule and p.bundle.final_output.name == "rear"
    arrays = random_arrays("front:image,rear:image", 2, seed=9)
    ref = reference(load_run(run), arrays)
    for i, a in enumerate(p.predict_arrays(arrays)):
        assert {b: v["weight"] for b, v in a["branches"].items()} == {"front": 0.0, "rear": 1.0, "fusion": 0.0}
        np.testing.assert_allclose(list(a["probabilities"].values()), softmax(ref["logits"]["rear"])[i], atol=1e-5)
    [front_only] = p.predict_arrays({"front": arrays["front"][:1]})
    assert front_only["branches"]["front"]["weight"] == 1.0


def test_older_manifests_map_to_final_outputs(tiny_bundle, tmp_path):
    """Manifests from before `final_output` (`output` a rule dict, or "weighted" | "fused" | absent plus
    `lw_temperature`; or the interim `output_rule` entry) load as that rule / the paper's / the fusion head."""
    src = tiny_bundle("audio,visual")
    run = src.parent / "tiny-run"
    bundle = Path(shutil.copytree(src, tmp_path / "b"))   # a copy: the test rewrites its manifest
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    assert manifest["final_output"] == OutputRule.paper(T).to_dict() | {"reason": manifest["final_output"]["reason"]}

    def rule_of(**output) -> OutputRule:
        m = {k: v for k, v in manifest.items() if k != "final_output"}
        mpath.write_text(json.dumps({**m, **output}))
        return load_bundle(bundle).final_output

    assert rule_of(output="weighted") == OutputRule.paper(T) == rule_of()
    assert rule_of(output=OutputRule.head("visual").to_dict()) == OutputRule.head("visual")   # the rule-dict era
    assert rule_of(output="fused") == OutputRule.head("fusion", T)
    assert rule_of(output="fused", output_rule=OutputRule.head("audio").to_dict()) == OutputRule.head("audio")
    # an old "weighted" manifest answers with exactly Eq. 8-9 at its T
    rule_of(output="weighted")
    p = Predictor(bundle, open_engine(bundle, "onnxruntime-cpu"))
    arrays = random_arrays("audio,visual", 3, seed=4)
    ref = reference(load_run(run), arrays)
    for i, a in enumerate(p.predict_arrays(arrays)):
        np.testing.assert_allclose(list(a["probabilities"].values()), ref["probs"][i], rtol=1e-4, atol=1e-5)
        for b, v in a["branches"].items():
            assert v["weight"] == pytest.approx(ref["weights"][b][i], abs=1e-5)
            assert v["certainty"] == pytest.approx(ref["certainties"][b][i], abs=1e-5)
    with pytest.raises(ValueError, match="'weighted' or 'fused'"):
        rule_of(output="mean")

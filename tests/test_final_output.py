"""Issue 20's mechanisms: MSLR's per-modality initial rates, modulation windows as fractions of the
run, and every choosing method's final output carried into its bundle and answered with."""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from dimml.bundle import load_bundle
from dimml.predict import Predictor
from dimml.weighting import OutputRule
from export.build import BundleOptions, build_bundle
from training.methods import REGISTRY, Batch, get_method
from training.methods.mslr import best_rate
from training.synth import SynthConfig, synthesize
from training.trainer import TrainConfig, fit

from conftest import start_server, stop_server, wait_ready
from test_methods import AV, FakeContext, K, make_batch, make_method

# ---------------------------------------------------------------------------------------
# MSLR: each encoder's initial rate from its own tuning

class TuningContext(FakeContext):
    """Batches where the class is in both modalities, audio's inputs x30 and visual's x0.03: the
    same rate cannot suit both (audio's large gradients want a small one, visual's tiny ones a large one)."""

    main = True
    optimizer_settings = {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4}

    def batches(self, split, seed=None):
        for i in range(4 if split == "train" else 2):
            b = make_batch(AV, b=12, seed=100 * (split == "val") + i + 10 * (seed or 0))
            onehot = torch.nn.functional.one_hot(b.label, K).float()
            x = dict(b.inputs)
            x["audio"] = (x["audio"] * 0.1 + onehot[:, None, :, None].expand(-1, 1, K, x["audio"].shape[-1])
                          .repeat_interleave(x["audio"].shape[2] // K + 1, 2)[:, :, :x["audio"].shape[2]]) * 30
            v = x["visual"].float()
            v[..., 0] = b.label[:, None, None, None].float() * 80
            x["visual"] = v.clamp(0, 255).to(torch.uint8)
            yield Batch(x, b.label)


def test_mslr_initial_rates_come_from_each_encoders_own_tuning():
    method = make_method("mslr", AV, search_epochs=3, search_factors=[0.01, 0.1, 1.0, 10.0])
    assert method.param_groups("joint")[0].get("lr") is None            # nothing chosen before prepare
    before = {k: v.clone() for k, v in method.branch("audio").state_dict().items()}
    ctx = TuningContext(method.names)
    method.prepare(ctx)
    # the rule: each modality's rate is the best validation accuracy of its own search
    for n in method.names:
        scores = method.search[n]
        assert set(scores) == {str(0.02 * f) for f in (0.01, 0.1, 1.0, 10.0)}
        assert method.initial[n] == best_rate(scores, 0.02)
        assert scores[str(method.initial[n])] == max(scores.values())
    assert method.initial["audio"] != method.initial["visual"], method.search
    groups = {g["name"]: g for g in method.param_groups("joint")}
    assert {n: groups[n]["lr"] for n in method.names} == method.initial and "lr" not in groups["fusion"]
    # the search trains copies: the run's own weights are untouched
    assert all(torch.equal(v, method.branch("audio").state_dict()[k]) for k, v in before.items())
    record = method.record()
    assert record["initial_lrs"] == method.initial and record["lr_search"]["val_accuracy"] == method.search
    assert any("mslr initial learning rates" in line for line in ctx.lines)
    # a resumed run keeps them; rates given by the user are not searched
    restored = make_method("mslr", AV)
    restored.load_state_dict(method.state_dict())
    assert restored.initial == method.initial
    given = make_method("mslr", AV, lrs={"audio": 0.5, "visual": 0.05})
    given.prepare(ctx)
    assert given.initial == {"audio": 0.5, "visual": 0.05} and given.search == {}


def test_best_rate_ties_go_to_the_runs_rate():
    assert best_rate({"0.002": 0.5, "0.02": 0.5, "0.2": 0.4}, 0.02) == 0.02
    assert best_rate({"0.002": 0.5, "0.2": 0.5}, 0.02) == 0.002    # equally far: the smaller
    assert best_rate({"0.002": 0.5, "0.02": 0.7, "0.2": 0.9}, 0.02) == 0.2


# ---------------------------------------------------------------------------------------
# modulation windows as fractions of the run

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 classes, 20 clips each, 5 per class in validation: enough for the final output to be chosen."""
    root = tmp_path_factory.mktemp("final-output")
    synthesize(root, SynthConfig(classes=3, per_class=20, duration_s=1.0, val_frac=0.25, test_frac=0.25,
                                 noise=(("audio", 0.1), ("visual", 0.3))), workers=2, progress=False)
    return root


def test_a_window_given_as_a_fraction_switches_off_at_its_epoch(corpus, tmp_path):
    """tiny's OGM-GE window ends at 0.5 of the run: of 6 epochs, epochs 1-4 modulate (0-based 0..3), 5-6 not."""
    report = fit(TrainConfig(data=str(corpus), out=str(tmp_path / "ogm"), method="ogm-ge", preset="tiny",
                             epochs=6, stage2_epochs=1), progress=False)
    config = json.loads((tmp_path / "ogm" / "config.json").read_text())
    assert config["train"]["hparams"]["end"] == 0.5 and config["hparams"]["end"] == 3   # the preset's, resolved
    rows = [line.split(",") for line in (tmp_path / "ogm" / "metrics.csv").read_text().splitlines()]
    modulated = [float(r[rows[0].index("modulated")]) for r in rows[1:]]
    assert modulated == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0] and report["metrics"]["final"]
    # PMR: its prototype loss stops after round(0.5 x 6) = epoch 3 (0-based); resnet18 keeps epoch 70
    fit(TrainConfig(data=str(corpus), out=str(tmp_path / "pmr"), method="pmr", preset="tiny", epochs=6,
                    stage2_epochs=1, hparams={"end": 0.5}), progress=False)
    rows = [line.split(",") for line in (tmp_path / "pmr" / "metrics.csv").read_text().splitlines()]
    proto = [sum(float(r[rows[0].index(f"loss_proto_{n}")] or 0) for n in ("audio", "visual")) for r in rows[1:]]
    assert all(p > 0 for p in proto[:4]) and proto[4:] == [0.0, 0.0], proto
    assert get_method("pmr").make_hparams(TrainConfig(data="d", out="o", method="pmr").resolve().hparams, 150).end == 70
    assert get_method("pmr").make_hparams({}, 30).alpha == 2.0   # the authors' concat runs


# ---------------------------------------------------------------------------------------
# every choosing method: the chosen output is in its bundle and answers

CHOOSING = sorted(n for n, m in REGISTRY.items() if m.chooses_output)


@pytest.fixture(scope="module")
def bundles(corpus, tmp_path_factory):
    """method -> (report, bundle folder) of a 4 + 1 epoch tiny run, exported (trained on first use)."""
    made: dict = {}

    def get(method: str):
        if method not in made:
            base = tmp_path_factory.mktemp(method)
            hp = {"teachers": str(get("unimodal")[2])} if get_method(method).teachers_from else {}
            report = fit(TrainConfig(data=str(corpus), out=str(base / "run"), method=method, preset="tiny",
                                     epochs=4, stage2_epochs=1, hparams=hp), progress=False)
            bundle = build_bundle(base / "run", base / "bundle", BundleOptions(exporter="torchscript"), progress=False)
            made[method] = (report, bundle, base / "run")
        return made[method]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", CHOOSING)
def test_every_choosing_method_bundles_its_final_output_and_answers_with_it(bundles, corpus, method):
    report, bundle, _ = bundles(method)
    facts = report["final_output"]
    assert not facts["fallback"] and "cv" in facts          # 5 validation clips per class: chosen, not defaulted
    rule = load_bundle(bundle).final_output
    assert rule.to_dict() == facts["rule"] and rule.name == facts["chosen"] and rule.reason == facts["reason"]
    answer = Predictor(bundle).predict_files({"video": str(next((corpus / "class0").glob("*.mp4")))})
    assert answer["final_output"] == {"rule": rule.name, "reason": rule.reason}
    weights = {b: v["weight"] for b, v in answer["branches"].items()}
    if rule.rule == "branch":                               # the answer is that head's
        assert weights[rule.branch] == 1.0
    else:                                                   # a weighting: every branch takes part
        assert math.isclose(sum(weights.values()), 1.0) and all(0 < w < 1 for w in weights.values())


@pytest.mark.slow
def test_a_served_baseline_answers_with_its_chosen_output(bundles, corpus, tmp_path):
    """A non-DI-MML bundle (MLB) served by bentoml: the answer's rule is the one in its manifest."""
    _, bundle, _ = bundles("mlb")
    rule = load_bundle(bundle).final_output
    proc, url = start_server({"DIMML_BUNDLE": str(bundle)}, tmp_path / "server.log")
    try:
        wait_ready(proc, url, tmp_path / "server.log")
        clip = next((corpus / "class1").glob("*.mp4"))
        r = httpx.post(f"{url}/predict", files=[("video", (clip.name, clip.read_bytes(), "video/mp4"))], timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["final_output"] == {"rule": rule.name, "reason": rule.reason}
        meta = httpx.post(f"{url}/metadata", timeout=30).json()
        assert OutputRule.from_dict(meta["final_output"]) == rule
    finally:
        stop_server(proc)

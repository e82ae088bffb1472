"""The final-output rules (dimml.weighting.OutputRule / select_output) and the numpy metrics."""
from __future__ import annotations

import numpy as np
import pytest

from dimml.metrics import expected_calibration_error, macro_f1
from dimml.weighting import OutputRule, fit_prior_weighting, select_output, weigh

K = 4


def _branch(rng, labels, acc: float, margin: float) -> np.ndarray:
    """Logits that put `margin` on the true class for a fraction `acc` of rows, else on a wrong one."""
    z = rng.normal(size=(len(labels), K))
    right = rng.random(len(labels)) < acc
    z[np.arange(len(labels)), np.where(right, labels, (labels + 1) % K)] += margin
    return z


def _val(n: int = 80, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Audio is good, visual is confidently wrong half the time, fusion is decent."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    return {"audio": _branch(rng, y, 0.9, 3.0), "visual": _branch(rng, y, 0.5, 8.0),
            "fusion": _branch(rng, y, 0.8, 3.0)}, y


def _acc(rule: OutputRule, logits, y) -> float:
    return float((rule.apply(logits)[0].argmax(1) == y).mean())


def test_paper_rule_is_eq_8_9():
    logits, _ = _val()
    z_rule, w_rule, c_rule = OutputRule.paper(0.3).apply(logits)
    z, w, c = weigh(list(logits.values()), 0.3)
    np.testing.assert_allclose(z_rule, z)
    np.testing.assert_allclose(np.stack(list(w_rule.values()), 1), w)
    np.testing.assert_allclose(np.stack(list(c_rule.values()), 1), c)


def test_large_fusion_prior_is_the_fusion_head_and_branch_rule_falls_back():
    logits, _ = _val()
    big = OutputRule("x", "weighted", temperature=0.1, prior=(("audio", -8.0), ("visual", -8.0)))
    np.testing.assert_allclose(big.apply(logits)[0], logits["fusion"], atol=1e-6)
    head = OutputRule.head("fusion")
    np.testing.assert_array_equal(head.apply(logits)[0], logits["fusion"])
    # the fusion branch is absent (a missing modality): the weighting over what is there answers
    partial = {"audio": logits["audio"]}
    np.testing.assert_allclose(head.apply(partial)[0], logits["audio"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selected_output_never_below_fusion_or_best_branch_on_validation(seed):
    logits, y = _val(seed=seed)
    rule, report = select_output(logits, y)
    assert not report["fallback"]
    chosen = _acc(rule, logits, y)
    best_single = max(float((z.argmax(1) == y).mean()) for z in logits.values())
    # chosen by cross-validation, so allow the refit on the full split a sliver of slack only
    assert chosen >= best_single - 1.0 / len(y), (report, chosen, best_single)
    # the fitted weighting itself is no worse than fusion-only or the best head on this split
    fitted = fit_prior_weighting(logits, y)
    assert _acc(fitted, logits, y) >= best_single - 1.0 / len(y)
    assert set(report["candidates"]) == {"audio", "visual", "fusion", "paper-lw", "fitted"}


def test_confidently_wrong_branch_is_not_trusted_by_the_paper_rule_but_is_by_nobody_chosen():
    logits, y = _val()
    # the paper's rule trusts the most certain branch: the confidently-wrong visual head drags it down
    assert _acc(OutputRule.paper(0.1), logits, y) < float((logits["audio"].argmax(1) == y).mean())
    rule, _ = select_output(logits, y)
    assert rule.name != "visual"


def test_tiny_validation_split_falls_back_to_the_weighting_and_says_so():
    logits, y = _val(n=12)
    rule, report = select_output(logits, y)
    assert report["fallback"] and rule.name == "paper-lw" and rule.rule == "weighted" and not rule.prior
    assert "too small" in report["reason"] and rule.reason == report["reason"]
    assert select_output(logits, y, temperature=0.3)[0].temperature == 0.3


def test_a_validation_tie_goes_to_the_weighting():
    """Every rule right on every clip: the paper's weighting answers (then the fitted one), not the fusion head."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    confident = lambda: np.eye(3)[y] * 6 + rng.normal(0, 0.1, (len(y), 3))
    logits = {"audio": confident(), "visual": confident(), "fusion": confident()}
    rule, report = select_output(logits, y)
    assert {n: c["cv_accuracy"] for n, c in report["candidates"].items()} == dict.fromkeys(report["candidates"], 1.0)
    assert rule.name == report["chosen"] == "paper-lw"
    assert "tied with" in report["reason"] and "paper-lw > fitted > fusion > unimodal" in report["reason"]
    # a better head still wins: the visual head is the only one right on a third of the clips
    logits["audio"][y == 2], logits["fusion"][y == 2] = np.eye(3)[0] * 6, np.eye(3)[0] * 6
    logits["visual"][y != 2] *= 0.01
    rule, report = select_output(logits, y)
    assert report["candidates"]["visual"]["cv_accuracy"] == 1.0 > report["candidates"]["paper-lw"]["cv_accuracy"]
    assert rule.name in ("visual", "fitted") and report["candidates"][rule.name]["cv_accuracy"] == 1.0


def test_rule_round_trips():
    r = OutputRule("fitted", "weighted", temperature=0.25, prior=(("audio", 0.5), ("visual", -1.0)))
    assert OutputRule.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError):
        OutputRule.from_dict({"name": "x", "rule": "mean"})


def test_metrics_on_known_values():
    y = np.array([0, 0, 1, 1])
    assert macro_f1(np.array([0, 1, 1, 1]), y, 2) == pytest.approx((2 / 3 + 0.8) / 2)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    # bins of width 1/15: each row is alone in its bin -> mean |correct - conf|
    assert expected_calibration_error(probs, y) == pytest.approx((0.1 + 0.4 + 0.2 + 0.7) / 4)

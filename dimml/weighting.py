"""Certainty-aware logit weighting (DI-MML Eq. 8-9) and the final output rules, shared by
evaluation, serving and scoring.

For each instance j and branch i (each modality's head, and the fusion head):
    c_j^i = max_k softmax(z_j^i)_k                  (Eq. 8, the branch's certainty)
    w_j   = softmax_i(c_j^i / T)                    (Eq. 9)
    Z_j   = sum_i w_j^i z_j^i
NumPy only, so serving and scoring need no torch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dimml.prediction import FUSION

# Grid for fitting T on validation data: certainties lie in [1/K, 1], so useful T spans
# roughly 0.01 (near-argmax of certainty) to 10 (near-uniform weights).
DEFAULT_T_GRID = tuple(float(t) for t in np.geomspace(0.01, 10.0, 31))


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def certainty(logits: np.ndarray) -> np.ndarray:
    """Eq. 8: [B, K] logits -> [B] max softmax probability."""
    return softmax(logits).max(axis=-1)


def weigh(branch_logits: Sequence[np.ndarray], temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 8-9 for M branches of [B, K] logits -> (Z [B, K], weights [B, M], certainties [B, M]).

    With one branch the weight is 1 and Z equals its logits (the degraded, one-modality case).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.stack([np.asarray(x, dtype=np.float64) for x in branch_logits], axis=1)  # [B, M, K]
    c = softmax(z).max(axis=-1)                                                     # [B, M]
    w = softmax(c / temperature, axis=1)                                            # [B, M]
    return (w[..., None] * z).sum(axis=1), w, c


def weigh_named(logits: Mapping[str, np.ndarray], temperature: float
                ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`weigh` over a {branch name: logits} mapping; weights and certainties keyed the same way."""
    names = list(logits)
    z, w, c = weigh([logits[n] for n in names], temperature)
    return z, {n: w[:, i] for i, n in enumerate(names)}, {n: c[:, i] for i, n in enumerate(names)}


def fit_temperature(branch_logits: Sequence[np.ndarray], labels: np.ndarray,
                    grid: Sequence[float] = DEFAULT_T_GRID) -> float:
    """T maximising validation accuracy of the weighted logits; ties broken by lower NLL."""
    labels = np.asarray(labels)
    best_key, best_t = None, float(grid[0])
    for t in grid:
        z, _, _ = weigh(branch_logits, t)
        acc = float((z.argmax(1) == labels).mean())
        p = softmax(z)[np.arange(len(labels)), labels]
        nll = float(-np.log(np.clip(p, 1e-12, None)).mean())
        key = (acc, -nll)
        if best_key is None or key > best_key:
            best_key, best_t = key, float(t)
    return best_t


# ---------------------------------------------------------------------------------------
# The final output: chosen on validation among the fusion head, each unimodal head, the
# paper's weighting (Eq. 8-9) and a fitted weighting that contains both as special cases.

# When validation has fewer clips than this in some class, nothing is fitted or selected: the
# answer is the fusion head (the one head trained on every modality), and the report says so.
MIN_VAL_PER_CLASS = 5
PRIOR_L2 = 0.01          # ridge on the fitted per-branch priors: keeps a small split from pushing them to +-inf
PRIOR_BOUND = 8.0        # |b| beyond this already makes one branch's weight ~1 at any T in the grid
CV_FOLDS = 5
# Ties on validation accuracy go to the certainty-aware weighting (the product's design: the paper's
# rule, then the fitted one), so that another rule answers only where it is better on validation.
PREFERENCE = ("paper-lw", "fitted", "fusion", "unimodal")


@dataclass(frozen=True)
class OutputRule:
    """How the answer's logits Z are made from the branch logits (saved in the report and the bundle).

    rule "branch":   Z = logits of one branch ("fusion" or a modality name); weight 1 on it.
    rule "weighted": w = softmax_i((c_i + b_i) / T) with c_i the branch's certainty (Eq. 8) and b_i a
                     per-branch prior (all 0: exactly the paper's Eq. 9); Z = sum_i w_i z_i.
    A "branch" rule whose branch is absent (a missing modality) answers with the weighting over
    the branches present (its temperature, priors 0).
    """

    name: str                          # "fusion", a modality name, "paper-lw" or "fitted"
    rule: str                          # "branch" | "weighted"
    branch: str | None = None
    temperature: float = 1.0
    prior: tuple[tuple[str, float], ...] = ()   # (branch, b) pairs; missing branches have b = 0
    reason: str = field(default="", compare=False)   # why the run chose it (said in answers)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "branch": self.branch, "temperature": self.temperature,
                "prior": dict(self.prior), "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputRule:
        if d.get("rule") not in ("branch", "weighted"):
            raise ValueError(f"output rule must be 'branch' or 'weighted', got {d.get('rule')!r}")
        return cls(str(d["name"]), d["rule"], d.get("branch"), float(d.get("temperature", 1.0)),
                   tuple(sorted((str(k), float(v)) for k, v in (d.get("prior") or {}).items())),
                   str(d.get("reason") or ""))

    def because(self, reason: str) -> OutputRule:
        """The same rule, saying why it was chosen."""
        return replace(self, reason=reason)

    def answering(self, branches: Sequence[str]) -> tuple[str, str]:
        """(the rule that answers a sample with these branches, why): this one, or for a head rule
        whose head is absent, the paper's weighting over the branches present (what `apply` does)."""
        if self.rule == "branch" and self.branch not in branches:
            return "paper-lw", (f"the {self.branch} head needs a missing modality: the paper's weighting "
                                f"(T = {self.temperature:.3g}) over the branches present")
        return self.name, self.reason

    @classmethod
    def paper(cls, temperature: float) -> OutputRule:
        return cls("paper-lw", "weighted", temperature=float(temperature))

    @classmethod
    def head(cls, branch: str, temperature: float = 1.0) -> OutputRule:
        return cls(branch, "branch", branch, temperature=float(temperature))

    @classmethod
    def legacy(cls, output: str, temperature: float) -> OutputRule:
        """The rule of runs and bundles from before output rules: `output` "weighted" (the paper's
        Eq. 8-9 at T) or "fused" (the fusion head; the weighting at T when a modality is missing)."""
        if output == "fused":
            return cls.head(FUSION, temperature)
        if output == "weighted":
            return cls.paper(temperature)
        raise ValueError(f"output must be 'weighted' or 'fused' (or an output rule), got {output!r}")

    def apply(self, logits: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """{branch: [B, K]} -> (Z [B, K], weights {branch: [B]}, certainties {branch: [B]})."""
        names = list(logits)
        z = np.stack([np.asarray(logits[n], dtype=np.float64) for n in names], axis=1)   # [B, M, K]
        c = softmax(z).max(axis=-1)                                                      # [B, M]
        if self.rule == "branch" and self.branch in logits:
            w = np.zeros_like(c)
            w[:, names.index(self.branch)] = 1.0
        else:
            b = dict(self.prior) if self.rule == "weighted" else {}
            prior = np.array([b.get(n, 0.0) for n in names])
            w = softmax((c + prior) / self.temperature, axis=1)
        return (w[..., None] * z).sum(axis=1), {n: w[:, i] for i, n in enumerate(names)}, \
            {n: c[:, i] for i, n in enumerate(names)}


def _nll(z: np.ndarray, labels: np.ndarray) -> float:
    p = softmax(z)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_prior_weighting(logits: Mapping[str, np.ndarray], labels: np.ndarray,
                        l2: float = PRIOR_L2) -> OutputRule:
    """The "fitted" rule: priors b (the fusion's, or the first branch's, fixed at 0) and T minimising
    validation NLL + l2 * |b|^2, from the paper's rule (b = 0, T fitted) as the starting point."""
    from scipy.optimize import minimize

    names = list(logits)
    free = [n for n in names if n != (FUSION if FUSION in names else names[0])]
    labels = np.asarray(labels)
    t0 = fit_temperature([logits[n] for n in names], labels)

    def rule(x: np.ndarray) -> OutputRule:
        return OutputRule("fitted", "weighted", temperature=float(np.exp(x[0])),
                          prior=tuple(sorted(zip(free, map(float, x[1:])))))

    def loss(x: np.ndarray) -> float:
        return _nll(rule(x).apply(logits)[0], labels) + l2 * float(np.sum(x[1:] ** 2))

    x0 = np.array([np.log(t0)] + [0.0] * len(free))
    bounds = [(np.log(DEFAULT_T_GRID[0]), np.log(DEFAULT_T_GRID[-1]))] + [(-PRIOR_BOUND, PRIOR_BOUND)] * len(free)
    res = minimize(loss, x0, method="L-BFGS-B", bounds=bounds)
    return rule(res.x if res.fun <= loss(x0) else x0)


def _folds(labels: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """k class-stratified folds of row indices (deterministic)."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        for i, r in enumerate(rows):
            folds[i % k].append(int(r))
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds if f]


def select_output(logits: Mapping[str, np.ndarray], labels: np.ndarray, *, temperature: float | None = None,
                  min_per_class: int = MIN_VAL_PER_CLASS, folds: int = CV_FOLDS) -> tuple[OutputRule, dict[str, Any]]:
    """Choose the final output on validation logits {branch: [N, K]} (branches incl. "fusion").

    Candidates: the fusion head, each unimodal head, the paper's weighting (T fixed when given, else
    fitted) and the fitted prior weighting. Each is scored by class-stratified k-fold cross-validation
    on the validation split (rules with parameters are fitted on the other folds), so a rule that
    only overfits the split is not chosen; ties go to the weighting (PREFERENCE). The chosen
    rule is then refitted on the whole split. Too small a split (a class with < min_per_class
    clips): the paper's weighting (T as given, else fitted on what there is, else 1), since no
    other rule can be shown better; `fallback` is set in the returned report.
    """
    labels = np.asarray(labels)
    names = list(logits)
    counts = np.bincount(labels) if labels.size else np.zeros(0, int)
    smallest = int(counts[counts > 0].min()) if counts.size and (counts > 0).any() else 0
    if smallest < min_per_class:
        t = temperature if temperature is not None else (
            fit_temperature([np.asarray(z) for z in logits.values()], labels) if labels.size else 1.0)
        reason = (f"validation split too small to choose an output ({smallest} clip(s) in its smallest class, "
                  f"need {min_per_class}): answering with the paper's weighting, no other rule shown better")
        return OutputRule.paper(t).because(reason), {"chosen": "paper-lw", "fallback": True, "reason": reason,
                                                     "candidates": {}}

    def make(kind: str, idx: np.ndarray) -> OutputRule:
        sub = {n: np.asarray(z)[idx] for n, z in logits.items()}
        if kind == "paper-lw":
            t = temperature if temperature is not None else fit_temperature(list(sub.values()), labels[idx])
            return OutputRule.paper(t)
        return fit_prior_weighting(sub, labels[idx])

    kinds = [(n, "fusion" if n == FUSION else "unimodal") for n in names] + [("paper-lw", "paper-lw"), ("fitted", "fitted")]
    splits = _folds(labels, min(folds, smallest))
    everything = np.arange(len(labels))
    scores: dict[str, dict[str, float]] = {}
    for cand, kind in kinds:
        correct, nll = 0.0, 0.0
        for held in splits:
            train = np.setdiff1d(everything, held)
            rule = OutputRule.head(cand) if kind in ("fusion", "unimodal") else make(kind, train)
            z = rule.apply({n: np.asarray(v)[held] for n, v in logits.items()})[0]
            correct += float((z.argmax(1) == labels[held]).sum())
            nll += _nll(z, labels[held]) * len(held)
        scores[cand] = {"cv_accuracy": correct / len(labels), "cv_nll": nll / len(labels),
                        "preference": PREFERENCE.index(kind)}
    # accuracy first (rounded: float sums must not break ties), then PREFERENCE, then NLL
    best = min(scores, key=lambda n: (-round(scores[n]["cv_accuracy"], 9), scores[n]["preference"], scores[n]["cv_nll"]))
    kind = dict(kinds)[best]
    chosen = OutputRule.head(best) if kind in ("fusion", "unimodal") else make(kind, everything)
    tied = [n for n in scores if n != best and round(scores[n]["cv_accuracy"], 9) == round(scores[best]["cv_accuracy"], 9)]
    reason = (f"highest {len(splits)}-fold cross-validated accuracy on the validation split "
              f"({scores[best]['cv_accuracy']:.3f}" + (f", tied with {', '.join(tied)}: ties go to "
                                                      f"{' > '.join(PREFERENCE)})" if tied else ")"))
    chosen = chosen.because(reason)
    return chosen, {"chosen": best, "fallback": False, "reason": reason, "folds": len(splits),
                    "candidates": {n: {k: v for k, v in s.items() if k != "preference"} for n, s in scores.items()}}

"""Certainty-aware logit weighting (DI-MML Eq. 8-9), shared by evaluation, serving and scoring.

For each instance j and branch i in {audio, visual, fusion}:
    c_j^i = max_k softmax(z_j^i)_k                  (Eq. 8, the branch's certainty)
    w_j   = softmax_i(c_j^i / T)                    (Eq. 9)
    Z_j   = sum_i w_j^i z_j^i
NumPy only, so serving and scoring need no torch.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

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
    z = np.stack([np.asarray(l, dtype=np.float64) for l in branch_logits], axis=1)  # [B, M, K]
    c = softmax(z).max(axis=-1)                                                     # [B, M]
    w = softmax(c / temperature, axis=1)                                            # [B, M]
    return (w[..., None] * z).sum(axis=1), w, c


def weigh_named(logits: Mapping[str, np.ndarray], temperature: float) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
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

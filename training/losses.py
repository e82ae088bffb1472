"""Loss and statistics math of DI-MML and MLB: pure, vectorised torch functions.

DI-MML (Fan et al., ACM MM 2024; reference code github.com/fanyunfeng-bit/DI-MML):
    class_centroids / dimension_scores   Eq. 3-4  per-dimension nearest-centroid accuracy r_m
    separate_dimensions                  Eq. 5    effective dims: r_m > mean(r)
    transfer_dimensions                           dims where one modality learns from another
    duc_loss                             Eq. 6    dimension-decoupled unidirectional InfoNCE
MLB (Kontras et al., BMVC 2024; reference code github.com/kkontras/MLB):
    mlb_coefficients                     Eq. 4-7  per-modality gradient coefficients k_i
(Classification metrics, ECE included, live in dimml/metrics.py.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# DUC distances and their default temperatures.
#   dot          s.t / T, unnormalised: the authors' released code (loss/contrast_loss.py,
#                main_CFT.py), T = 50 as its run scripts use for CREMA-D and ModelNet (10 for AVE
#                and UCF). Our encoders are the same ResNet + average pool without normalisation,
#                so the feature scale, and with it T, carries over. The default.
#   sqeuclidean  -|s - t|^2 / T. Expanded, 2 s.t/T - |t|^2/T + const(s): T = 100 gives the
#                s.t term the dot product's scale at T = 50. It is NOT the same loss: the
#                -|t_j|^2/T term differs per candidate teacher, so whenever teacher norms vary
#                in a batch (always, for real features) the softmax and the gradients differ
#                (gradient cosines of 0.33 to 0.5 against the dot product's at
#                T = 50 measured with varied teacher norms; tests/test_losses.py).
#   euclidean    -|s - t| / T, the paper's Eq. 6 as written (plain distance). Neither the paper
#                nor the released code gives a T for it; 1 leaves the distances unscaled
#                (set duc_temperature to tune it).
DUC_TEMPERATURE = {"dot": 50.0, "sqeuclidean": 100.0, "euclidean": 1.0}
DUC_DISTANCES = ("dot", "euclidean", "sqeuclidean")
DUC_DEFAULT_DISTANCE = "dot"
_CHUNK_ELEMENTS = 1 << 24  # N*K*D floats held at once by dimension_scores (64 MB in float32)


def _check_features_labels(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be [N] with N={features.shape[0]}, got shape {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ValueError("no samples: features is empty")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range [{lo}, {hi}]")


@torch.no_grad()
def class_centroids(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Eq. 3: [N, D] features -> [K, D] per-class means; classes absent from labels get 0 rows."""
    _check_features_labels(features, labels, num_classes)
    x = features.detach()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    labels = labels.long()
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


@torch.no_grad()
def _correct_counts(features: Tensor, labels: Tensor, num_classes: int,
                    chunk_size: int | None = None) -> Tensor:
    """[D] int64: per dimension, how many samples' nearest present-class centroid is their own class."""
    mu = class_centroids(features, labels, num_classes)                   # [K, D]
    x = features.detach().to(mu.dtype)
    labels = labels.long()
    n, d = x.shape
    # Absent classes have no centroid: an +inf distance means argmin never picks them.
    absent = torch.bincount(labels, minlength=num_classes) == 0           # [K]
    penalty = torch.zeros(num_classes, 1, dtype=mu.dtype, device=mu.device)
    penalty[absent] = math.inf
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, num_classes * d))
    counts = torch.zeros(d, dtype=torch.int64, device=x.device)
    for start in range(0, n, chunk_size):
        xc, yc = x[start:start + chunk_size], labels[start:start + chunk_size]
        dist = (xc[:, None, :] - mu[None]).abs_().add_(penalty)          # [n, K, D], 1-D Euclidean
        nearest = dist.argmin(dim=1)                                      # [n, D], first on ties
        counts += (nearest == yc[:, None]).sum(dim=0)
    return counts


def dimension_scores(features: Tensor, labels: Tensor, num_classes: int, *,
                     chunk_size: int | None = None) -> Tensor:
    """Eq. 4: r_m = fraction of samples whose nearest class centroid on dimension m alone is their class."""
    counts = _correct_counts(features, labels, num_classes, chunk_size)
    return counts.to(torch.float32) / features.shape[0]


def separate_dimensions(features: Tensor, labels: Tensor, num_classes: int, *,
                        chunk_size: int | None = None) -> Tensor:
    """Eq. 5: [D] bool, True where r_m > mean(r) (the modality's effective dimensions)."""
    counts = _correct_counts(features, labels, num_classes, chunk_size)
    # r_m > mean(r)  <=>  c_m * D > sum(c), in exact integers: with float means, equal scores
    # (e.g. dead all-zero features) would land on either side of the mean by rounding.
    return counts * counts.numel() > counts.sum()


def transfer_dimensions(effective: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{student i: {teacher j: dims effective for j and not for i}} for every ordered pair i != j.

    `effective`: {modality: [D] bool mask} (separate_dimensions). The student learns there from
    the teacher by DUC. "Not effective" is ~effective (r_m <= mean), as in the reference code's
    set difference. For two modalities this is the paper's pair of sets.
    """
    names = list(effective)
    masks = {n: torch.as_tensor(effective[n]).bool() for n in names}
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    if len(names) < 2 or len(set(shapes.values())) != 1 or len(shapes[names[0]]) != 1:
        raise ValueError(f"effective masks must be at least two, all [D], got shapes {shapes}")
    return {i: {j: torch.nonzero(masks[j] & ~masks[i]).flatten() for j in names if j != i} for i in names}


def duc_loss(h_student: Tensor, h_teacher: Tensor, dims: Tensor, temperature: float | None = None,
             distance: str = DUC_DEFAULT_DISTANCE) -> Tensor:
    """Eq. 6: InfoNCE of student sub-vectors against the (detached) teacher's, same sample positive.

    logits[k, j] =  s_k . t_j / T       ("dot", unnormalised: the released code; default)
                 = -|s_k - t_j| / T     ("euclidean": the paper's Eq. 6)
                 = -|s_k - t_j|^2 / T   ("sqeuclidean")
    temperature None -> DUC_TEMPERATURE[distance]. Mean over the batch. Empty dims -> a zero
    that stays in the student's graph.
    """
    if distance not in DUC_DISTANCES:
        raise ValueError(f"distance must be one of {DUC_DISTANCES}, got {distance!r}")
    if h_student.dim() != 2 or h_student.shape != h_teacher.shape:
        raise ValueError(f"student and teacher features must both be [B, D], got "
                         f"{tuple(h_student.shape)} and {tuple(h_teacher.shape)}")
    if temperature is None:
        temperature = DUC_TEMPERATURE[distance]
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dims = torch.as_tensor(dims, dtype=torch.long, device=h_student.device).flatten()
    if dims.numel() == 0:
        return h_student.sum() * 0.0
    # at least float32 (also under autocast): B x B x m squared differences overflow half precision
    dtype = torch.promote_types(torch.promote_types(h_student.dtype, h_teacher.dtype), torch.float32)
    s = h_student[:, dims].to(dtype)
    t = h_teacher[:, dims].detach().to(dtype)    # unidirectional: the teacher never moves
    if distance == "dot":
        logits = s @ t.T
    else:
        # Explicit differences (not |s|^2 - 2 s.t + |t|^2): exact, and >= 0 without cancellation.
        d2 = (s[:, None, :] - t[None, :, :]).pow(2).sum(-1)                   # [B, B]
        # clamp: sqrt has an infinite slope at 0 (e.g. dead ReLU dims equal in both modalities)
        logits = -(d2 if distance == "sqeuclidean" else d2.clamp_min(1e-12).sqrt())
    target = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits / temperature, target)


def mlb_coefficients(probs_true: Mapping[str, Tensor], alpha: float, beta_max: float, *,
                     mode: str = "paper", eps: float = 1e-12) -> dict[str, float]:
    """MLB Eq. 4-7: {modality: k_i}, k_i = 1 + (beta_i - 1) tanh(alpha (r_i - 1)).

    s_i = sum over the batch of modality i's softmax probability of the true class;
    r_i = mean_{j != i} s_j / s_i (> 1: the others do better, so i is accelerated).
    mode "paper":   beta_i = beta_max if r_i > 1 else 2 (paper Eq. 6 = code tanh_mode=2).
    mode "tanh":    beta_i = 2 always, k_i in (0, 2) (the released code's default, tanh_mode
                    unset, which its published MLB configs use); beta_max is ignored.
    """
    if mode not in ("paper", "tanh"):
        raise ValueError(f"mode must be 'paper' or 'tanh', got {mode!r}")
    if len(probs_true) < 2:
        raise ValueError(f"MLB needs at least two modalities, got {list(probs_true)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if mode == "paper" and not beta_max >= 1:
        raise ValueError(f"beta_max must be >= 1, got {beta_max}")
    names = list(probs_true)
    sizes = {n: int(torch.as_tensor(p).numel()) for n, p in probs_true.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"true-class probabilities must be non-empty and of equal batch size, got {sizes}")
    s = torch.stack([torch.as_tensor(probs_true[n]).detach().double().sum().cpu() for n in names])  # [M]
    others = (s.sum() - s) / (len(names) - 1)
    r = others / s.clamp_min(eps)
    beta = torch.where(r > 1, torch.tensor(beta_max if mode == "paper" else 2.0, dtype=r.dtype),
                       torch.tensor(2.0, dtype=r.dtype))
    k = 1 + (beta - 1) * torch.tanh(alpha * (r - 1))
    return {n: float(k[i]) for i, n in enumerate(names)}

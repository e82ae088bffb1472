"""training/losses.py against brute-force loops, hand computations and the authors' reference loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dimml.metrics import expected_calibration_error
from training.losses import (
    DUC_TEMPERATURE,
    class_centroids,
    dimension_scores,
    duc_loss,
    mlb_coefficients,
    separate_dimensions,
    transfer_dimensions,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# dimension separation (Eq. 3-5)

def test_class_centroids_match_loop_and_absent_class_is_zero():
    x = torch.randn(40, 6, generator=_gen(1), dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=_gen(2))
    y[y == 1] = 3                                            # classes {0, 2, 3} of K=5
    mu = class_centroids(x, y, 5)
    assert mu.shape == (5, 6)
    for k in range(5):
        rows = [x[i] for i in range(40) if int(y[i]) == k]
        want = torch.stack(rows).mean(0) if rows else torch.zeros(6, dtype=torch.float64)
        torch.testing.assert_close(mu[k], want)


def _scores_bruteforce(x: torch.Tensor, y: torch.Tensor, k: int) -> list[float]:
    """Python loops over dims, samples and present classes; first class wins ties (like argmin)."""
    n, d = x.shape
    present = sorted(set(int(v) for v in y))
    mu = {c: [sum(float(x[i, m]) for i in range(n) if int(y[i]) == c) / sum(1 for i in range(n) if int(y[i]) == c)
              for m in range(d)] for c in present}
    out = []
    for m in range(d):
        hits = 0
        for i in range(n):
            best = min(present, key=lambda c: (abs(float(x[i, m]) - mu[c][m]), c))
            hits += best == int(y[i])
        out.append(hits / n)
    return out


def test_dimension_scores_equal_bruteforce_reference():
    x = torch.randn(50, 7, generator=_gen(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 3, 4, 1] * 10)                      # class 2 of K=5 absent
    x[:, 2] += 3.0 * y                                          # make one dim informative
    want = torch.tensor(_scores_bruteforce(x, y, 5), dtype=torch.float32)
    got = dimension_scores(x, y, 5)
    assert got.shape == (7,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # chunking over samples must not change anything
    torch.testing.assert_close(dimension_scores(x, y, 5, chunk_size=7), got, rtol=0, atol=0)
    assert got[2] > 0.9 and got[2] == got.max()


def test_absent_class_centroid_is_never_chosen():
    # One dim. Class 0: {1, 9} -> centroid 5; class 1: {20, 22} -> 21; class 2 absent (zero row).
    # Sample 1.0 is 4 from its own centroid but 1 from the absent class's zero row.
    x = torch.tensor([[1.0], [9.0], [20.0], [22.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert dimension_scores(x, y, 3).tolist() == [1.0]


def test_separation_picks_the_informative_dimensions():
    g = _gen(4)
    n, d, k = 600, 32, 4
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g)
    class_means = torch.randn(k, 10, generator=g) * 4.0         # dims 0..9 carry the class
    x[:, :10] += class_means[y]
    r = dimension_scores(x, y, k)
    assert r[:10].min() > r[10:].max()
    eff = separate_dimensions(x, y, k)
    assert eff.dtype == torch.bool and eff.shape == (d,)
    assert torch.nonzero(eff).flatten().tolist() == list(range(10))


def test_equal_scores_give_no_effective_dimension():
    # Dead (all-zero) features: every r_m is equal, so none is strictly above the mean. A float
    # mean could round either way and flag all of them.
    x = torch.zeros(30, 512)
    y = torch.arange(30) % 3
    r = dimension_scores(x, y, 3)
    assert torch.all(r == r[0])
    assert not separate_dimensions(x, y, 3).any()


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        dimension_scores(torch.zeros(3, 2), torch.tensor([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="labels must be"):
        class_centroids(torch.zeros(3, 2), torch.tensor([0, 1]), 3)


def test_transfer_dimensions_by_hand():
    eff_a = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    eff_v = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    sets = transfer_dimensions({"audio": eff_a, "visual": eff_v})
    assert set(sets) == {"audio", "visual"} and set(sets["audio"]) == {"visual"} and set(sets["visual"]) == {"audio"}
    assert sets["audio"]["visual"].tolist() == [2, 5]      # audio ineffective, visual effective
    assert sets["visual"]["audio"].tolist() == [1, 4]      # visual ineffective, audio effective
    assert sets["audio"]["visual"].dtype == torch.long


def test_transfer_dimensions_for_three_modalities_is_every_ordered_pair():
    eff = {"audio": torch.tensor([1, 1, 0, 0, 1, 0, 0], dtype=torch.bool),
           "visual": torch.tensor([1, 0, 1, 0, 0, 1, 0], dtype=torch.bool),
           "flow": torch.tensor([0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)}
    sets = transfer_dimensions(eff)
    for i in eff:
        assert set(sets[i]) == set(eff) - {i}
        for j in sets[i]:   # by hand: effective for the teacher j, not for the student i
            want = [m for m in range(7) if eff[j][m] and not eff[i][m]]
            assert sets[i][j].tolist() == want, (i, j)
    assert sets["flow"]["audio"].tolist() == [0, 1] and sets["audio"]["flow"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="at least two"):
        transfer_dimensions({"audio": eff["audio"]})
    with pytest.raises(ValueError, match=r"\[D\]"):
        transfer_dimensions({"audio": eff["audio"], "visual": torch.ones(5, dtype=torch.bool)})


# ---------------------------------------------------------------------------------------
# DUC loss (Eq. 6)

def _duc_naive(s: torch.Tensor, t: torch.Tensor, dims: list[int], temp: float, dist: str) -> float:
    """Per-sample loop of Eq. 6 in float64 with math.exp / math.log."""
    def d(u, v):
        sq = sum((float(u[m]) - float(v[m])) ** 2 for m in dims)
        return {"sq": sq, "plain": math.sqrt(sq)}[dist]

    def logit(k, j):
        if dist == "dot":
            return sum(float(s[k, m]) * float(t[j, m]) for m in dims) / temp
        return -d(s[k], t[j]) / temp

    b = s.shape[0]
    total = 0.0
    for k in range(b):
        num = math.exp(logit(k, k))
        den = sum(math.exp(logit(k, j)) for j in range(b))
        total += -math.log(num / den)
    return total / b


@pytest.mark.parametrize("distance,naive", [("sqeuclidean", "sq"), ("euclidean", "plain"), ("dot", "dot")])
def test_duc_equals_naive_loop(distance, naive):
    s = torch.randn(6, 10, generator=_gen(5), dtype=torch.float64)
    t = torch.randn(6, 10, generator=_gen(6), dtype=torch.float64)
    dims = [0, 3, 4, 8]
    got = duc_loss(s, t, torch.tensor(dims), temperature=0.7, distance=distance)
    assert got.dim() == 0
    assert float(got) == pytest.approx(_duc_naive(s, t, dims, 0.7, naive), rel=1e-5)


def _authors_supcon(a, v, audio_only, image_only, temperature):
    """SupConLoss.forward of fanyunfeng-bit/DI-MML loss/contrast_loss.py, transcribed (a no-op .T
    on 1-D tensors dropped)."""
    bsz = a.shape[0]
    a_loss, v_loss = 0, 0
    aof, iaof = a[:, audio_only], v[:, audio_only]
    iof, aiof = v[:, image_only], a[:, image_only]
    for i in range(bsz):
        v_loss += -torch.log(torch.exp(torch.matmul(iaof[i], aof[i].detach()) / temperature).sum()
                             / torch.exp(torch.matmul(iaof[i], aof.detach().T) / temperature).sum())
        a_loss += -torch.log(torch.exp(torch.matmul(aiof[i], iof[i].detach()) / temperature).sum()
                             / torch.exp(torch.matmul(aiof[i], iof.detach().T) / temperature).sum())
    return v_loss / bsz + a_loss / bsz


def test_duc_dot_reproduces_the_authors_released_loss():
    # post-ReLU, average-pooled-like features (non-negative), as the released encoders give
    a = torch.rand(8, 64, generator=_gen(7), dtype=torch.float64) * 3
    v = torch.rand(8, 64, generator=_gen(8), dtype=torch.float64) * 3
    a_to_v, v_to_a = torch.arange(0, 20), torch.arange(30, 45)   # audio-only and visual-only effective dims
    ours = (duc_loss(v, a, a_to_v, temperature=50.0, distance="dot")
            + duc_loss(a, v, v_to_a, temperature=50.0, distance="dot"))
    ref = _authors_supcon(a, v, a_to_v.tolist(), v_to_a.tolist(), 50.0)
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("distance", ["dot", "euclidean", "sqeuclidean"])
def test_duc_gradient_is_unidirectional_and_confined_to_dims(distance):
    s = torch.randn(5, 12, generator=_gen(9), requires_grad=True)
    t = torch.randn(5, 12, generator=_gen(10), requires_grad=True)
    dims = torch.tensor([1, 2, 7])
    duc_loss(s, t, dims, temperature=1.0, distance=distance).backward()
    assert t.grad is None                                   # teacher detached inside
    outside = torch.ones(12, dtype=torch.bool)
    outside[dims] = False
    assert torch.all(s.grad[:, outside] == 0)
    assert s.grad[:, dims].abs().sum() > 0


def test_duc_empty_dims_is_a_differentiable_zero():
    s = torch.randn(4, 8, generator=_gen(11), requires_grad=True)
    t = torch.randn(4, 8, generator=_gen(12), requires_grad=True)
    loss = duc_loss(s, t, torch.tensor([], dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(s.grad == 0) and t.grad is None


def test_duc_zero_distance_has_finite_gradient():
    # dead dims: student and teacher equal (zero) -> plain Euclidean would hit sqrt'(0) = inf
    s = torch.zeros(4, 6, requires_grad=True)
    t = torch.zeros(4, 6)
    for distance in ("euclidean", "sqeuclidean"):
        s.grad = None
        duc_loss(s, t, torch.arange(6), temperature=1.0, distance=distance).backward()
        assert torch.isfinite(s.grad).all()


def test_duc_temperature_and_distance_behave_as_expected():
    g = _gen(13)
    b, m = 8, 16
    t = torch.randn(b, m, generator=g, dtype=torch.float64)
    s = t + 0.1 * torch.randn(b, m, generator=g, dtype=torch.float64)     # aligned pairs
    dims = torch.arange(m)
    # aligned pairs: a sharper temperature separates the positive more -> lower loss
    sharp = duc_loss(s, t, dims, temperature=0.5, distance="sqeuclidean")
    soft = duc_loss(s, t, dims, temperature=5.0, distance="sqeuclidean")
    assert sharp < soft
    # infinite temperature -> uniform softmax over the batch -> log B, for every distance
    for dist in ("dot", "euclidean", "sqeuclidean"):
        assert float(duc_loss(s, t, dims, temperature=1e9, distance=dist)) == pytest.approx(math.log(b), rel=1e-6)
    # squared Euclidean at T equals dot at T/2 plus a -|t_j|^2/T bias on each candidate
    tau = 3.0
    bias = -(t ** 2).sum(1) / (2 * tau)
    ref = torch.nn.functional.cross_entropy(s @ t.T / tau + bias[None, :], torch.arange(b))
    got = duc_loss(s, t, dims, temperature=2 * tau, distance="sqeuclidean")
    assert float(got) == pytest.approx(float(ref), rel=1e-9)
    # ... so with equal teacher norms the two distances coincide, but not otherwise
    tn = t / t.norm(dim=1, keepdim=True) * 2.0
    assert float(duc_loss(s, tn, dims, temperature=2 * tau, distance="sqeuclidean")) == pytest.approx(
        float(duc_loss(s, tn, dims, temperature=tau, distance="dot")), rel=1e-9)
    assert float(got) != pytest.approx(float(duc_loss(s, t, dims, temperature=tau, distance="dot")), rel=1e-3)
    # default: the released code's dot product at T = 50; each distance has its own default T
    assert DUC_TEMPERATURE == {"dot": 50.0, "sqeuclidean": 100.0, "euclidean": 1.0}
    assert float(duc_loss(s, t, dims)) == float(duc_loss(s, t, dims, temperature=50.0, distance="dot"))
    for dist in ("dot", "euclidean", "sqeuclidean"):
        assert float(duc_loss(s, t, dims, distance=dist)) == float(
            duc_loss(s, t, dims, temperature=DUC_TEMPERATURE[dist], distance=dist))


def _duc_grad(s: torch.Tensor, t: torch.Tensor, distance: str, temperature: float) -> torch.Tensor:
    s = s.clone().requires_grad_(True)
    duc_loss(s, t, torch.arange(s.shape[1]), temperature=temperature, distance=distance).backward()
    return s.grad.flatten()


def test_duc_distances_give_different_gradients():
    g = _gen(15)
    # non-negative pooled-like features (values up to ~10) with teacher norms that vary across the batch
    t = torch.rand(16, 32, generator=g, dtype=torch.float64) * torch.linspace(1.5, 9.0, 16, dtype=torch.float64)[:, None]
    s = torch.rand(16, 32, generator=g, dtype=torch.float64) * 6
    dot, sq, plain = (_duc_grad(s, t, d, DUC_TEMPERATURE[d]) for d in ("dot", "sqeuclidean", "euclidean"))
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    # plain and squared Euclidean are different losses (not a rescaling of each other)
    assert cos(sq, plain) < 0.99
    assert not torch.allclose(_duc_grad(s, t, "euclidean", 1.0), _duc_grad(s, t, "sqeuclidean", 1.0))
    # squared Euclidean at T = 100 is not the dot product at T = 50 when teacher norms vary
    assert cos(dot, sq) < 0.9


def test_duc_rejects_bad_arguments():
    s = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="distance"):
        duc_loss(s, s, torch.arange(2), distance="cosine")
    with pytest.raises(ValueError, match="temperature"):
        duc_loss(s, s, torch.arange(2), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        duc_loss(s, torch.zeros(3, 5), torch.arange(2))


# ---------------------------------------------------------------------------------------
# MLB coefficients (MLB Eq. 4-7)

def test_mlb_coefficients_by_hand():
    probs = {"audio": torch.tensor([0.9, 0.7, 0.8]),     # s_a = 2.4
             "visual": torch.tensor([0.3, 0.5, 0.4])}    # s_v = 1.2
    k = mlb_coefficients(probs, alpha=1.0, beta_max=5.0)
    # audio: r = 1.2 / 2.4 = 0.5 < 1 -> beta = 2 -> 1 + tanh(-0.5) = 0.537882842739990
    # visual: r = 2.4 / 1.2 = 2 > 1 -> beta = 5 -> 1 + 4 tanh(1) = 4.046376623823720
    assert k["audio"] == pytest.approx(0.537882842739990, rel=1e-6)
    assert k["visual"] == pytest.approx(4.046376623823720, rel=1e-6)
    assert all(type(v) is float for v in k.values())
    # released-code default (tanh_mode unset): beta = 2 both ways -> visual 1 + tanh(1)
    k2 = mlb_coefficients(probs, alpha=1.0, beta_max=5.0, mode="tanh")
    assert k2["audio"] == pytest.approx(0.537882842739990, rel=1e-6)
    assert k2["visual"] == pytest.approx(1.761594155955765, rel=1e-6)
    # alpha steepens the curve: r = 2, alpha = 0.5 -> 1 + 4 tanh(0.5)
    assert mlb_coefficients(probs, alpha=0.5, beta_max=5.0)["visual"] == pytest.approx(1 + 4 * 0.462117157260010, rel=1e-6)


def test_mlb_three_modalities_and_balance():
    probs = {n: torch.tensor(v, dtype=torch.float64) for n, v in
             {"a": [0.2, 0.2], "b": [0.4, 0.4], "c": [0.6, 0.6]}.items()}
    k = mlb_coefficients(probs, alpha=2.0, beta_max=3.0)
    # s = 0.4, 0.8, 1.2; r_a = (0.8+1.2)/2/0.4 = 2.5; r_b = (0.4+1.2)/2/0.8 = 1; r_c = 0.6/1.2 = 0.5
    assert k["a"] == pytest.approx(1 + 2 * math.tanh(3.0), rel=1e-9)
    assert k["b"] == pytest.approx(1.0, abs=1e-12)
    assert k["c"] == pytest.approx(1 + math.tanh(-1.0), rel=1e-9)
    with pytest.raises(ValueError, match="equal batch size"):
        mlb_coefficients({"a": torch.ones(2), "b": torch.ones(3)}, 1.0, 2.0)


# ---------------------------------------------------------------------------------------
# ECE

def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # 5 bins: (.8,1]: {.9 right, .85 wrong} -> |0.5 - 0.875| * 2/4 = 0.1875
    #         (.6,.8]: {.7 right} -> 0.3 * 1/4 = 0.075;  (.4,.6]: {.55 wrong} -> 0.55 * 1/4 = 0.1375
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(0.4, abs=1e-12)
    # one bin: |acc - mean conf| = |0.5 - 0.75| = 0.25
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.25, abs=1e-12)


def test_ece_bin_edges_are_right_closed():
    # conf 0.6 belongs to (0.4, 0.6], alone: (|1 - .6| + |0 - .7|)/2 = 0.55; in (0.6, 0.8] it would be 0.15
    probs = np.array([[0.6, 0.2, 0.2], [0.7, 0.2, 0.1]])
    assert expected_calibration_error(probs, np.array([0, 2]), bins=5) == pytest.approx(0.55, abs=1e-12)


def test_ece_equals_loop_reference_on_random_data():
    g = _gen(14)
    probs = torch.softmax(3 * torch.randn(300, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 6, (300,), generator=g)
    n_bins = 15
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(300) if lo < float(probs[i].max()) <= hi]
        if members:
            acc = sum(int(probs[i].argmax()) == int(labels[i]) for i in members) / len(members)
            conf = sum(float(probs[i].max()) for i in members) / len(members)
            total += len(members) / 300 * abs(acc - conf)
    assert expected_calibration_error(probs.numpy(), labels.numpy()) == pytest.approx(total, abs=1e-12)

"""Methods on random tensors: gradient routing of every method, DI-MML separation, MLB's k_i,
DGL's zeroed-modality heads, Preds-Avg fusion, linear probes, metrics, augmentation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.augment import AugmentConfig, augment_frames
from training.evaluate import confusion_matrix, fit_probe, macro_f1
from training.losses import DUC_TEMPERATURE
from training.methods import REGISTRY, Batch, get_method
from training.methods.base import averaging_fusion, zero_modality_head
from training.models import build_av_model, build_model_config

K, D, FRAMES = 4, 64, 2   # tiny preset: feature dim 64


def tiny_model(fusion: str = "concat"):
    torch.manual_seed(0)
    return build_av_model(build_model_config("tiny", K, FRAMES, fusion))


def make_batch(b: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, 1, 64, 48, generator=g)
    frames = torch.randint(0, 256, (b, FRAMES, 32, 32, 3), generator=g, dtype=torch.uint8)
    return Batch(audio, frames, torch.arange(b) % K)


def make_method(name: str, fusion: str = "concat", **hp):
    cls = get_method(name)
    return cls(tiny_model(fusion), cls.make_hparams(hp, epochs=12), K)


def prepare(method, stage: str):
    """What the trainer does before a stage: only the stage's trainable modules take gradients."""
    for m in method.modules().values():
        m.requires_grad_(False)
        m.zero_grad(set_to_none=True)
    for m in method.trainable(stage).values():
        m.requires_grad_(True)
        m.train()


def grads_of(module) -> list:
    return [p.grad for p in module.parameters()]


def has_grad(module) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads_of(module))


def zero_grad(module) -> bool:
    """Exactly zero: no gradient at all, or only zeros."""
    return all(g is None or bool((g == 0).all()) for g in grads_of(module))


def set_dims(method) -> None:
    """DUC transfer sets that are non-empty both ways."""
    idx = torch.arange(D)
    eff_a, eff_v = idx < D // 2, idx % 2 == 0
    method.dims = {"audio": torch.nonzero(eff_v & ~eff_a).flatten(), "visual": torch.nonzero(eff_a & ~eff_v).flatten()}


# ---------------------------------------------------------------------------------------
# registry and interface

def test_registry_holds_every_method_and_variant():
    assert {"dimml", "dimml-duc", "dimml-sclf", "mmclf", "joint", "mlb", "dgl", "unimodal", "preds-avg"} <= set(REGISTRY)
    with pytest.raises(ValueError, match="unknown method 'nope'.*dimml"):
        get_method("nope")
    with pytest.raises(ValueError, match="no hyper-parameter.*lambda_x"):
        get_method("dimml").make_hparams({"lambda_x": 1})
    hp = get_method("dimml").make_hparams({}, epochs=150)
    assert (hp.lambda_s, hp.lambda_d, hp.warmup, hp.sep_every) == (1.0, 1.0, 20, 0)   # the paper
    assert hp.duc_temperature == DUC_TEMPERATURE[hp.duc_distance]
    assert get_method("mmclf").make_hparams({}).lambda_s == 0 and get_method("dimml-sclf").make_hparams({}).lambda_d == 0
    assert get_method("dimml").weighting and not get_method("dimml-duc").weighting


# every (method, stage): trainable parameters all get a gradient (DDP runs without
# find_unused_parameters) and no other parameter gets one
CASES = [(name, stage) for name, cls in sorted(REGISTRY.items()) for stage in cls.stages]


@pytest.mark.parametrize("name,stage", CASES)
def test_gradients_reach_exactly_the_trainable_parameters(name, stage):
    method = make_method(name)
    if name in ("dimml", "dimml-duc"):
        set_dims(method)
    prepare(method, stage)
    res = method.step(stage, make_batch(), method.nets(stage))
    total = sum(res.losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = {id(p) for m in method.trainable(stage).values() for p in m.parameters()}
    for mod_name, module in method.modules().items():
        for pname, p in module.named_parameters():
            if id(p) in trainable:
                assert p.grad is not None, f"{name}/{stage}: {mod_name}.{pname} got no gradient"
            else:
                assert p.grad is None, f"{name}/{stage}: frozen {mod_name}.{pname} got a gradient"
    for out, z in res.logits.items():
        assert z.shape == (8, K), out


# ---------------------------------------------------------------------------------------
# DI-MML

@pytest.mark.parametrize("student,other", [("audio", "visual"), ("visual", "audio")])
def test_dimml_modality_loss_never_reaches_the_other_encoder(student, other):
    method = make_method("dimml")
    set_dims(method)
    prepare(method, "encoders")
    res = method.step("encoders", make_batch(), method.nets("encoders"))
    assert {"duc_audio", "duc_visual", "sclf_audio", "sclf_visual"} <= set(res.logs)   # all terms of Eq. 7 active
    res.losses[student].backward()
    mine, theirs = getattr(method.model, student), getattr(method.model, other)
    assert has_grad(mine.encoder) and has_grad(mine.head) and has_grad(method.extras["sclf"])
    assert zero_grad(theirs.encoder) and zero_grad(theirs.head)
    assert zero_grad(method.model.fusion)


def test_dimml_fusion_stage_freezes_the_encoders():
    method = make_method("dimml")
    prepare(method, "fusion")
    res = method.step("fusion", make_batch(), method.nets("fusion"))
    assert set(res.losses) == {"fused"}
    res.losses["fused"].backward()
    assert has_grad(method.model.fusion)
    assert zero_grad(method.model.audio) and zero_grad(method.model.visual) and zero_grad(method.extras["sclf"])


class FakeContext:
    """Train features where dims 0-15 tell the class in audio and dims 16-31 in visual."""

    num_classes, device = K, torch.device("cpu")

    def __init__(self):
        self.calls, self.lines = 0, []

    def features(self, split):
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        y = torch.arange(200) % K
        a, v = torch.randn(200, D, generator=g), torch.randn(200, D, generator=g)
        a[:, :16] += 4 * y[:, None]
        v[:, 16:32] += 4 * y[:, None]
        return {"audio": a, "visual": v, "labels": y}

    def broadcast(self, obj):
        return obj

    def all_reduce_sum(self, t):
        return t

    def log(self, msg):
        self.lines.append(msg)


@pytest.mark.parametrize("sep_every,separations", [(0, [2]), (2, [2, 4])])
def test_dimml_separates_dimensions_after_warmup(sep_every, separations):
    method = make_method("dimml", warmup=2, sep_every=sep_every)
    ctx = FakeContext()
    done = []
    for epoch in range(5):
        before = ctx.calls
        method.on_epoch_start("encoders", epoch, ctx)
        if ctx.calls > before:
            done.append(epoch)
        if epoch < 2:
            assert method.dims is None
    assert done == separations
    # audio learns where only visual is effective (16..31), visual where only audio is (0..15)
    assert set(method.dims["audio"].tolist()) == set(range(16, 32))
    assert set(method.dims["visual"].tolist()) == set(range(16))
    assert "dimension separation at epoch 2" in ctx.lines[0]
    restored = make_method("dimml")
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.dims["audio"], method.dims["audio"])


def test_dimml_without_duc_weight_never_separates():
    method = make_method("dimml-sclf", warmup=0)
    ctx = FakeContext()
    method.on_epoch_start("encoders", 5, ctx)
    assert ctx.calls == 0 and method.dims is None


# ---------------------------------------------------------------------------------------
# DGL and MLB

def test_dgl_routes_fused_loss_to_fusion_and_unimodal_losses_to_encoders():
    method = make_method("dgl")
    model = method.model
    batch = make_batch()
    for term, trained, untouched in [("fused", [model.fusion], [model.audio.encoder, model.visual.encoder]),
                                     ("audio", [model.audio.encoder], [model.fusion, model.visual.encoder]),
                                     ("visual", [model.visual.encoder], [model.fusion, model.audio.encoder])]:
        prepare(method, "joint")
        res = method.step("joint", batch, method.nets("joint"))
        res.losses[term].backward()
        assert all(has_grad(m) for m in trained), term
        assert all(zero_grad(m) for m in untouched), term
    # the unimodal prediction is the fusion head with the other modality zeroed
    model.eval()
    with torch.no_grad():
        res = method.step("joint", batch, method.nets("joint"))
        h_a = model.audio.encoder(batch.audio)
        torch.testing.assert_close(res.logits["audio"], model.fusion(h_a, torch.zeros_like(h_a)))
        assert res.losses["audio"] == pytest.approx(4.0 * torch.nn.functional.cross_entropy(
            res.logits["audio"], batch.label).item(), rel=1e-5)   # alpha = 4


@pytest.mark.parametrize("alpha,beta_max", [(0.5, 10.0), (2.0, 3.0)])
def test_mlb_coefficients_follow_the_formula(alpha, beta_max):
    method = make_method("mlb", alpha=alpha, beta_max=beta_max)
    prepare(method, "joint")
    batch = make_batch(seed=3)
    res = method.step("joint", batch, method.nets("joint"))
    k = method.lr_scales()
    s = {}
    for m in ("audio", "visual"):
        p = res.logits[m].detach().double().softmax(1).numpy()
        s[m] = sum(p[i, int(batch.label[i])] for i in range(len(p)))
    for m, o in (("audio", "visual"), ("visual", "audio")):
        r = s[o] / s[m]
        beta = beta_max if r > 1 else 2.0
        assert k[m] == pytest.approx(1 + (beta - 1) * math.tanh(alpha * (r - 1)), rel=1e-6)
    assert {"k_audio", "k_visual"} <= set(res.logs)
    groups = {g["name"] for g in method.param_groups("joint")}
    assert {"audio", "visual"} <= groups   # the groups the trainer scales by name


# ---------------------------------------------------------------------------------------
# exported heads

@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_zero_modality_head_is_the_fusion_with_the_other_modality_zeroed(fusion):
    head_of = tiny_model(fusion).fusion
    x = torch.randn(5, D) * 2
    z = torch.zeros_like(x)
    for side, expect in (("audio", head_of(x, z)), ("visual", head_of(z, x))):
        head = zero_modality_head(head_of, side, D)
        if fusion == "gated" and side == "audio":
            assert head is None   # sigmoid of the audio features: not a linear head
            continue
        torch.testing.assert_close(head(x), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_averaging_fusion_outputs_the_mean_of_the_heads(fusion):
    model = tiny_model(fusion)
    averaging_fusion(model.audio.head, model.visual.head, model.fusion)
    a, v = torch.randn(5, D), torch.randn(5, D)
    with torch.no_grad():
        torch.testing.assert_close(model.fusion(a, v), (model.audio.head(a) + model.visual.head(v)) / 2)
    with pytest.raises(ValueError, match="concat or sum"):
        averaging_fusion(model.audio.head, model.visual.head, tiny_model("film").fusion)


# ---------------------------------------------------------------------------------------
# evaluation pieces

def test_linear_probe_separates_separable_features_deterministically():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(160) % K
    centres = torch.randn(K, 16, generator=g) * 3
    x = centres[y] + torch.randn(160, 16, generator=g) + 50    # offset: the probe standardises
    train, test = slice(0, 120), slice(120, 160)
    probe = fit_probe(x[train], y[train], K)
    with torch.no_grad():
        assert (probe(x[test]).argmax(1) == y[test]).float().mean() >= 0.95
    again = fit_probe(x[train], y[train], K)
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)


def test_macro_f1_and_confusion_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))   # class 4 never predicted
    yt, pt = torch.from_numpy(y), torch.from_numpy(pred)
    assert macro_f1(pt, yt, 6) == pytest.approx(metrics.f1_score(y, pred, average="macro"))
    np.testing.assert_array_equal(confusion_matrix(pt, yt, 5).numpy(), metrics.confusion_matrix(y, pred))


# ---------------------------------------------------------------------------------------
# augmentation

def test_augmentation_identity_flip_and_per_clip_crops():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 2, 24, 32, 3), generator=g, dtype=torch.uint8)
    keep = AugmentConfig(scale=(1, 1), ratio=(32 / 24, 32 / 24), flip=0.0)
    out = augment_frames(frames, keep, torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and out.shape == frames.shape
    torch.testing.assert_close(out, frames.float(), atol=1e-3, rtol=0)
    flipped = augment_frames(frames, AugmentConfig(scale=(1, 1), ratio=(32 / 24, 32 / 24), flip=1.0))
    torch.testing.assert_close(flipped, frames.flip(3).float(), atol=1e-3, rtol=0)
    # random crops: seeded, within the pixel range, one crop per clip (equal frames stay equal)
    same = frames.clone()
    same[:, 1] = same[:, 0]
    a = augment_frames(same, generator=torch.Generator().manual_seed(7))
    b = augment_frames(same, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 255
    torch.testing.assert_close(a[:, 0], a[:, 1])
    assert not torch.allclose(a, same.float())

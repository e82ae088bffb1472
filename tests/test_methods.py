"""Methods on in-memory tensors, for every setting: gradient routing of every method and stage,
DI-MML's separation and DUC per ordered pair, MLB's k_i, DGL's zeroed-modality heads, Preds-Avg
fusion, fusion heads for M modalities, linear probes, metrics, augmentation."""
from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dimml.metrics import confusion, macro_f1
from dimml.modalities import parse_modalities, preprocess_for
from training.augment import AugmentConfig, augment_frames
from training.evaluate import evaluate, fit_probe
from training.losses import DUC_TEMPERATURE, transfer_dimensions
from training.methods import REGISTRY, Batch, get_method
from training.methods.base import averaging_fusion, zero_modality_head
from training.models import FUSION, MultiModel, StackEncoder, build_model, build_model_config

from conftest import SETTINGS

K, D = 4, 64   # tiny preset: feature dim 64
AV = "audio,visual"
# Smaller inputs than the tiny preset's, same kinds and encoders: every test stays fast.
SMALL = {"audio": {"seconds": 0.2, "nperseg": 128, "noverlap": 64}, "frames": {"height": 32, "width": 32},
         "flow": {"height": 32, "width": 32}, "image": {"height": 32, "width": 32}}


def small_preprocess(setting: str):
    """The tiny preset's specs for a setting, with small arrays."""
    over = {f"{s.name}.{k}": v for s in parse_modalities(setting, "tiny") for k, v in SMALL[s.kind].items()}
    return preprocess_for("tiny", setting, over)


def tiny_model(setting: str = AV, fusion: str = "concat") -> MultiModel:
    torch.manual_seed(0)
    pp = small_preprocess(setting)
    return build_model(build_model_config("tiny", K, pp, fusion), pp)


def make_inputs(setting: str, b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """One batch of each modality's array, of its spec's shape and dtype."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in small_preprocess(setting).modalities:
        shape = (b, *s.shape)
        if s.dtype == np.uint8:
            out[s.name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            out[s.name] = torch.randn(shape, generator=g)
    return out


def make_batch(setting: str = AV, b: int = 8, seed: int = 0) -> Batch:
    return Batch(make_inputs(setting, b, seed), torch.arange(b) % K)


_TEACHERS: dict = {}


def teacher_run(setting: str = AV, fusion: str = "concat") -> Path:
    """A finished `unimodal` run holding tiny_model's weights: UMT's teachers (equal to its student)."""
    key = (setting, fusion)
    if key not in _TEACHERS:
        from training.run import run_config_fields, save_run_model
        out = Path(tempfile.mkdtemp(prefix="umt-teachers-"))
        atexit.register(shutil.rmtree, out, True)
        pp = small_preprocess(setting)
        fields = run_config_fields(pp, build_model_config("tiny", K, pp, fusion), [f"c{k}" for k in range(K)])
        save_run_model(out, {"method": "unimodal", **fields}, tiny_model(setting, fusion))
        (out / "report.json").write_text("{}")
        _TEACHERS[key] = out
    return _TEACHERS[key]


def make_method(name: str, setting: str = AV, fusion: str = "concat", **hp):
    cls = get_method(name)
    if name == "umt":   # the only method that needs a finished run: its teachers
        hp.setdefault("teachers", str(teacher_run(setting, fusion)))
    return cls(tiny_model(setting, fusion), cls.make_hparams(hp, epochs=12), K)


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


def effective_masks(names) -> dict[str, torch.Tensor]:
    """A block of dims effective for each modality alone, plus some effective for all."""
    idx = torch.arange(D)
    return {n: ((idx // 4) % len(names) == k) | (idx % 7 == 0) for k, n in enumerate(names)}


def set_dims(method) -> None:
    """DUC transfer sets that are non-empty for every ordered pair."""
    method.dims = transfer_dimensions(effective_masks(method.names))
    assert all(d.numel() > 0 for row in method.dims.values() for d in row.values())


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
    # every method chooses its final output on validation but the Table 3 ablations (their fusion head)
    assert {n for n, m in REGISTRY.items() if not m.chooses_output} == {"dimml-duc", "dimml-sclf", "mmclf"}


# every (method, stage, setting): trainable parameters all get a gradient (DDP runs without
# find_unused_parameters) and no other parameter gets one
CASES = [(name, stage) for name, cls in sorted(REGISTRY.items()) for stage in cls.stages]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name,stage", CASES)
def test_gradients_reach_exactly_the_trainable_parameters(name, stage, setting):
    method = make_method(name, setting)
    if name in ("dimml", "dimml-duc"):
        set_dims(method)
    prepare(method, stage)
    res = method.step(stage, make_batch(setting), method.nets(stage))
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
    assert set(res.logits) <= {*method.names, FUSION}


@pytest.mark.parametrize("setting", SETTINGS)
def test_model_modules_are_the_modalities_and_fusion(setting):
    model = tiny_model(setting)
    names = tuple(s.name for s in parse_modalities(setting))
    assert model.names == names and tuple(model.modules()) == (*names, "fusion")
    feats, logits = model.eval()(make_inputs(setting, b=3))
    assert set(feats) == set(names) and all(f.shape == (3, D) for f in feats.values())
    assert set(logits) == {*names, "fusion"} and all(z.shape == (3, K) for z in logits.values())
    # the batch stays symbolic: one sample alone gives what it gives inside a batch (eval mode)
    one, _ = model({n: x[1:2] for n, x in make_inputs(setting, b=3).items()})
    for n in names:
        torch.testing.assert_close(one[n][0], feats[n][1], rtol=1e-4, atol=1e-5)


def test_encoders_follow_the_kind():
    model = tiny_model("audio,visual,flow")
    stem = lambda n: model.branches[n].encoder.net.stem[0].in_channels
    assert (stem("audio"), stem("visual"), stem("flow")) == (1, 3, 2)
    enc = model.branches["flow"].encoder
    assert isinstance(enc, StackEncoder) and enc.num_images == 2
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor([127.5, 127.5]))
    # normalisation inside the model: uint8 input and the same pixels as float give the same features
    x = make_inputs("audio,visual,flow", b=2)["visual"]
    vis = model.branches["visual"].eval()
    torch.testing.assert_close(vis(x)[0], vis(x.float())[0])


# ---------------------------------------------------------------------------------------
# fusion heads for M modalities

def test_fusion_heads_take_m_inputs_and_film_gated_refuse_more_than_two():
    setting = "audio,visual,flow"
    feats = [torch.randn(5, D) for _ in range(3)]
    concat, summed = tiny_model(setting, "concat").fusion, tiny_model(setting, "sum").fusion
    with torch.no_grad():
        torch.testing.assert_close(concat(*feats), concat.fc(torch.cat(feats, 1)))
        torch.testing.assert_close(summed(*feats), sum(fc(h) for fc, h in zip(summed.fcs, feats)))
    with pytest.raises(ValueError, match="expects 3 feature tensors, got 2"):
        concat(*feats[:2])
    pp = small_preprocess(setting)
    for fusion in ("film", "gated"):
        with pytest.raises(ValueError, match=f"{fusion} fusion takes 2 modalities, not 3"):
            build_model_config("tiny", K, pp, fusion)
        assert tiny_model(AV, fusion).fusion(*feats[:2]).shape == (5, K)


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_zero_modality_head_is_the_fusion_with_the_other_modality_zeroed(fusion):
    head_of = tiny_model(AV, fusion).fusion
    x = torch.randn(5, D) * 2
    z = torch.zeros_like(x)
    for index, expect in ((0, head_of(x, z)), (1, head_of(z, x))):
        head = zero_modality_head(head_of, index, D)
        if fusion == "gated" and index == 0:
            assert head is None   # sigmoid of the first modality's features: not a linear head
            continue
        torch.testing.assert_close(head(x), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_zero_modality_head_for_three_modalities(fusion):
    head_of = tiny_model("audio,visual,flow", fusion).fusion
    x = torch.randn(5, D) * 2
    z = torch.zeros_like(x)
    for index in range(3):
        expect = head_of(*(x if i == index else z for i in range(3)))
        torch.testing.assert_close(zero_modality_head(head_of, index, D)(x), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting", [AV, "audio,visual,flow"])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_averaging_fusion_outputs_the_mean_of_the_heads(fusion, setting):
    model = tiny_model(setting, fusion)
    heads = [model.branches[n].head for n in model.names]
    averaging_fusion(heads, model.fusion)
    h = [torch.randn(5, D) for _ in heads]
    with torch.no_grad():
        torch.testing.assert_close(model.fusion(*h), sum(hd(x) for hd, x in zip(heads, h)) / len(heads))
    with pytest.raises(ValueError, match="concat or sum"):
        averaging_fusion(heads[:2], tiny_model(AV, "film").fusion)


# ---------------------------------------------------------------------------------------
# DI-MML

@pytest.mark.parametrize("setting", SETTINGS)
def test_dimml_modality_loss_never_reaches_another_encoder(setting):
    for student in parse_modalities(setting):
        method = make_method("dimml", setting)
        set_dims(method)
        prepare(method, "encoders")
        res = method.step("encoders", make_batch(setting), method.nets("encoders"))
        # all terms of Eq. 7 active, for every modality
        assert {f"{t}_{n}" for t in ("duc", "sclf") for n in method.names} <= set(res.logs)
        res.losses[student.name].backward()
        mine = method.model.branches[student.name]
        assert has_grad(mine.encoder) and has_grad(mine.head) and has_grad(method.extras["sclf"])
        for other in method.names:
            if other != student.name:
                theirs = method.model.branches[other]
                assert zero_grad(theirs.encoder) and zero_grad(theirs.head), (student.name, other)
        assert zero_grad(method.model.fusion)


@pytest.mark.parametrize("setting", [AV, "audio,visual,flow"])
def test_duc_gradient_lands_only_on_each_students_pair_dims(setting):
    """The DUC part of L_i moves h_i only on the dims of its pairs (i <- j), and nothing of any teacher."""
    method = make_method("dimml", setting, lambda_s=0.0)
    set_dims(method)
    batch = make_batch(setting, seed=5)

    def feature_grads(lambda_d: float) -> dict[str, dict[str, torch.Tensor | None]]:
        """{loss of student i: {modality n: d L_i / d h_n}}."""
        method.hp.lambda_d = lambda_d
        out = {}
        for i in method.names:
            prepare(method, "encoders")
            nets, feats = method.nets("encoders"), {}
            for n in method.names:
                def run(x, branch=nets[n], n=n, feats=feats):
                    h, z = branch(x)
                    h.retain_grad()
                    feats[n] = h
                    return h, z
                nets[n] = run
            method.step("encoders", batch, nets).losses[i].backward()
            out[i] = {n: feats[n].grad for n in method.names}
        return out

    with_duc, without = feature_grads(1.0), feature_grads(0.0)
    for i in method.names:
        pair_dims = torch.zeros(D, dtype=torch.bool)
        for dims in method.dims[i].values():
            pair_dims[dims] = True
        duc = with_duc[i][i] - without[i][i]               # the DUC term's gradient on the student
        assert torch.all(duc[:, ~pair_dims] == 0), i
        for j, dims in method.dims[i].items():             # every teacher pulls on its own dims
            assert duc[:, dims].abs().sum() > 0, (i, j)
        for j in method.names:
            if j != i:
                assert with_duc[i][j] is None or bool((with_duc[i][j] == 0).all()), (i, j)   # teachers detached


@pytest.mark.parametrize("setting", SETTINGS)
def test_dimml_fusion_stage_freezes_the_encoders(setting):
    method = make_method("dimml", setting)
    prepare(method, "fusion")
    res = method.step("fusion", make_batch(setting), method.nets("fusion"))
    assert set(res.losses) == {"fusion"}
    res.losses["fusion"].backward()
    assert has_grad(method.model.fusion)
    assert all(zero_grad(method.model.branches[n]) for n in method.names) and zero_grad(method.extras["sclf"])


class FakeContext:
    """Train features where dims 16k..16k+15 tell the class in the k-th modality."""

    num_classes, device = K, torch.device("cpu")

    def __init__(self, names):
        self.names, self.calls, self.lines = names, 0, []

    def features(self, split):
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        y = torch.arange(200) % K
        feats = {n: torch.randn(200, D, generator=g) for n in self.names}
        for k, n in enumerate(self.names):
            feats[n][:, 16 * k:16 * (k + 1)] += 4 * y[:, None]
        return feats, y

    def broadcast(self, obj):
        return obj

    def all_reduce_sum(self, t):
        return t

    def log(self, msg):
        self.lines.append(msg)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("sep_every,separations", [(0, [2]), (2, [2, 4])])
def test_dimml_separates_dimensions_after_warmup(sep_every, separations, setting):
    method = make_method("dimml", setting, warmup=2, sep_every=sep_every)
    ctx = FakeContext(method.names)
    done = []
    for epoch in range(5):
        before = ctx.calls
        method.on_epoch_start("encoders", epoch, ctx)
        if ctx.calls > before:
            done.append(epoch)
        if epoch < 2:
            assert method.dims is None
    assert done == separations
    # each student learns from each teacher where only the teacher is effective
    for student in method.names:
        assert set(method.dims[student]) == set(method.names) - {student}
        for j, teacher in enumerate(method.names):
            if teacher != student:
                assert set(method.dims[student][teacher].tolist()) == set(range(16 * j, 16 * (j + 1)))
    assert "dimension separation at epoch 2" in ctx.lines[0]
    restored = make_method("dimml", setting)
    restored.load_state_dict(method.state_dict())
    a, b = method.names[:2]
    assert torch.equal(restored.dims[a][b], method.dims[a][b])


def test_dimml_two_modalities_is_the_papers_pair():
    method = make_method("dimml", warmup=2)
    ctx = FakeContext(method.names)
    method.on_epoch_start("encoders", 2, ctx)
    # audio learns where only visual is effective (16..31), visual where only audio is (0..15)
    assert set(method.dims["audio"]["visual"].tolist()) == set(range(16, 32))
    assert set(method.dims["visual"]["audio"].tolist()) == set(range(16))


def test_dimml_without_duc_weight_never_separates():
    method = make_method("dimml-sclf", warmup=0)
    ctx = FakeContext(method.names)
    method.on_epoch_start("encoders", 5, ctx)
    assert ctx.calls == 0 and method.dims is None


def test_methods_say_how_many_modalities_they_need():
    one = "visual"
    for name in ("dimml", "mlb", "dgl"):
        with pytest.raises(ValueError, match=f"method '{name}' needs at least 2 modalities, got 1"):
            make_method(name, one)
    for name in ("unimodal", "joint"):
        method = make_method(name, one)
        stage = method.stages[0]
        prepare(method, stage)
        res = method.step(stage, make_batch(one), method.nets(stage))
        sum(res.losses.values()).backward()
        assert has_grad(method.model.branches["visual"].encoder)


# ---------------------------------------------------------------------------------------
# DGL and MLB

@pytest.mark.parametrize("setting", SETTINGS)
def test_dgl_routes_fused_loss_to_fusion_and_unimodal_losses_to_encoders(setting):
    method = make_method("dgl", setting)
    model = method.model
    enc = {n: model.branches[n].encoder for n in method.names}
    batch = make_batch(setting)
    terms = [("fusion", [model.fusion], list(enc.values()))]
    terms += [(n, [enc[n]], [model.fusion, *(e for m, e in enc.items() if m != n)]) for n in method.names]
    for term, trained, untouched in terms:
        prepare(method, "joint")
        res = method.step("joint", batch, method.nets("joint"))
        res.losses[term].backward()
        assert all(has_grad(m) for m in trained), term
        assert all(zero_grad(m) for m in untouched), term
    # the unimodal prediction is the fusion head with the other modalities zeroed
    model.eval()
    with torch.no_grad():
        res = method.step("joint", batch, method.nets("joint"))
        h = {n: enc[n](batch.inputs[n]) for n in method.names}
        for n in method.names:
            zeroed = [h[m] if m == n else torch.zeros_like(h[m]) for m in method.names]
            torch.testing.assert_close(res.logits[n], model.fusion(*zeroed))
            assert res.losses[n] == pytest.approx(4.0 * torch.nn.functional.cross_entropy(
                res.logits[n], batch.label).item(), rel=1e-5)   # alpha = 4


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("alpha,beta_max", [(0.5, 10.0), (2.0, 3.0)])
def test_mlb_coefficients_follow_the_formula(alpha, beta_max, setting):
    method = make_method("mlb", setting, alpha=alpha, beta_max=beta_max)
    prepare(method, "joint")
    batch = make_batch(setting, seed=3)
    res = method.step("joint", batch, method.nets("joint"))
    k = method.lr_scales()
    s = {}
    for m in method.names:
        p = res.logits[m].detach().double().softmax(1).numpy()
        s[m] = sum(p[i, int(batch.label[i])] for i in range(len(p)))
    for m in method.names:
        others = [s[o] for o in method.names if o != m]
        r = sum(others) / len(others) / s[m]
        beta = beta_max if r > 1 else 2.0
        assert k[m] == pytest.approx(1 + (beta - 1) * math.tanh(alpha * (r - 1)), rel=1e-6)
    assert {f"k_{n}" for n in method.names} <= set(res.logs)
    groups = {g["name"] for g in method.param_groups("joint")}
    assert set(method.names) <= groups   # the groups the trainer scales by name
    assert set(k) == set(method.names)


# ---------------------------------------------------------------------------------------
# evaluation pieces

def test_evaluate_forced_paper_rule_weighs_every_head_and_fusion_and_reports_per_modality():
    from dimml.weighting import weigh
    setting = "audio,visual,flow"
    model = tiny_model(setting)
    batches = [(make_inputs(setting, b=6, seed=s), torch.arange(6) % K) for s in range(3)]
    loaders = {"train": batches[:2], "val": batches[2:], "test": batches[1:]}
    report = evaluate(model, loaders, method="dimml", num_classes=K, classes=[f"c{k}" for k in range(K)],
                      chooses=True, lw_temperature=0.5, device=torch.device("cpu"), progress=False,
                      final_output="paper-lw")
    out = report["final_output"]
    assert out["forced"] and out["rule"] == {"name": "paper-lw", "rule": "weighted", "branch": None,
                                             "temperature": 0.5, "prior": {}, "reason": out["reason"]}
    m = report["metrics"]
    assert set(m) == {"final", "fusion", "audio", "visual", "flow", "probe"}
    assert set(m["probe"]) == {"audio", "visual", "flow"}
    _, logits = model.eval()(  # the weighted output by hand, over the three heads and fusion
        {n: torch.cat([b[0][n] for b in batches[1:]]) for n in model.names})
    z, _, _ = weigh([logits[n].numpy() for n in ("audio", "visual", "flow", "fusion")], 0.5)
    labels = torch.cat([b[1] for b in batches[1:]])
    want = float((torch.from_numpy(z).argmax(1) == labels).double().mean())
    assert m["final"]["accuracy"] == pytest.approx(want)


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
    assert macro_f1(pred, y, 6) == pytest.approx(metrics.f1_score(y, pred, average="macro"))
    np.testing.assert_array_equal(confusion(pred, y, 5), metrics.confusion_matrix(y, pred))


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
    # a still image (N = 1) too
    image = frames[:, :1]
    torch.testing.assert_close(augment_frames(image, keep), image.float(), atol=1e-3, rtol=0)

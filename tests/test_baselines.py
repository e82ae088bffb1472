"""The Table 2 baselines (OGM-GE, PMR, UMT, MSLR, MSES): each one's own mechanism on in-memory
tensors, the trainer hooks they use, and `fit` of each on a synthetic corpus (image setting in
the fast lane, audio,visual slow)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from training.methods.base import fusion_slices, heads_from_fusion
from training.methods.ogm_ge import ogm_coefficients
from training.methods.pmr import class_means
from training.synth import SynthConfig, synthesize
from training.trainer import TrainConfig, fit

from test_methods import AV, FakeContext, K, make_batch, make_method, prepare, teacher_run

THREE = "audio,visual,flow"
IMAGES = "front:image,rear:image"


def grads(module) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.detach().clone() for k, p in module.named_parameters()}


def nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


# ---------------------------------------------------------------------------------------
# OGM-GE

def true_class_score(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> float:
    return float((h @ w.T + b).double().softmax(1).gather(1, y[:, None]).sum())


@pytest.mark.parametrize("setting", [AV, THREE])
def test_ogm_ge_scales_the_stronger_encoders_conv_gradients(setting):
    method = make_method("ogm-ge", setting, ge=False, alpha=0.8)
    ctx = FakeContext(method.names)
    method.on_epoch_start("joint", 0, ctx)
    prepare(method, "joint")
    batch = make_batch(setting, seed=4)
    res = method.step("joint", batch, method.nets("joint"))
    sum(res.losses.values()).backward()
    before = {n: grads(method.branch(n).encoder) for n in method.names}
    fusion_before = grads(method.model.fusion)
    # k by hand: the concat head's slices with the bias split evenly, summed true-class softmax
    with torch.no_grad():
        feats = [method.branch(n).encoder(batch.inputs[n]) for n in method.names]
    m = len(method.names)
    w, b = method.model.fusion.fc.weight.detach(), method.model.fusion.fc.bias.detach()
    s = [true_class_score(h, w[:, i * 64:(i + 1) * 64], b / m, batch.label) for i, h in enumerate(feats)]
    if m == 2:
        rho = s[1] / s[0]
        k = [1.0, 1 - math.tanh(0.8 * rho)] if rho > 1 else [1 - math.tanh(0.8 / rho), 1.0]
    else:
        k = [1 - math.tanh(0.8 * x / min(s)) if x > min(s) else 1.0 for x in s]
    assert [method.k[n] for n in method.names] == pytest.approx(k, rel=1e-5)
    assert sum(x < 1 for x in k) >= 1 and k[s.index(min(s))] == 1.0   # the stronger is slowed, the weakest not
    method.after_backward("joint", method.nets("joint"))
    for n, kn in zip(method.names, k):
        for name, p in method.branch(n).encoder.named_parameters():
            if p.dim() == 4:   # conv weights: scaled by k
                torch.testing.assert_close(p.grad, before[n][name] * kn, rtol=1e-6, atol=0)
            else:              # BN: untouched
                assert torch.equal(p.grad, before[n][name]), (n, name)
    for name, g in grads(method.model.fusion).items():   # the head's gradients are left alone
        assert torch.equal(g, fusion_before[name])


def test_ogm_ge_noise_on_both_encoders_and_window():
    method = make_method("ogm-ge", AV, start=1, end=1)
    ctx = FakeContext(method.names)
    for epoch, active in ((0, False), (1, True)):
        method.on_epoch_start("joint", epoch, ctx)
        prepare(method, "joint")
        res = method.step("joint", make_batch(AV, seed=2), method.nets("joint"))
        res.losses["fusion"].backward()
        before = {n: grads(method.branch(n).encoder) for n in method.names}
        method.after_backward("joint", method.nets("joint"))
        for n in method.names:
            conv = [(name, p) for name, p in method.branch(n).encoder.named_parameters() if p.dim() == 4]
            name, p = max(conv, key=lambda c: c[1].numel())
            noise = p.grad - before[n][name] * method.k[n]
            if not active:
                assert torch.equal(p.grad, before[n][name])
            else:   # N(0, std(g)^2) on every encoder, the k = 1 one too
                assert float(noise.std()) == pytest.approx(float(before[n][name].std()), rel=0.15)


def test_ogm_ge_needs_the_concat_fusion_and_two_or_more_modalities():
    with pytest.raises(ValueError, match="'ogm-ge' needs the concat fusion.*'sum'"):
        make_method("ogm-ge", AV, fusion="sum")
    with pytest.raises(ValueError, match="'ogm-ge' supports fusion \\('concat',\\), not 'sum'"):
        TrainConfig(data="d", out="o", method="ogm-ge", fusion="sum").resolve()
    with pytest.raises(ValueError, match="'ogm-ge' needs at least 2 modalities, got 1"):
        make_method("ogm-ge", "visual")
    assert ogm_coefficients([1.0, 1.0], 0.5) == pytest.approx([1 - math.tanh(0.5), 1.0])   # a tie slows the first
    assert ogm_coefficients([2.0, 1.0, 4.0], 0.1) == pytest.approx([1 - math.tanh(0.2), 1.0, 1 - math.tanh(0.4)])


def test_slice_heads_are_the_concat_slices():
    method = make_method("ogm-ge", THREE)
    assert heads_from_fusion(method.model)
    h = [torch.randn(5, 64) for _ in method.names]
    with torch.no_grad():
        total = sum(method.branch(n).head(x) for n, x in zip(method.names, h))
        torch.testing.assert_close(total, method.model.fusion(*h))   # b/M each: the slices sum to the head
    assert fusion_slices(make_method("pmr", AV, fusion="film").model.fusion) is None


# ---------------------------------------------------------------------------------------
# PMR

@pytest.mark.parametrize("setting", [AV, THREE])
def test_pmr_prototype_loss_reaches_only_the_weaker_encoder(setting):
    method = make_method("pmr", setting)
    g = torch.Generator().manual_seed(0)
    method.protos = {n: torch.randn(K, 64, generator=g) for n in method.names}
    method.epoch = 0
    prepare(method, "joint")
    res = method.step("joint", make_batch(setting, seed=1), method.nets("joint"))
    weak = [n for n in method.names if res.logs[f"weak_{n}"]]
    assert 1 <= len(weak) < len(method.names)
    for n in weak:
        prepare(method, "joint")
        res = method.step("joint", make_batch(setting, seed=1), method.nets("joint"))
        res.losses[f"proto_{n}"].backward()
        for other in method.names:
            enc = method.branch(other).encoder
            assert any(nonzero(p.grad) for p in enc.parameters()) == (other == n), (n, other)
        assert all(p.grad is None or not nonzero(p.grad) for p in method.model.fusion.parameters())
    # the weaker one's scores by hand: negative Euclidean distance, summed true-class softmax
    with torch.no_grad():
        s = {n: float((-torch.cdist(method.branch(n).encoder(make_batch(setting, seed=1).inputs[n]),
                                    method.protos[n])).softmax(1).gather(1, (torch.arange(8) % K)[:, None]).sum())
             for n in method.names}
    assert set(weak) == {n for n in method.names if s[n] < max(s.values())}


def test_pmr_prototypes_are_class_means_with_momentum():
    method = make_method("pmr", AV, momentum=0.25, proto_batches="all")
    ctx = FakeContext(method.names)
    method.on_epoch_start("joint", 0, ctx)
    first = {n: c.clone() for n, c in method.protos.items()}
    ctx.calls = 0   # the same features again
    feats, labels = ctx.features("train")
    for n in method.names:
        torch.testing.assert_close(first[n], class_means(feats[n], labels, K))
    method.on_epoch_end("joint", 0, ctx)    # after epoch 0: the new ones (features of call 2), no momentum
    method.on_epoch_end("joint", 1, ctx)    # after epoch 1: (1 - mu) new (call 3) + mu old (call 2)
    replay = FakeContext(method.names)
    f = [replay.features("train")[0] for _ in range(3)]
    for n in method.names:
        want = 0.75 * class_means(f[2][n], labels, K) + 0.25 * class_means(f[1][n], labels, K)
        torch.testing.assert_close(method.protos[n], want)
    assert method.hp.end == 70 and method.hp.alpha == 2.0   # the authors' CREMA-D runs (issue 20; momentum set here)


# ---------------------------------------------------------------------------------------
# UMT

@pytest.mark.parametrize("setting", [AV, IMAGES])
def test_umt_teachers_are_frozen_and_the_loss_vanishes_on_equal_students(setting):
    method = make_method("umt", setting)            # teachers: a saved unimodal run of the same weights
    assert set(method.frozen) == {f"teacher.{n}" for n in method.names}
    assert not set(method.frozen) & set(method.modules())   # neither checkpointed nor exported
    batch = make_batch(setting, seed=3)
    prepare(method, "joint")
    method.model.eval()                              # the teachers run in eval mode: so must the student here
    res = method.step("joint", batch, method.nets("joint"))
    for n in method.names:
        assert res.losses[f"distill_{n}"].item() == 0.0
    # a student that moved: positive loss, its gradient in the student only
    with torch.no_grad():
        for p in method.branch(method.names[0]).encoder.parameters():
            p.add_(0.01)
    prepare(method, "joint")
    res = method.step("joint", batch, method.nets("joint"))
    assert res.losses[f"distill_{method.names[0]}"].item() > 0
    sum(res.losses.values()).backward()
    assert any(nonzero(p.grad) for p in method.branch(method.names[0]).encoder.parameters())
    for teacher in method.frozen.values():
        assert not teacher.training
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_umt_refuses_missing_or_incompatible_teachers(tmp_path):
    with pytest.raises(ValueError, match="--set teachers=RUN"):
        make_method("umt", AV, teachers="")
    with pytest.raises(ValueError, match="not a finished run"):
        make_method("umt", AV, teachers=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="modalities \\['front', 'rear'\\], the run trains \\['audio', 'visual'\\]"):
        make_method("umt", AV, teachers=str(teacher_run(IMAGES)))
    other = teacher_run(THREE)
    config = json.loads((other / "config.json").read_text())
    (tmp_path / "joint").mkdir()
    for f in ("model.pt", "report.json"):
        (tmp_path / "joint" / f).write_bytes((other / f).read_bytes())
    (tmp_path / "joint" / "config.json").write_text(json.dumps({**config, "method": "joint"}))
    with pytest.raises(ValueError, match="a 'joint' run; the teachers come from a unimodal"):
        make_method("umt", THREE, teachers=str(tmp_path / "joint"))
    with pytest.raises(ValueError, match="umt teachers .*not a finished run"):
        TrainConfig(data="d", out="o", method="umt", hparams={"teachers": str(tmp_path)}).resolve()


# ---------------------------------------------------------------------------------------
# MSLR

def test_mslr_rates_move_with_validation_accuracy():
    method = make_method("mslr", THREE, lrs={"visual": 0.5}, every=3)
    groups = {g["name"]: g for g in method.param_groups("joint")}
    assert groups["visual"]["lr"] == 0.5 and "lr" not in groups["audio"] and "lr" not in groups["fusion"]
    ctx = FakeContext(method.names)
    acc = {"audio": [0.2, 0.4, 0.6, 0.6, 0.6, 0.3], "visual": [0.5] * 6, "flow": [0.6, 0.3, 0.3, 0.3, 0.3, 0.3]}
    scales = []
    for epoch in range(6):
        method.on_validation_end("joint", epoch, {n: acc[n][epoch] for n in method.names} | {"fusion": 0.9}, ctx)
        scales.append(method.lr_scales())
    assert scales[0] == scales[1] == {"audio": 1.0, "visual": 1.0, "flow": 1.0}   # before the 3rd validation
    # after validation 3: acc_now / mean(last 3)
    assert scales[2] == pytest.approx({"audio": 0.6 / 0.4, "visual": 1.0, "flow": 0.3 / 0.4})
    assert scales[3] == scales[4] == scales[2]
    assert scales[5] == pytest.approx({"audio": 0.6 / 0.4 * 0.3 / 0.5, "visual": 1.0, "flow": 0.3 / 0.4})
    assert len(ctx.lines) == 2 and "mslr after epoch 3" in ctx.lines[0]
    keep = make_method("mslr", AV, strategy="keep", every=1)
    keep.on_validation_end("joint", 0, {"audio": 0.1, "visual": 0.9}, ctx)
    keep.on_validation_end("joint", 1, {"audio": 0.5, "visual": 0.2}, ctx)
    assert keep.lr_scales() == {"audio": 1.0, "visual": 1.0}
    restored = make_method("mslr", THREE, every=3)
    restored.load_state_dict(method.state_dict())
    assert restored.lr_scales() == method.lr_scales()
    with pytest.raises(ValueError, match="'mslr' supports fusion \\('concat', 'sum'\\), not 'film'"):
        TrainConfig(data="d", out="o", method="mslr", fusion="film").resolve()
    with pytest.raises(ValueError, match="not modalities of this run"):
        make_method("mslr", AV, lrs={"sound": 0.1})


# ---------------------------------------------------------------------------------------
# MSES

def test_mses_stops_an_encoder_after_patience_flat_epochs():
    method = make_method("mses", AV, patience=2)
    ctx = FakeContext(method.names)
    for epoch, (a, v) in enumerate([(0.5, 0.3), (0.5, 0.4), (0.5, 0.5)]):   # audio flat, visual improving
        assert "audio" in method.trainable("joint")
        method.on_validation_end("joint", epoch, {"audio": a, "visual": v, "fusion": 0.6}, ctx)
    assert method.stopped == {"audio": 3} and "audio" not in method.trainable("joint")
    assert "mses: audio stopped after epoch 3" in ctx.lines[0]
    # what the trainer does next epoch: the optimiser over every group, train mode for the trainable
    stage = "joint"
    for m in method.modules().values():
        m.requires_grad_(True)
        m.eval()
    for m in method.trainable(stage).values():
        m.train()
    opt = torch.optim.SGD(method.param_groups(stage), lr=0.1, momentum=0.9, weight_decay=1e-4)
    audio = {k: v.clone() for k, v in method.branch("audio").state_dict().items()}
    visual = {k: v.clone() for k, v in method.branch("visual").state_dict().items()}
    fusion = {k: v.clone() for k, v in method.model.fusion.state_dict().items()}
    for seed in range(2):
        opt.zero_grad(set_to_none=True)
        res = method.step(stage, make_batch(AV, seed=seed), method.nets(stage))
        sum(res.losses.values()).backward()
        opt.step()
    for k, v in method.branch("audio").state_dict().items():   # weights and BN statistics unchanged
        assert torch.equal(v, audio[k]), k
    assert any(not torch.equal(v, visual[k]) for k, v in method.branch("visual").state_dict().items())
    assert any(not torch.equal(v, fusion[k]) for k, v in method.model.fusion.state_dict().items())
    restored = make_method("mses", AV, patience=2)
    restored.load_state_dict(method.state_dict())
    assert restored.stopped == {"audio": 3} and restored.best == method.best


@pytest.mark.parametrize("name", ["ogm-ge", "pmr", "umt", "mslr", "mses"])
def test_baselines_need_two_modalities(name):
    with pytest.raises(ValueError, match=f"method '{name}' needs at least 2 modalities, got 1"):
        make_method(name, "visual")


# ---------------------------------------------------------------------------------------
# fit on a corpus: every baseline on audio,visual (slow) and on front:image,rear:image

BASELINES = ("ogm-ge", "pmr", "umt", "mslr", "mses")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    made: dict = {}

    def corpus_of(setting: str) -> Path:
        if setting not in made:
            root = tmp_path_factory.mktemp("baselines")
            synthesize(root, SynthConfig(classes=3, per_class=6, modalities=setting, duration_s=1.0,
                                         val_frac=0.15, test_frac=0.3), workers=2, progress=False)
            made[setting] = root
        return made[setting]

    return corpus_of


@pytest.mark.parametrize("setting", [IMAGES, pytest.param(AV, marks=[pytest.mark.slow, pytest.mark.timeout(3600)])])
def test_fit_each_baseline(setting, corpora, tmp_path):
    names = tuple(n.split(":")[0] for n in setting.split(","))
    corpus = corpora(setting)
    base = dict(data=str(corpus), preset="tiny", modalities=setting, epochs=2, batch_size=8)
    fit(TrainConfig(out=str(tmp_path / "unimodal"), method="unimodal", **base), progress=False)
    hparams = {"umt": {"teachers": str(tmp_path / "unimodal")}, "mslr": {"every": 2},
               "mses": {"patience": 1}, "pmr": {"proto_batches": "all"}}
    for method in BASELINES:
        out = tmp_path / method
        report = fit(TrainConfig(out=str(out), method=method, hparams=hparams.get(method, {}), **base),
                     progress=False)
        assert tuple(report["metrics"]["probe"]) == names and "fusion" in report["metrics"], method
        assert list(torch.load(out / "model.pt", weights_only=True)) == [*names, "fusion"], method
        header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {f"val_acc_{n}" for n in (*names, "fusion")} <= set(header), (method, header)
        log = (out / "train.log").read_text()
        extra = {"ogm-ge": [f"k_{n}" for n in names], "pmr": [f"loss_proto_{n}" for n in names],
                 "umt": [f"loss_distill_{n}" for n in names], "mslr": [f"lr_scale_{n}" for n in names],
                 "mses": [f"loss_{n}" for n in names]}[method]
        assert set(extra) <= set(header), (method, header)
        if method == "mslr":
            assert "mslr after epoch 2" in log
        config = json.loads((out / "config.json").read_text())
        assert config["unimodal_heads"] == ("trained" if method == "mses" else "fusion")


# ---------------------------------------------------------------------------------------
# compare: UMT's teachers are the seed's unimodal run, trained once

def run_compare(corpus: Path, out: Path, methods: str, *extra: str) -> dict:
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "training", "compare", "--data", str(corpus), "--methods", methods,
           "--preset", "tiny", "--epochs", "1", "--stage2-epochs", "1", "--batch-size", "8", "--out", str(out),
           "--quiet", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "compare.json").read_text())


@pytest.mark.slow   # the fast lane fits every baseline already; this adds two runs and a subprocess
def test_compare_trains_umts_teachers_once(corpora, tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare(corpora(IMAGES), out, "umt", "--modalities", IMAGES)
    assert list(summary["methods"]) == ["umt"]   # the teachers' run is not a row of its own
    config = json.loads((out / "runs" / "umt-seed0" / "config.json").read_text())
    assert config["hparams"]["teachers"] == str(out / "runs" / "unimodal-seed0")
    assert (out / "runs" / "unimodal-seed0" / "report.json").is_file()


TABLE2 = "unimodal,joint,mses,mslr,ogm-ge,pmr,umt,mmclf,preds-avg,dimml"


@pytest.mark.slow
@pytest.mark.timeout(7200)   # 20 runs
def test_compare_writes_table_2(corpora, tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare(corpora(AV), out, TABLE2, "--seeds", "2")
    assert list(summary["methods"]) == TABLE2.split(",")
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{m}-seed{s}" for m in TABLE2.split(",")
                                                                     for s in range(2))
    for seed in range(2):   # each seed's umt learned from that seed's unimodal row
        config = json.loads((out / "runs" / f"umt-seed{seed}" / "config.json").read_text())
        assert config["hparams"]["teachers"] == str(out / "runs" / f"unimodal-seed{seed}")
    md = (out / "compare.md").read_text()
    assert "| Method | Audio | Visual | Multimodal (final output) | Fusion head | Final output chosen |" in md
    for method in TABLE2.split(","):
        assert f"| {method}" in md


# ---------------------------------------------------------------------------------------
# the trainer's hooks, seen from a method

@pytest.fixture
def hook_probe():
    """A method registered for one test: records the hooks' calls; its encoders' groups have lr 0."""
    import torch.nn as nn

    from training.methods import REGISTRY
    from training.methods.joint import Joint

    seen: dict = {"calls": [], "acc": []}

    class HookProbe(Joint):
        name = "hook-probe"

        def __init__(self, model, hp, num_classes):
            super().__init__(model, hp, num_classes)
            self.frozen["probe.teacher"] = nn.Linear(4, 4)
            seen["initial"] = {n: {k: v.clone() for k, v in self.branch(n).encoder.state_dict().items()}
                               for n in self.names}
            seen["frozen"] = self.frozen["probe.teacher"]

        def param_groups(self, stage):
            return [{"name": n, "params": list(self.branch(n).encoder.parameters()), "lr": 0.0} for n in self.names] \
                + [{"name": "fusion", "params": list(self.model.fusion.parameters())}]

        def on_epoch_start(self, stage, epoch, ctx):
            seen["calls"].append(("start", epoch))

        def step(self, stage, batch, nets):
            assert not nets["probe.teacher"].training
            seen["calls"].append(("step", epoch_of(seen)))
            return super().step(stage, batch, nets)

        def after_backward(self, stage, nets):
            grads = [p.grad for p in self.model.fusion.parameters()]
            assert all(g is not None for g in grads)      # between backward and the optimiser step
            seen["calls"].append(("after_backward", epoch_of(seen)))

        def on_epoch_end(self, stage, epoch, ctx):
            seen["calls"].append(("end", epoch))

        def on_validation_end(self, stage, epoch, acc, ctx):
            seen["calls"].append(("validation", epoch))
            seen["acc"].append(acc)

    def epoch_of(s):
        return next(e for c, e in reversed(s["calls"]) if c == "start")

    REGISTRY[HookProbe.name] = HookProbe
    try:
        yield seen
    finally:
        del REGISTRY[HookProbe.name]


def test_trainer_calls_the_hooks_in_order(hook_probe, corpora, tmp_path):
    out = tmp_path / "run"
    fit(TrainConfig(data=str(corpora(IMAGES)), out=str(out), method="hook-probe", preset="tiny", modalities=IMAGES,
                    epochs=2, batch_size=8), progress=False)
    calls = hook_probe["calls"]
    for epoch in range(2):
        mine = [c for c, e in calls if e == epoch]
        n_steps = mine.count("step")
        assert n_steps >= 1 and mine == ["start"] + ["step", "after_backward"] * n_steps + ["end", "validation"]
    # validation accuracy per output, as metrics.csv has it
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for epoch, acc in enumerate(hook_probe["acc"]):
        assert set(acc) == {"fusion"}
        assert acc["fusion"] == pytest.approx(float(rows[1 + epoch].split(",")[header.index("val_acc_fusion")]))
    # a group's own lr (0 here) is honoured: the encoders never moved, the fusion head did
    from training.run import load_run
    run = load_run(out)
    for n, state in hook_probe["initial"].items():
        for k, v in run.model.branches[n].encoder.state_dict().items():
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(v, state[k]), (n, k)
    # the frozen module: eval, no gradient, neither exported nor checkpointed
    teacher = hook_probe["frozen"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert "probe.teacher" not in torch.load(out / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("method,sets", [("ogm-ge", []), ("pmr", ["proto_batches=all"]), ("mslr", ["every=1"]),
                                         ("mses", ["patience=1"])])
def test_baselines_under_ddp_with_gloo(method, sets, corpora, tmp_path):
    """Two processes: scores all-reduced, prototypes and validation accuracy broadcast from rank 0."""
    import subprocess
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training",
           "fit", "--data", str(corpora(IMAGES)), "--out", str(out), "--method", method, "--preset", "tiny",
           "--modalities", IMAGES, "--batch-size", "8", "--epochs", "2", "--no-progress",
           *(a for s in sets for a in ("--set", s))]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and (out / "report.json").is_file()
    if method == "mslr":
        assert "mslr after epoch 1" in log and "mslr after epoch 2" in log

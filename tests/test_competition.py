"""Modality competition and DI-MML's cure, on a reduced version of RESULTS.md's competition corpus.

Audio (noise 0.3) is learnt within an epoch or two; the frames carry their class only in the
sprites' shape (`frames_cue="shape"`), which an encoder learns alone in 10-25 epochs. Joint
training fits the training set on audio first and then hardly moves the visual encoder, so its
visual linear probe stays low; DI-MML trains each encoder detached (its own head, S-Clf and
DUC, whose teacher never moves), so its visual head learns the shapes. Reduced: one seed and
3 fusion epochs, no unimodal, MLB or DGL runs. Measured (2026-12-02, idle 2-core CPU, 183 s):
joint probe 47.7 %, DI-MML visual 100 % (the 3-seed compare's seed 0 gave the same).

Broken on purpose (scratch edits, nothing committed), 2026-12-02:
  * the encoders on one shared loss (CE of the summed heads' logits + S-Clf CE of the summed
    S-Clf logits): DI-MML visual 25.0 % (probe 62.5 %), the effect assertion fails;
  * CE over the summed heads alone, the S-Clf still per modality: visual 100 %, passes, since
    S-Clf on the visual features alone is a detached objective of its own;
  * DUC's teacher not detached: visual 97.7 %. DUC only aligns features and carries no other
    modality's label loss, so the accuracies barely move. The test therefore also checks the
    detachment itself on the trained run. With the run's own DUC dims and a real training
    batch, each modality's stage-1 loss (Eq. 7) must have a gradient on its own encoder and
    none on any other. Here |dL_audio/d visual encoder| = 2.27 (own 790), and that check
    fails.
"""
from __future__ import annotations

import pytest
import torch

from training.methods.base import Batch
from training.synth import RECIPES, SynthConfig, synthesize
from training.trainer import TrainConfig, Trainer, fit

WEAK = "visual"
MARGIN = 0.15   # the 3-seed gap is ~40 points; one seed on 88 test clips: 15 points (13 clips) of margin


@pytest.mark.slow
def test_joint_suppresses_the_weak_modality_and_dimml_does_not(tmp_path):
    corpus = tmp_path / "corpus"
    synthesize(corpus, SynthConfig(**RECIPES["competition"]), workers=2, progress=False)
    common = dict(data=str(corpus), preset="small", device="cpu", seed=0, stage2_epochs=3,
                  workers=0, cache_dir=str(tmp_path / "cache"))
    joint = fit(TrainConfig(out=str(tmp_path / "joint"), method="joint", **common), progress=False)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "dimml"), method="dimml", **common), progress=False)
    dimml = trainer.run()

    joint_weak = joint["metrics"]["probe"][WEAK]           # the frozen encoder's linear probe
    dimml_weak = dimml["metrics"][WEAK]["accuracy"]        # DI-MML's own visual head
    summary = (f"joint visual probe {joint_weak:.3f}, DI-MML visual {dimml_weak:.3f} "
               f"(DI-MML visual probe {dimml['metrics']['probe'][WEAK]:.3f}; audio: joint probe "
               f"{joint['metrics']['probe']['audio']:.3f}, DI-MML probe {dimml['metrics']['probe']['audio']:.3f}, "
               f"head {dimml['metrics']['audio']['accuracy']:.3f})")
    print(summary)
    # audio is learnt by both, read the same way for both (the frozen encoder's probe): a detached
    # audio head swings between epochs on this preset (validation 0.24-0.91 within one unimodal run;
    # DI-MML's seed 0 under one torch thread ends on a 0.65 epoch with its probe at 0.875)
    assert joint["metrics"]["probe"]["audio"] > 0.75 and dimml["metrics"]["probe"]["audio"] > 0.75, summary
    assert joint_weak + MARGIN <= dimml_weak, summary

    cross = stage1_gradient_norms(trainer)
    assert all(cross[i, i] > 0 for i in trainer.method.names), cross
    assert all(v == 0 for (i, j), v in cross.items() if i != j), f"a modality's loss reaches another encoder: {cross}"


def stage1_gradient_norms(trainer: Trainer) -> dict[tuple[str, str], float]:
    """{(i, j): |d L_i / d encoder_j|} on one real training batch, with the run's own DUC dimensions."""
    method = trainer.method
    assert method.dims is not None and any(d.numel() for row in method.dims.values() for d in row.values()), \
        "the run never separated dimensions: DUC was not active"
    inputs, label = next(iter(trainer.eval_loader("train")))
    nets = method.nets("encoders")
    for m in method.trainable("encoders").values():
        m.requires_grad_(True)
        m.train()
    res = method.step("encoders", Batch(inputs, label), nets)
    students = [i for i, row in method.dims.items() if any(d.numel() for d in row.values())]
    assert all(float(res.logs[f"duc_{i}"]) > 0 for i in students), res.logs   # DUC is in those losses
    out = {}
    for i in method.names:
        for j in method.names:
            params = list(method.branch(j).encoder.parameters())
            grads = torch.autograd.grad(res.losses[i], params, retain_graph=True, allow_unused=True)
            out[i, j] = float(sum(g.abs().sum() for g in grads if g is not None))
    return out

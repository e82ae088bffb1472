"""The preset table (dimml/presets.py): every preset complete, and every command reads it."""
from __future__ import annotations

import dataclasses

import pytest

from dimml.modalities import KINDS, preprocess_for
from dimml.presets import PRESETS, Schedule
from training.config import TrainConfig
from training.models import build_model, build_model_config

from conftest import SETTINGS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_complete(name):
    p = PRESETS[name]
    assert p.name == name and p.about
    for f in dataclasses.fields(Schedule):
        value = getattr(p.schedule, f.name)
        assert isinstance(value, (int, float)) and value > 0, (name, f.name)
    assert 0 < p.schedule.lr_step_fraction <= 1
    assert len(p.widths) == len(p.blocks) and all(w > 0 for w in p.widths) and all(b > 0 for b in p.blocks)
    assert set(p.inputs) <= set(KINDS), set(p.inputs) - set(KINDS)
    for kind, params in p.inputs.items():   # every parameter is one its kind has
        known = {f.name for f in dataclasses.fields(KINDS[kind].params_cls)}
        assert set(params) <= known, (name, kind, set(params) - known)
    assert set(p.defaults) <= {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_command_reads_the_one_table(name, setting):
    """TrainConfig's schedule, the inputs and the model widths all come from the preset's record."""
    p = PRESETS[name]
    c = TrainConfig(data="d", out="o", preset=name, modalities=setting).resolve()
    assert (c.epochs, c.lr, c.stage2_epochs, c.batch_size) == (p.schedule.epochs, p.schedule.lr,
                                                               p.schedule.stage2_epochs, p.schedule.batch_size)
    assert c.lr_step_epoch == max(1, round(p.schedule.epochs * p.schedule.lr_step_fraction))
    pp = preprocess_for(name, setting)
    for spec in pp.modalities:
        for key, value in p.inputs.get(spec.kind, {}).items():
            assert getattr(spec.params, key) == value, (spec.name, key)
    cfg = build_model_config(name, 3, pp, "concat")
    assert (cfg.widths, cfg.blocks) == (p.widths, p.blocks)
    if name in ("tiny", "small"):   # (a ResNet18 per modality is slow to build four times over)
        assert build_model(cfg, pp).fusion is not None


def test_unknown_preset_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose from resnet18, tiny, small, paper-cremad"):
        TrainConfig(data="d", out="o", preset="huge").resolve()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preprocess_for("huge")

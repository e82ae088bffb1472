"""Issue 14 parts 2-3: the final output rule in the report (candidate table, fallback, forcing),
the `paper-cremad` preset and `--split-file`."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dimml.datasets import DatasetError, load_dataset, read_split_files
from dimml.modalities import preprocess_for
from dimml.presets import PRESETS
from dimml.weighting import OutputRule
from training.evaluate import choose_output, evaluate, format_table
from training.methods import get_method
from training.models import build_model, build_model_config
from training.trainer import TrainConfig

K = 3
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


# ---------------------------------------------------------------------------------------
# the final output

def _logits(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Audio right, visual confidently wrong on half, fusion decent."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K

    def branch(acc: float, margin: float) -> np.ndarray:
        z = rng.normal(size=(n, K))
        right = rng.random(n) < acc
        z[np.arange(n), np.where(right, y, (y + 1) % K)] += margin
        return z

    return {"audio": branch(0.95, 3.0), "visual": branch(0.5, 8.0), "fusion": branch(0.7, 2.0)}, y


def test_choose_output_selects_on_validation_and_lists_every_candidate():
    z, y = _logits(90)
    said: list[str] = []
    rule, facts, rules = choose_output(z, y, chooses=True, log=said.append)
    assert set(rules) == {"fusion", "audio", "visual", "paper-lw", "fitted"}
    assert not facts["fallback"] and not facts["forced"] and facts["chosen"] in rules
    assert set(facts["cv"]) == set(rules) and facts["rule"] == rule.to_dict()
    assert rule.name != "visual" and said == [f"final output: {facts['chosen']} ({facts['reason']})"]
    assert rule.reason == facts["reason"]
    # a method whose final output is its fusion head (an ablation) keeps it
    rule, facts, _ = choose_output(z, y, chooses=False, log=said.append)
    assert rule.rule == "branch" and rule.branch == "fusion" and not facts["fallback"]


def test_tiny_validation_split_falls_back_with_a_warning():
    z, y = _logits(9)   # 3 clips per class
    said: list[str] = []
    rule, facts, rules = choose_output(z, y, chooses=True, log=said.append)
    assert facts["fallback"] and rule.name == "paper-lw" and "too small" in facts["reason"]
    assert said[0].startswith("warning: validation split too small")
    assert "fitted" in rules   # still reported, never chosen on so few clips


def test_forcing_a_rule():
    z, y = _logits(30)
    rule, facts, _ = choose_output(z, y, chooses=True, final_output="paper-lw", lw_temperature=1.0, log=lambda m: None)
    assert rule == OutputRule.paper(1.0) and facts["forced"] and facts["lw_temperature_source"] == "config"
    rule, _, _ = choose_output(z, y, chooses=False, final_output="visual", log=lambda m: None)
    assert rule.rule == "branch" and rule.branch == "visual"
    with pytest.raises(ValueError, match="final_output must be one of"):
        choose_output(z, y, chooses=True, final_output="flow", log=lambda m: None)


def _model_and_loaders(n_val: int):
    torch.manual_seed(0)
    pp = preprocess_for("tiny", "audio,visual", {"audio.seconds": 0.5, "visual.height": 16, "visual.width": 16,
                                                 "visual.num_frames": 1})
    model = build_model(build_model_config("tiny", K, pp), pp)
    g = torch.Generator().manual_seed(1)

    def batch(n: int):
        x = {s.name: (torch.randint(0, 256, (n, *s.shape), generator=g, dtype=torch.uint8) if s.dtype == np.uint8
                      else torch.randn((n, *s.shape), generator=g)) for s in pp.modalities}
        return x, torch.arange(n) % K

    return model, {"train": [batch(12)], "val": [batch(n_val)], "test": [batch(12)]}


@pytest.mark.parametrize("n_val", [30, 6])
def test_report_lists_every_candidate_and_the_choice(n_val):
    model, loaders = _model_and_loaders(n_val)
    said: list[str] = []
    report = evaluate(model, loaders, method="dimml", num_classes=K, classes=["a", "b", "c"], chooses=True,
                      lw_temperature=None, device=torch.device("cpu"), progress=False, log=said.append)
    out = report["final_output"]
    assert set(out["candidates"]) == {"fusion", "audio", "visual", "paper-lw", "fitted"}
    for name, row in out["candidates"].items():
        assert {"accuracy", "macro_f1", "ece"} <= set(row), name
    assert out["candidates"]["fusion"] == {**report["metrics"]["fusion"], **out["candidates"]["fusion"]}
    assert report["metrics"]["final"] == {k: out["candidates"][out["chosen"]][k] for k in ("accuracy", "macro_f1", "ece")}
    assert out["rule"]["name"] == out["chosen"] and out["rule"]["reason"] == out["reason"] != ""
    table = format_table(report)
    assert "paper-lw" in table and "fitted" in table and "<- chosen" in table
    if n_val == 6:   # 2 clips per class: the fallback, said in the report, the table and the log
        assert out["fallback"] and out["chosen"] == "paper-lw" and "WARNING" in table
        assert any(m.startswith("warning: validation split too small") for m in said)
    else:
        assert not out["fallback"] and all("cv_accuracy" in r for r in out["candidates"].values())


# ---------------------------------------------------------------------------------------
# the paper-cremad preset

def test_paper_cremad_preset_is_the_authors_run():
    c = TrainConfig(data="d", out="o", preset="paper-cremad").resolve()
    assert (c.epochs, c.stage2_epochs, c.lr, c.lr_step_epoch, c.lr_gamma, c.batch_size) == (150, 20, 1e-3, 70, 0.1, 16)
    assert (c.momentum, c.weight_decay, c.augment) == (0.9, 1e-4, True)
    assert c.lw_temperature == 1.0 and c.final_output == "paper-lw"   # the paper's weighting at their fixed T = 1
    pp = c.preprocess_config()
    assert pp.spec("audio").shape == (1, 257, 1004) and pp.spec("audio").params.sample_rate == 16000
    assert pp.spec("audio").params.seconds == 10.0
    assert pp.spec("visual").shape == (3, 224, 224, 3)
    ours, paper = PRESETS["paper-cremad"], PRESETS["resnet18"]
    assert (ours.widths, ours.blocks, ours.schedule) == (paper.widths, paper.blocks, paper.schedule)
    hp = get_method("dimml").make_hparams(c.hparams, c.epochs)
    assert (hp.duc_distance, hp.duc_temperature, hp.warmup) == ("dot", 50.0, 20)
    assert get_method("mlb").make_hparams({}, c.epochs).mode == "paper"   # README: --set mode=tanh for the code's
    # explicit flags still win over the preset
    c2 = TrainConfig(data="d", out="o", preset="paper-cremad", final_output="auto", lw_temperature=None).resolve()
    assert c2.final_output == "auto" and c2.lw_temperature == 1.0
    assert TrainConfig(data="d", out="o", preset="resnet18").resolve().final_output == "auto"


# ---------------------------------------------------------------------------------------
# --split-file

def _cremad(root: Path, n: int = 4) -> list[str]:
    """A CREMA-D layout of placeholder (non-empty) files: n clips per emotion."""
    (root / "VideoFlash").mkdir(parents=True)
    (root / "AudioWAV").mkdir()
    ids = []
    for e in EMOTIONS:
        for i in range(n):
            cid = f"10{i:02d}_DFA_{e}_XX"
            (root / "VideoFlash" / f"{cid}.flv").write_bytes(b"x")
            (root / "AudioWAV" / f"{cid}.wav").write_bytes(b"x")
            ids.append(cid)
    return ids


def test_split_file_in_the_authors_format(tmp_path):
    ids = _cremad(tmp_path / "CREMA-D")
    train, test = ids[::2], ids[1::2]
    (tmp_path / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in train))
    (tmp_path / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in test[:-1]))   # one left out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_dataset(tmp_path / "CREMA-D", layout="cremad",
                            split_files=[tmp_path / "train.csv", tmp_path / "test.csv"])
    got = {Path(s.key).stem: s.split for s in spec.samples}
    assert got == {**{c: "train" for c in train}, **{c: "test" for c in test[:-1]}}
    assert any("1 sample(s) not listed" in str(w.message) for w in caught)
    # through the trainer's option: comma-separated, made absolute
    c = TrainConfig(data=str(tmp_path / "CREMA-D"), out="o", split_file=f"{tmp_path / 'train.csv'}, {tmp_path / 'test.csv'}",
                    preset="tiny").resolve()
    assert c.split_file == f"{tmp_path / 'train.csv'},{tmp_path / 'test.csv'}"


def test_split_file_with_name_and_split_columns(tmp_path):
    ids = _cremad(tmp_path / "CREMA-D", n=2)
    rows = [f"VideoFlash/{c}.flv,{['train', 'valid', 'test'][i % 3]}" for i, c in enumerate(ids)]
    (tmp_path / "splits.csv").write_text("name,split\n" + "\n".join(rows) + "\n")
    spec = load_dataset(tmp_path / "CREMA-D", layout="cremad", split_files=[tmp_path / "splits.csv"])
    assert {Path(s.key).stem: s.split for s in spec.samples} == \
        {c: ["train", "val", "test"][i % 3] for i, c in enumerate(ids)}


def test_split_file_errors(tmp_path):
    (tmp_path / "train.csv").write_text("a,ANG\nb,ANG\n")
    (tmp_path / "test.csv").write_text("b,ANG\n")
    with pytest.raises(DatasetError, match="listed in both train and test"):
        read_split_files([tmp_path / "train.csv", tmp_path / "test.csv"])
    (tmp_path / "mine.csv").write_text("a,ANG\n")
    with pytest.raises(DatasetError, match="named after its split"):
        read_split_files([tmp_path / "mine.csv"])
    (tmp_path / "cols.csv").write_text("clipname,split\na,train\n")
    with pytest.raises(DatasetError, match="`name`"):
        read_split_files([tmp_path / "cols.csv"])
    assert read_split_files([tmp_path / "train.csv"]) == {"a": "train", "b": "train"}

"""`python -m training compare`: several methods, one budget, Table 2/3 layouts, JSON and PNG."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-corpus")
    synthesize(root, SynthConfig(classes=3, per_class=10, audio_noise=0.1, visual_noise=0.6), progress=False)
    return root


@pytest.mark.slow   # trains every registered method
def test_compare_tables_every_method_and_the_ablation(corpus, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "training", "compare", "--data", str(corpus), "--methods", "unimodal,dimml",
           "--ablation", "--preset", "tiny", "--epochs", "2", "--stage2-epochs", "1", "--batch-size", "8",
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "compare.json").read_text())
    # --ablation adds joint, mmclf and dimml-sclf; dimml is trained once and serves two rows
    assert list(summary["methods"]) == ["unimodal", "dimml", "joint", "mmclf", "dimml-sclf"]
    for method, cols in summary["methods"].items():
        report = json.loads((out / "runs" / f"{method}-seed0" / "report.json").read_text())
        m = report["metrics"]
        detached = method != "joint"
        assert cols["audio"]["values"] == [m["audio"]["accuracy"] if detached else m["probe"]["audio"]]
        assert cols["multi"]["values"] == [m["final"]["accuracy"]] and cols["fusion"]["values"] == [m["fusion"]["accuracy"]]
        assert cols["chosen"] == [report["final_output"]["chosen"]]
        if method in ("mmclf", "dimml-sclf"):   # the ablations answer with their fusion head
            assert cols["chosen"] == ["fusion"] and cols["multi"]["values"] == cols["fusion"]["values"]
    rows = {r["row"]: r for r in summary["ablation"]}
    assert rows["TS + S-Clf + DUC"]["method"] == rows["TS + S-Clf + DUC + LW"]["method"] == "dimml"
    assert (rows["TS + S-Clf + DUC"]["output"], rows["TS + S-Clf + DUC + LW"]["output"]) == ("fusion", "paper-lw")
    dimml = json.loads((out / "runs" / "dimml-seed0" / "report.json").read_text())
    assert rows["TS + S-Clf + DUC + LW"]["multi"]["mean"] == dimml["final_output"]["candidates"]["paper-lw"]["accuracy"]
    md = (out / "compare.md").read_text()
    assert "| joint (probe) |" in md and "| TS (MM Clf) | x |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call reuses the finished runs: no training, same tables
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "== " not in again.stdout
    assert json.loads((out / "compare.json").read_text())["methods"] == summary["methods"]


def test_compare_rejects_unknown_methods(corpus, tmp_path):
    res = subprocess.run([sys.executable, "-m", "training", "compare", "--data", str(corpus), "--methods",
                          "dimml,nosuch", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nosuch" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x" / "runs").exists()


def _report(names: tuple[str, ...], chosen: str, acc: dict[str, float], seed: int) -> dict:
    """A report.json as evaluation writes it, with given accuracies (probe = head - 0.1)."""
    m = {k: {"accuracy": v + 0.01 * seed, "macro_f1": v, "ece": 0.1} for k, v in acc.items()}
    m["probe"] = {n: acc[n] - 0.1 for n in names}
    return {"metrics": m, "final_output": {"chosen": chosen, "candidates": {"paper-lw": m["final"]}}}


def test_compare_tables_have_a_column_per_modality(tmp_path):
    from training.compare import bar_chart, tables

    names = ("front", "rear", "flow")
    acc = {"front": 0.5, "rear": 0.6, "flow": 0.7, "fusion": 0.8, "final": 0.9}
    reports = {"dimml": [_report(names, "paper-lw", acc, s) for s in range(2)],
               "joint": [_report(names, "fusion", {**acc, "final": 0.8}, s) for s in range(2)]}
    md, summary = tables(reports, seeds=2)
    assert summary["modalities"] == list(names)
    assert ("| Method | Front | Rear | Flow | Multimodal (final output) | Fusion head | Final output chosen | "
            "probe Front | probe Rear | probe Flow |") in md
    assert summary["methods"]["dimml"]["rear"]["values"] == pytest.approx([0.6, 0.61])       # own head
    assert summary["methods"]["joint"]["rear"]["values"] == pytest.approx([0.5, 0.5])        # probe
    assert summary["methods"]["dimml"]["multi"]["values"] == pytest.approx([0.9, 0.91])      # its final output
    assert summary["methods"]["dimml"]["fusion"]["values"] == pytest.approx([0.8, 0.81])     # its fusion head
    assert summary["methods"]["joint"]["multi"]["values"] == pytest.approx([0.8, 0.81])
    assert "| dimml | 50.50 ± 0.71 | 60.50 ± 0.71 | 70.50 ± 0.71 | 90.50 ± 0.71 | 80.50 ± 0.71 | paper-lw x2 |" in md
    assert "| joint (probe) | 40.00 ± 0.00 |" in md and "| fusion x2 |" in md
    assert "| TS + S-Clf + DUC + LW | x | x | x | x |" in md
    bar_chart(summary, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

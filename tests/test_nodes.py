"""Training across nodes: two torchrun agents on this machine (c10d rendezvous on 127.0.0.1, gloo),
each with its own copy of the corpus, cache folder and run folder as two machines would have.
Node 0's cache is prebuilt by `dimml cache`, node 1's by its local rank 0 during training; the
run is killed after its first checkpoint and resumed; then both caches hold the same entry, only
rank 0's run folder exists, both ranks ended with the same weights and those are what model.pt holds."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torchrun_nodes as nodes
from conftest import free_port

from dimml import cli as dimml_cli
from training.distributed import weights_checksum
from training.run import load_run
from training.synth import SynthConfig, synthesize

# A split computed on each node from its own folder (--layout folders ignores the manifest's).
# Epochs enough that the kill after the first checkpoint lands before the end; 12 short clips decode
# faster in the process than through a pool of fresh ones.
FIT = ["--method", "dimml", "--preset", "tiny", "--layout", "folders", "--batch-size", "4", "--epochs", "3",
       "--stage2-epochs", "1", "--set", "warmup=1", "--decode-workers", "1", "--no-progress"]


def entries(cache: Path) -> list[Path]:
    """The complete entries of a cache folder."""
    return sorted(p for p in cache.iterdir() if (p / "meta.json").is_file()) if cache.is_dir() else []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_build_their_caches_train_in_step_and_resume(tmp_path):
    synthesize(tmp_path / "data0", SynthConfig(classes=2, per_class=6, duration_s=1.0), workers=1, progress=False)
    shutil.copytree(tmp_path / "data0", tmp_path / "data1")   # same content, another path (and mtimes)
    node = [nodes.Node(tmp_path / "data0", tmp_path / "run0", tmp_path / "cache0"),
            nodes.Node(tmp_path / "data1", tmp_path / "run1", tmp_path / "cache1", cache_env=True)]

    # node 0 prebuilds its cache with the same options as training
    assert dimml_cli.main(["cache", "--data", str(node[0].data), "--out", str(node[0].out),
                           "--cache-dir", str(node[0].cache), *FIT]) == 0
    [prebuilt] = entries(node[0].cache)
    created = json.loads((prebuilt / "meta.json").read_text())["created"]
    assert not node[1].cache.exists()

    # first launch: killed once rank 0 has written its first checkpoint
    checkpoint = node[0].out / "checkpoint.pt"
    procs = nodes.start(node, free_port(), FIT, tmp_path / "logs1")
    codes = nodes.wait(procs, 180, until=checkpoint.exists)   # then kills both
    assert checkpoint.exists(), f"no checkpoint (exit codes {codes}):\n{nodes.logs_text(tmp_path / 'logs1', 2)}"
    assert not (node[0].out / "report.json").exists(), "the run finished before it could be killed"

    # second launch: resumes from rank 0's checkpoint (node 1 has none) and finishes
    procs = nodes.start(node, free_port(), FIT, tmp_path / "logs2")
    codes = nodes.wait(procs, 240)
    assert codes == [0, 0], f"exit codes {codes}:\n{nodes.logs_text(tmp_path / 'logs2', 2)}"

    # each node its own cache: the same entry (content-keyed), node 0's the prebuilt one, not rebuilt
    assert [p.name for p in entries(node[0].cache)] == [prebuilt.name]
    assert json.loads((prebuilt / "meta.json").read_text())["created"] == created
    assert [p.name for p in entries(node[1].cache)] == [prebuilt.name]
    # the run folder is rank 0's alone
    assert not node[1].out.exists()
    log = (node[0].out / "train.log").read_text()
    assert "2 process(es) on 2 node(s), global batch 8 (4 per process)" in log
    assert "resumed at epoch 1 of stage 'encoders'" in log and "finished" in log.splitlines()[-1]
    report = json.loads((node[0].out / "report.json").read_text())
    assert sum(report["sizes"].values()) == 12 and not (node[0].out / "checkpoint.pt").exists()
    # both ranks ended with the same weights, and model.pt holds rank 0's
    m = re.search(r"weights identical on every rank: sha256 by rank 0=(\w+) 1=(\w+)", log)
    assert m and m.group(1) == m.group(2), log
    assert weights_checksum(load_run(node[0].out).model.modules()) == m.group(1)

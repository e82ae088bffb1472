"""Training across nodes: two torchrun agents on this machine (c10d rendezvous on 127.0.0.1, gloo),
each with its own copy of the corpus, cache folder and run folder as two machines would have.
Node 0's cache is prebuilt by `dimml cache`, node 1's by its local rank 0 during training; node 1
is killed after the first checkpoint (node 0 must stop by itself, not wait) and the run resumed;
then both caches hold the same entry, only rank 0's run folder exists, both ranks ended with the
same weights and those are what model.pt holds."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torchrun_nodes as nodes

from dimml import cli as dimml_cli
from training.distributed import weights_checksum
from training.run import load_run
from training.synth import SynthConfig, synthesize

from conftest import free_port

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

    # first launch: node 1 dies once rank 0 has written its first checkpoint; node 0 stops by itself
    checkpoint = node[0].out / "checkpoint.pt"
    procs = nodes.start(node, free_port(), FIT, tmp_path / "logs1")
    codes = nodes.wait(procs, 180, until=checkpoint.exists)
    assert checkpoint.exists(), f"no checkpoint (exit codes {codes}):\n{nodes.logs_text(tmp_path / 'logs1', 2)}"
    nodes.kill(procs[1:])
    [code] = nodes.wait(procs[:1], 60)   # None: still waiting for the dead node after 60 s (then killed)
    assert code not in (None, 0), f"node 0 after node 1 died: {code}\n{nodes.logs_text(tmp_path / 'logs1', 2)}"
    assert not (node[0].out / "report.json").exists(), "the run finished before node 1 could be killed"

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


# ---------------------------------------------------------------------------------------
# the setup collectives with two processes per node: who builds when, and a failure on one node

def _setup_worker(rank: int, world: int, local_world: int, store: str, events: str) -> None:
    """One of `world` gloo processes, `local_world` per node: once_per_node twice (the second fails on
    node 1's builder), then same_on_every_rank with rank 3 disagreeing; outcomes appended to `events`."""
    import time

    import torch.distributed as dist

    from dimml.datasets import DatasetError
    from training import distributed as d

    def note(text: str) -> None:
        with open(events, "a") as f:   # O_APPEND: whole lines from every process
            f.write(f"{text}\n")

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ranks = d.Ranks(rank=rank, world=world, local_rank=rank % local_world, local_world=local_world,
                    node=rank // local_world, nodes=world // local_world)

    def build() -> int:
        note(f"start {rank}")
        time.sleep(0.5 if ranks.node_main else 0.0)   # a slow build: a rank that did not wait would start first
        note(f"end {rank}")
        return rank

    note(f"got {rank} {d.once_per_node(build, ranks)}")

    def broken() -> None:
        if ranks.node == 1:
            raise DatasetError("clip.mp4 cannot be decoded")

    for step, call in (("fail", lambda: d.once_per_node(broken, ranks)),
                       ("check", lambda: d.same_on_every_rank({"rows": "b" if rank == 3 else "a"}, ranks, "data"))):
        try:
            call()
            note(f"{step} {rank} none")
        except ValueError as e:
            note(f"{step} {rank} {type(e).__name__}: {e}")
    d.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_each_node_builds_first_and_a_failure_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    events = tmp_path / "events.txt"
    mp.start_processes(_setup_worker, args=(4, 2, str(tmp_path / "store"), str(events)), nprocs=4,
                       start_method="spawn")
    lines = events.read_text().splitlines()
    order = [line for line in lines if line.startswith(("start", "end"))]
    # the builders (local rank 0: ranks 0 and 2) finish before any other process starts
    assert {line.split()[1] for line in order[:4]} == {"0", "2"} and {x.split()[0] for x in order[:4]} == {"start", "end"}
    assert sorted(order[4:]) == ["end 1", "end 3", "start 1", "start 3"]
    assert sorted(line for line in lines if line.startswith("got")) == [f"got {r} {r}" for r in range(4)]
    fail = sorted(line for line in lines if line.startswith("fail"))
    assert fail[2] == "fail 2 DatasetError: clip.mp4 cannot be decoded"   # the builder that failed: its own error
    for line in fail[:2] + fail[3:]:   # every other rank, node 0 included, stops with its message
        assert line.endswith("ValueError: rank 2 could not prepare its node's data: DatasetError: clip.mp4 cannot "
                             "be decoded"), line
    check = sorted(line for line in lines if line.startswith("check"))
    assert len(check) == 4 and all("data: rank 3 has another rows than rank 0 ('b' vs 'a')" in c for c in check), check

"""`dimml score --engine ray` and ScoreBatch on a real local Ray (2 CPUs, a small object store, no
dashboard): the same rows as local scoring, shards, a user's own Ray pipeline, an actor killed
mid-run (Ray restarts it and retries its batch) and a driver killed mid-run then resumed (every
file exactly once, and the killed driver's Ray gone with it).

One Ray session serves the module (the CLI joins a running session instead of starting one);
the kill-and-resume test runs the CLI in a subprocess, which starts a Ray of its own.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'dimml[ray]'")

from test_clients import run_cli  # noqa: E402

from clients.output import read_results, shard_paths  # noqa: E402
from clients.score import ScoreOptions, Stop, run_score  # noqa: E402

from conftest import REPO, write_corpus  # noqa: E402

pytestmark = pytest.mark.slow
BROKEN = {"cat/garbage.mp4": "not_media", "dog/empty.mp4": "empty"}


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for the module, as small as it goes: 2 CPUs, a 100 MiB object store, no dashboard."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3 classes x 3 audio-video clips with manifest labels, plus a corrupt and an empty file."""
    d = write_corpus(tmp_path_factory.mktemp("ray-corpus"), "audio,visual", per_class=3)
    (d / "cat/garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "dog/empty.mp4").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle("audio,visual")


@pytest.fixture(scope="module")
def local_rows(corpus, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-local") / "local.csv"
    rc, stdout, stderr = run_cli("score", corpus, "-r", "--bundle", bundle, "--out", out, "--no-progress")
    assert rc == 0, stderr
    return {r["path"]: r for r in read_results(out)}, stdout


def _summary_tail(stdout: str) -> str:
    """The summary from its accuracy line on (the first lines name the engine and the rate)."""
    return stdout[stdout.index("accuracy"):]


def test_ray_engine_writes_the_rows_of_local_scoring(ray_session, corpus, bundle, local_rows, tmp_path):
    local, local_out = local_rows
    out = tmp_path / "ray.csv"
    rc, stdout, stderr = run_cli("score", corpus, "-r", "--bundle", bundle, "--engine", "ray", "--out", out,
                                 "--shard-rows", "4", "--batch-size", "3", "--no-progress")
    assert rc == 0, stderr
    shards = shard_paths(out)
    assert not out.exists() and [p.name for p in shards] == [f"ray.{i:05d}.csv" for i in range(3)]   # 11 rows
    assert [len(read_results(p)) for p in shards] == [4, 4, 3]
    rows = read_results(out)
    assert len(rows) == len(local) == 11 and {r["path"] for r in rows} == set(local)
    for r in rows:
        assert r == local[r["path"]], r["path"]   # every cell, as local scoring wrote it
    for key, cause in BROKEN.items():
        assert {r["path"]: r for r in rows}[key]["error"].startswith(cause + ": ")
    assert "on Ray (" in stdout and "11 rows, 9 succeeded, 2 failed" in stdout
    assert _summary_tail(stdout) == _summary_tail(local_out)   # accuracy and confusion matrix


def test_score_batch_in_a_users_own_pipeline(ray_session, corpus, bundle, local_rows):
    """ScoreBatch as a map_batches callable class: paths in, `dimml score` columns out, other columns kept."""
    from clients.ray_scoring import ScoreBatch

    local, _ = local_rows
    keys = sorted(local)
    ds = ray.data.from_items([{"video": str(corpus / k), "id": i} for i, k in enumerate(keys)])
    ds = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"bundle": str(bundle)}, batch_size=4,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    got = {int(r["id"]): r for r in ds.take_all()}
    assert sorted(got) == list(range(len(keys)))
    for i, key in enumerate(keys):
        row, want = got[i], local[key]
        assert row["path"] == str(corpus / key)   # no `path` column given: the video's path names the row
        assert row["label"] == want["label"] and row["error"].split(":")[0] == want["error"].split(":")[0]
        assert row["modalities_used"] == "+".join(want["modalities_used"])
        for col, v in want.items():
            if col.startswith(("prob_", "weight_")) or col == "confidence":
                assert (np.isnan(row[col]) if v is None else row[col] == v), (key, col)


def _actor_pids() -> set[int]:
    import psutil

    out = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "MapWorker(MapBatches(ScoreBatch))" in " ".join(p.info["cmdline"] or ()):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _copies(corpus: Path, dest: Path, n: int) -> set[str]:
    good = sorted(p for p in corpus.rglob("clip*.mp4"))
    for i in range(n):
        src = good[i % len(good)]
        (dest / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / src.parent.name / f"{i:03d}.mp4")
    shutil.copyfile(corpus / "cat/garbage.mp4", dest / "cat/garbage.mp4")
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*.mp4")}


def test_an_actor_killed_mid_run_is_restarted_and_its_batch_retried(ray_session, corpus, bundle, tmp_path):
    """SIGKILL an actor while it scores: an infrastructure fault, which Ray retries; every file gets
    its row once, none an error row it should not have."""
    keys = _copies(corpus, tmp_path / "data", 30)
    out = tmp_path / "r.jsonl"
    opts = ScoreOptions(inputs=[str(tmp_path / "data")], out=out, bundle=str(bundle), recursive=True,
                        batch_size=2, engine="ray", shard_rows=0, progress=False)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_score(opts, Stop())))
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while runner.is_alive() and killed is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 2 and (pids := _actor_pids()):
            killed = min(pids)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "the run ended before an actor could be killed"
    assert not runner.is_alive() and result["summary"].complete
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(keys)                 # each file exactly once
    assert [r["path"] for r in rows if r["error"]] == ["cat/garbage.mp4"]  # the kill made no error row


def test_driver_killed_then_resumed_scores_every_file_once(ray_session, corpus, bundle, tmp_path):
    """`dimml score --engine ray` SIGKILLed mid-run (its own local Ray dies with it), then --resume."""
    import psutil

    keys = _copies(corpus, tmp_path / "data", 40)
    out = tmp_path / "out" / "r.csv"
    args = ["score", str(tmp_path / "data"), "-r", "--bundle", str(bundle), "--engine", "ray", "--out", str(out),
            "--shard-rows", "7", "--batch-size", "2", "--no-progress"]
    # RAY_ADDRESS="": a Ray of its own, not the module's; its agents give up on the dead GCS after 10 s
    # (Ray's default: 60 s), so the check that they go does not hold the test up for a minute
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "clients", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_ADDRESS": "", "RAY_gcs_rpc_server_reconnect_timeout_s": "10"})
    ray_procs: list = []
    try:
        deadline = time.monotonic() + 180
        while sum(p.read_bytes().count(b"\n") - 1 for p in shard_paths(out)) < 5:   # minus each shard's header
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no rows written in 180 s"
            time.sleep(0.05)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ray_procs, "the driver had started no Ray processes"
    try:
        first = read_results(out)
        assert 5 <= len(first) < len(keys)
        rc, stdout, stderr = run_cli(*args, "--resume")   # on the module's Ray
        assert rc == 0, stderr
        assert f"{len(first)} already in" in stdout
        paths = [r["path"] for r in read_results(out)]
        assert sorted(paths) == sorted(keys)                     # no duplicate, none missing
        assert sorted(os.listdir(out.parent)) == [p.name for p in shard_paths(out)]   # shards only
    finally:
        # the killed driver's Ray goes with it: gcs and raylet at once (fate sharing), Ray's agents once
        # they find the raylet gone and their last report to the dead GCS times out
        _, alive = psutil.wait_procs(ray_procs, timeout=120)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:   # never leave them running
            p.kill()
    assert not alive, [p.name() for p in alive]

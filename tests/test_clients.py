"""clients/: the typed HTTP client and batch scoring, against real bundles and real servers.

A corpus of real mp4 files with corrupt files mixed in is scored in-process with a tiny
exported bundle and through `bentoml serve`; the two must agree row by row. Every setting's
corpus (manifest.csv with a column per source file) is scored the same way, with a weight
column per modality. Runs are interrupted with real signals and resumed; every file must end
up exactly once. Client retry behaviour (429 / 503 / refused connections / timeouts), which a
healthy server never shows on demand, is checked against a small scripted HTTP server.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients import AsyncClient, Client, Prediction, RequestTimeout, RetryPolicy, ServerError, ServerUnreachable
from clients.cli import main
from clients.inputs import InputError, find_jobs
from clients.output import OutputError, ResultWriter, error_row, read_results
from dimml.modalities import preprocess_for

from conftest import (
    REPO,
    SETTINGS,
    TINY_CLASSES,
    TINY_UPLOAD_LIMIT_MB,
    default_fast,
    free_port,
    setting_id,
    write_corpus,
)

CLASSES = list(TINY_CLASSES)
AV = ("audio", "visual", "fusion")   # the branches of the audio,visual model
UPLOAD_LIMIT_MB = TINY_UPLOAD_LIMIT_MB
# corrupt files mixed into the class folders -> the cause their row must report
BROKEN = {"cat/garbage.mp4": "not_media", "dog/empty.mp4": "empty", "owl/truncated.mp4": "not_media"}
VIDEO_ONLY = "cat/silent.mp4"
_free_port = free_port


# ---------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3 classes x 4 audio-video clips (manifest.csv gives labels) + 3 corrupt files + 1 silent video."""
    from training.synth import write_clip

    from conftest import moving_texture

    d = write_corpus(tmp_path_factory.mktemp("corpus"), "audio,visual", per_class=4)
    rng = np.random.default_rng(0)
    (d / "cat/garbage.mp4").write_bytes(rng.bytes(4096))
    (d / "dog/empty.mp4").write_bytes(b"")
    whole = (d / "owl/clip8.mp4").read_bytes()
    (d / "owl/truncated.mp4").write_bytes(whole[: len(whole) // 2])   # the mp4 index is at the end
    write_clip(d / VIDEO_ONLY, moving_texture(10, seed=99), 10, None)
    return d


def media_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.mp4")}


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    """The session's tiny audio,visual bundle (random weights, exported once)."""
    return tiny_bundle("audio,visual")


@pytest.fixture(scope="module")
def server(tiny_server) -> str:
    """The session's `bentoml serve` of the tiny audio,visual bundle (DIMML_MAX_UPLOAD_MB=1)."""
    return tiny_server("audio,visual")


def run_cli(*argv: str) -> tuple[int, str, str]:
    """clients.cli.main in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def local_run(corpus, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "results.csv"
    rc, stdout, stderr = run_cli("score", corpus, "--recursive", "--bundle", bundle, "--out", out,
                                 "--workers", "2", "--batch-size", "4", "--no-progress")
    assert rc == 0, stderr
    return {r["path"]: r for r in read_results(out)}, stdout, out


# ---------------------------------------------------------------------------------------
# batch scoring

def test_local_scoring_rows(local_run, corpus):
    rows, stdout, out = local_run
    assert set(rows) == media_keys(corpus)
    lines = out.read_text().splitlines()
    assert len(lines) == len(rows) + 1          # header + exactly one row per file
    assert lines[0] == ",".join(["path", "label", "confidence", *[f"prob_{c}" for c in CLASSES], "weight_audio",
                                 "weight_visual", "weight_fusion", "modalities_used", "error", "warning"])
    for key, row in rows.items():
        if key in BROKEN:
            assert row["error"].startswith(BROKEN[key] + ": ") and key in row["error"], row
            assert row["label"] == "" and row["confidence"] is None
            continue
        assert row["error"] == "" and row["warning"] == "", row   # clean files: no damage warning
        probs = {c: row[f"prob_{c}"] for c in CLASSES}
        assert row["label"] == max(probs, key=probs.get) and row["confidence"] == probs[row["label"]]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        weights = [row[f"weight_{b}"] for b in AV]
        if key == VIDEO_ONLY:   # no audio track: answered by the visual branch alone
            assert row["modalities_used"] == ["visual"] and weights == [None, 1.0, None]
        else:
            assert row["modalities_used"] == ["audio", "visual"]
            assert sum(weights) == pytest.approx(1.0, abs=1e-5) and min(weights) > 0

    # summary: counts, and accuracy + confusion matrix from the manifest's labels
    n_ok = len(rows) - len(BROKEN)
    assert f"{len(rows)} rows, {n_ok} succeeded, {len(BROKEN)} failed" in stdout
    labelled = [k for k in rows if k not in BROKEN and k != VIDEO_ONLY]   # the manifest's files
    correct = sum(rows[k]["label"] == k.split("/")[0] for k in labelled)
    assert f"accuracy {correct / len(labelled):.4f} ({correct}/{len(labelled)} labelled files)" in stdout
    matrix = stdout[stdout.index("true \\ predicted"):].splitlines()[1:1 + len(CLASSES)]
    counts = [[int(x) for x in line.split()[1:]] for line in matrix]
    assert sum(map(sum, counts)) == len(labelled) and sum(counts[i][i] for i in range(len(CLASSES))) == correct


@pytest.mark.slow   # a bentoml serve
def test_remote_scoring_matches_local(local_run, corpus, server, tmp_path):
    local, _, _ = local_run
    out = tmp_path / "remote.jsonl"
    rc, stdout, stderr = run_cli("score", corpus, "-r", "--server", server, "--out", out, "--workers", "4",
                                 "--no-progress")
    assert rc == 0, stderr
    lines = out.read_text().splitlines()
    remote = {r["path"]: r for r in map(json.loads, lines)}
    assert len(lines) == len(remote) and set(remote) == set(local)
    for key, want in local.items():
        got = remote[key]
        assert got["error"].split(":")[0] == want["error"].split(":")[0], (key, got["error"], want["error"])
        assert got["label"] == want["label"] and got["modalities_used"] == want["modalities_used"], key
        for col, v in want.items():
            if isinstance(v, float) or isinstance(got[col], float):
                assert got[col] == pytest.approx(v, abs=2e-6), (key, col)
    assert f"{len(local)} rows, {len(local) - len(BROKEN)} succeeded" in stdout


def test_fail_on_error_resume_and_refusals(corpus, bundle, tmp_path):
    out = tmp_path / "r.csv"
    args = ("score", corpus / "cat/garbage.mp4", corpus / "dog/clip5.mp4", "--bundle", bundle,
            "--out", out, "--no-progress")
    rc, stdout, _ = run_cli(*args, "--fail-on-error")
    assert rc == 1 and "2 rows, 1 succeeded, 1 failed (not_media: 1)" in stdout
    assert {r["path"] for r in read_results(out)} == {"garbage.mp4", "clip5.mp4"}   # single files: their names
    rc, _, stderr = run_cli(*args)                         # never overwrite silently
    assert rc == 2 and "--resume" in stderr
    rc, stdout, _ = run_cli(*args, "--resume")             # nothing left to do; no duplicate row
    assert rc == 0 and "2 already in" in stdout and len(out.read_text().splitlines()) == 3
    rc, _, stderr = run_cli("score", tmp_path / "nope", "--bundle", bundle, "--out", tmp_path / "x.csv")
    assert rc == 2 and "no such file or folder" in stderr
    rc, _, stderr = run_cli("score", corpus, "--bundle", bundle, "--out", tmp_path / "x.csv")
    assert rc == 2 and "--recursive" in stderr             # class folders, no -r: say so


def test_sharded_output_resumes_across_shards(local_run, corpus, bundle, tmp_path):
    """--shard-rows: results.csv is written as results.00000.csv, ...; a resumed run starts a new shard
    and never writes a path twice; read_results reads the family in order."""
    from clients.output import shard_paths

    local, _, _ = local_run
    out = tmp_path / "r.csv"
    first = ["score", corpus / "cat", corpus / "dog", "--bundle", bundle, "--out", out, "--shard-rows", "3",
             "--no-progress"]
    rc, _, stderr = run_cli(*first)
    assert rc == 0, stderr
    assert [p.name for p in shard_paths(out)] == [f"r.{i:05d}.csv" for i in range(4)] and not out.exists()   # 11 rows
    rc, _, stderr = run_cli(*first)
    assert rc == 2 and "--resume" in stderr and "r.00000.csv" in stderr
    rc, stdout, stderr = run_cli("score", corpus / "cat", corpus / "dog", corpus / "owl", "--bundle", bundle,
                                 "--out", out, "--shard-rows", "3", "--resume", "--no-progress")
    assert rc == 0 and "11 already in" in stdout, stderr
    assert [p.name for p in shard_paths(out)] == [f"r.{i:05d}.csv" for i in range(6)]   # owl's 5 rows: 2 new shards
    assert [len(read_results(p)) for p in shard_paths(out)] == [3, 3, 3, 2, 3, 2]
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(local)   # every file once
    for r in rows:
        assert r == local[r["path"]]


def _copies(corpus: Path, dest: Path, n: int) -> set[str]:
    """n copies of the corpus's good clips plus one corrupt file: enough work to interrupt."""
    good = sorted(p for p in corpus.rglob("clip*.mp4"))
    for i in range(n):
        src = good[i % len(good)]
        (dest / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / src.parent.name / f"{i:03d}.mp4")
    shutil.copyfile(corpus / "cat/garbage.mp4", dest / "cat/garbage.mp4")
    return media_keys(dest)


def _interrupt(cmd: list[str], out: Path, signum: int, min_rows: int = 2) -> tuple[int, str]:
    """Start a scoring subprocess, send `signum` once min_rows rows are on disk; (exit code, stdout)."""
    header = 1 if out.suffix == ".csv" else 0
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= header + min_rows):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no rows written in 60 s"
            time.sleep(0.005)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout


def test_sigterm_then_resume_local(corpus, bundle, tmp_path):
    keys = _copies(corpus, tmp_path / "data", 40)
    out = tmp_path / "out" / "results.csv"
    cmd = [sys.executable, "-m", "clients", "score", str(tmp_path / "data"), "-r", "--bundle", str(bundle),
           "--out", str(out), "--workers", "1", "--batch-size", "1", "--no-progress"]
    rc, stdout = _interrupt(cmd, out, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in stdout and "--resume" in stdout
    first = read_results(out)
    assert 2 <= len(first) < len(keys)
    assert out.read_bytes().endswith(b"\n")                # only whole rows
    with open(out, "a") as f:                               # as if a hard kill cut a row in half
        f.write('dog/017.mp4,dog,0.5')
    rc, stdout, _ = run_cli(*cmd[3:], "--resume")
    assert rc == 0 and f"{len(first)} already in" in stdout
    paths = [r["path"] for r in read_results(out)]
    assert sorted(paths) == sorted(keys)                    # every file exactly once
    assert len(out.read_text().splitlines()) == len(keys) + 1
    assert os.listdir(tmp_path / "out") == ["results.csv"]   # nothing written beside --out


@pytest.mark.slow   # a bentoml serve
def test_sigint_then_resume_remote(corpus, server, tmp_path):
    keys = _copies(corpus, tmp_path / "data", 40)
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "clients", "score", str(tmp_path / "data"), "-r", "--server", server,
           "--out", str(out), "--workers", "1", "--no-progress"]
    rc, stdout = _interrupt(cmd, out, signal.SIGINT)
    assert rc == 128 + signal.SIGINT and "interrupted (SIGINT)" in stdout
    first = read_results(out)
    assert 2 <= len(first) < len(keys)
    rc, stdout, _ = run_cli(*cmd[3:], "--resume", "--workers", "4")
    assert rc == 0
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == sorted(keys)
    assert [r["error"].split(":")[0] for r in read_results(out) if r["error"]] == ["not_media"]


# ---------------------------------------------------------------------------------------
# inputs and the output file

def test_find_jobs_path_rules(tmp_path):
    for rel in ("a/x.mp4", "a/sub/y.mp4", "b/x.mp4", "b/z.wav", "p/data/q.mp4", "r/data/q.mp4", "one.flv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    keys = lambda jobs: sorted(j.key for j in jobs)
    assert keys(find_jobs([tmp_path / "a"])) == ["x.mp4"]
    assert keys(find_jobs([tmp_path / "a"], recursive=True)) == ["sub/y.mp4", "x.mp4"]
    assert keys(find_jobs([tmp_path / "a", tmp_path / "b", tmp_path / "one.flv"])) == ["a/x.mp4", "b/x.mp4", "one.flv"]
    assert keys(find_jobs([tmp_path / "b"], exts=["wav"])) == ["z.wav"]
    # overlapping INPUTs: each file once, under the first INPUT that reaches it
    assert keys(find_jobs([tmp_path / "a", tmp_path / "a/sub"], recursive=True)) == ["a/sub/y.mp4", "a/x.mp4"]
    with pytest.raises(InputError, match="distinct names"):
        find_jobs([tmp_path / "p/data", tmp_path / "r/data"])
    # no media at its top, class folders below: a dataset, scored whole without --recursive
    assert [(j.key, j.truth) for j in find_jobs([tmp_path / "p"])] == [("data/q.mp4", ("data",))]
    (tmp_path / "p/data/q.wav").write_bytes(b"x")
    with pytest.raises(InputError, match="--recursive"):   # other files than videos: walked, as asked
        find_jobs([tmp_path / "p"], exts=["wav"])


def test_find_jobs_labels_from_layouts(corpus, tmp_path):
    jobs = {j.key: j for j in find_jobs([corpus], recursive=True)}
    assert jobs["dog/clip6.mp4"].truth == ("dog",) and jobs["dog/clip6.mp4"].files == {"video": str(corpus / "dog/clip6.mp4")}
    assert jobs[VIDEO_ONLY].truth == ()                    # not in the manifest
    # a manifest given as INPUT: its rows, paths relative to its folder, audio_path honoured
    (tmp_path / "m.csv").write_text(f"path,label,audio_path\n{corpus / 'owl/clip9.mp4'},owl,"
                                    f"{corpus / 'cat/clip1.mp4'}\n")
    [job] = find_jobs([tmp_path / "m.csv"])
    assert job.truth == ("owl",) and job.files == {"video": str(corpus / "owl/clip9.mp4"),
                                                "audio": str(corpus / "cat/clip1.mp4")}
    assert job.key == os.path.relpath(corpus / "owl/clip9.mp4", tmp_path)
    # class sub-folders without a manifest
    shutil.copytree(corpus / "dog", tmp_path / "plain/dog")
    assert {j.truth for j in find_jobs([tmp_path / "plain"], recursive=True)} == {("dog",)}
    assert {j.truth for j in find_jobs([tmp_path / "plain"])} == {("dog",)}   # class folders: no --recursive needed
    # a model of two image views: a folder must name them (a manifest), a lone image cannot be a sample
    views = preprocess_for("tiny", "front:image,rear:image")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="front_path, rear_path"):
        find_jobs([tmp_path / "img"], views)
    with pytest.raises(InputError, match="a single file is one of them"):
        find_jobs([tmp_path / "img" / "a.png"], views)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_result_writer_resume_cuts_partial_row(tmp_path, suffix):
    out = tmp_path / f"r{suffix}"
    odd = 'we,ird "name"\nwith newline.mp4'   # quoting and a newline survive, and resume sees one record
    with ResultWriter(out, CLASSES, AV) as w:
        w.write(error_row(odd, "not_media: x", CLASSES, AV))
        w.write(error_row("b.mp4", "empty:\n two lines", CLASSES, AV))
    with pytest.raises(OutputError, match="--resume"):
        ResultWriter(out, CLASSES, AV)
    with open(out, "ab") as f:
        f.write(b'"c.mp4,,' if suffix == ".csv" else b'{"path": "c.mp4", "lab')
    with ResultWriter(out, CLASSES, AV, resume=True) as w:
        assert w.done == {odd, "b.mp4"}
        with pytest.raises(OutputError, match="another scoring run"):
            ResultWriter(out, CLASSES, AV, resume=True)   # locked while open
        with pytest.raises(OutputError, match="already has a row"):
            w.write(error_row("b.mp4", "x", CLASSES, AV))
        w.write(error_row("c.mp4", "empty: y", CLASSES, AV))
    rows = read_results(out)
    assert [r["path"] for r in rows] == [odd, "b.mp4", "c.mp4"]
    assert rows[1]["error"] == "empty: two lines" and rows[0]["confidence"] is None
    with pytest.raises(OutputError, match="another model"):
        ResultWriter(out, ["cat", "dog"], AV, resume=True)
    with pytest.raises(OutputError, match="another model"):
        ResultWriter(out, CLASSES, ("front", "rear", "fusion"), resume=True)   # other modalities: other columns
    # damage before the last row is not a hard kill's doing: refused, nothing cut
    lines = out.read_bytes().split(b"\n")
    lines[-3] = b"damaged"
    out.write_bytes(b"\n".join(lines))
    with pytest.raises(OutputError, match="not a result row"):
        ResultWriter(out, CLASSES, AV, resume=True)
    other = tmp_path / f"notes{suffix}"
    other.write_bytes(b"my own notes")   # no line end: must not be taken for a cut-off row
    with pytest.raises(OutputError):
        ResultWriter(other, CLASSES, AV, resume=True)
    assert other.read_bytes() == b"my own notes"


# ---------------------------------------------------------------------------------------
# the client against the real server

@pytest.mark.slow   # a bentoml serve
def test_client_typed_results(server, corpus, bundle):
    clip, other = corpus / "dog/clip5.mp4", corpus / "owl/clip11.mp4"
    with Client(server, timeout=60) as c:
        meta = c.metadata()
        assert meta["classes"] == CLASSES and meta["upload_fields"] == ["video", "audio", "visual"]
        by_path = c.predict(clip)
        assert isinstance(by_path, Prediction) and by_path.label in CLASSES
        assert set(by_path.branches) == {"audio", "visual", "fusion"}
        assert sum(b.weight for b in by_path.branches.values()) == pytest.approx(1.0)
        assert by_path.confidence == max(by_path.probabilities.values())
        assert by_path.model_version == meta["model"]["version"] and by_path.backend == meta["backend"]
        with open(clip, "rb") as f:
            for same in (c.predict(clip.read_bytes(), filenames={"video": "x.mp4"}), c.predict(f),
                         c.predict({"video": clip})):
                assert same.label == by_path.label
                assert same.probabilities == pytest.approx(by_path.probabilities, abs=1e-6)
        av = c.predict({"video": clip, "audio": other})   # this video, another clip's sound
        assert av.modalities_used == ("audio", "visual")
        assert av.branches["visual"].probabilities == pytest.approx(by_path.branches["visual"].probabilities, abs=1e-6)
        assert av.branches["audio"].certainty != by_path.branches["audio"].certainty   # the other clip's sound
        from dimml.predict import Predictor
        offline = Predictor(bundle).predict_files({"video": clip, "audio": other})
        for b, r in av.branches.items():
            assert r.probabilities == pytest.approx(offline["branches"][b]["probabilities"], rel=1e-5, abs=1e-9)
            assert r.weight == pytest.approx(offline["branches"][b]["weight"], rel=1e-5)
        batch = c.predict_batch([clip, other])
        assert [p.label for p in batch] == [by_path.label, c.predict(other).label]
        with pytest.raises(ServerError) as e:
            c.predict(corpus / "cat/garbage.mp4")
        assert e.value.status == 422 and "garbage.mp4" in e.value.message and "not a decodable" in e.value.message
        with pytest.raises(ServerError) as e:
            c.predict(os.urandom(int(1.5 * UPLOAD_LIMIT_MB * 2**20)), filenames={"video": "big.mp4"})
        assert e.value.status == 413 and "limit" in e.value.message

    async def both():
        async with AsyncClient(server, timeout=60) as ac:
            return await asyncio.gather(ac.predict(clip), ac.predict(other.read_bytes()))

    a, b = asyncio.run(both())
    assert a.label == by_path.label and a.probabilities == pytest.approx(by_path.probabilities, abs=1e-6)
    assert b.label == batch[1].label


# ---------------------------------------------------------------------------------------
# retries, errors and timeouts against a scripted server

ANSWER = {"label": "cat", "probabilities": {"cat": 0.75, "dog": 0.25},
          "branches": {"audio": {"probabilities": {"cat": 0.75, "dog": 0.25}, "certainty": 0.75, "weight": 1.0}},
          "modalities_used": ["audio"], "model": {"name": "m", "version": "1"}, "backend": "test"}


class Scripted:
    """An HTTP server answering each request with the next (status, body, headers, delay) of a script."""

    def __init__(self):
        self.script: list[tuple[int, object, dict, float]] = []
        self.seen: list[tuple[str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.seen.append((self.path, body))
                status, payload, headers, delay = outer.script.pop(0)
                time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *a: None   # the client hung up on purpose (timeouts)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def run(self, *steps):
        """Steps: (status, body[, headers[, delay_s]])."""
        self.script = [(st[0], st[1], st[2] if len(st) > 2 else {}, st[3] if len(st) > 3 else 0.0) for st in steps]
        self.seen = []
        return self


@pytest.fixture
def scripted():
    s = Scripted()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


FAST = RetryPolicy(retries=2, backoff_s=0.01)


def test_client_retries_then_succeeds(scripted):
    scripted.run((503, {"error": "warming up"}, {"Retry-After": "0"}), (429, [{"error": "slow down"}]), (200, ANSWER))
    with Client(scripted.url, retry=FAST) as c:
        p = c.predict(b"VIDEO-BYTES", filenames={"video": "v.mp4"})
    assert p.label == "cat" and p.confidence == 0.75 and p.weight("audio") == 1.0 and p.weight("visual") is None
    assert [path for path, _ in scripted.seen] == ["/predict"] * 3
    assert all(b"VIDEO-BYTES" in body and b'name="video"' in body for _, body in scripted.seen)   # resent whole


def test_client_errors_carry_status_and_message(scripted):
    with Client(scripted.url, retry=FAST) as c:
        scripted.run(*[(503, [{"error": "busy"}])] * 3)
        with pytest.raises(ServerError) as e:
            c.predict(b"x")
        assert e.value.status == 503 and e.value.message == "busy" and len(scripted.seen) == 3   # 1 + 2 retries
        scripted.run((400, {"detail": "bad field"}), (200, ANSWER))
        with pytest.raises(ServerError, match="HTTP 400 from /predict: bad field"):
            c.predict(b"x")
        assert len(scripted.seen) == 1                    # a 4xx other than 429 is not retried
        scripted.run((500, "boom: <traceback>"))
        with pytest.raises(ServerError) as e:
            c.predict({"front": b"x", "rear": b"y"}, filenames={"front": "f.png", "rear": "r.png"})
        assert e.value.status == 500 and e.value.message == "boom: <traceback>"
        path, body = scripted.seen[0]   # one request, one part per field
        assert path == "/predict" and b'name="front"; filename="f.png"' in body and b'name="rear"; filename="r.png"' in body
        scripted.run((200, {"label": "cat"}))
        with pytest.raises(ServerError, match="malformed prediction"):
            c.predict(b"x")
    with Client(scripted.url, timeout=0.2, retry=FAST) as c:
        scripted.run((200, ANSWER, {}, 1.0))
        with pytest.raises(RequestTimeout):
            c.predict(b"x")
        assert len(scripted.seen) == 1                    # a read timeout is not resent


def test_client_unreachable_and_async(scripted):
    dead = f"http://127.0.0.1:{_free_port()}"
    with Client(dead, retry=FAST) as c:
        with pytest.raises(ServerUnreachable) as e:
            c.predict(b"x")
        assert e.value.attempts == 3 and isinstance(e.value.cause, httpx.ConnectError)
        assert not c.ready()

    async def go():
        async with AsyncClient(scripted.url, retry=FAST) as ac:
            scripted.run((503, {"error": "later"}), (200, ANSWER))
            p = await ac.predict(b"x")
            scripted.run((422, {"error": "video 'x.mp4': empty file (0 bytes)", "cause": "empty"}))
            with pytest.raises(ServerError) as e:
                await ac.predict(b"")
            assert e.value.status == 422 and e.value.body["cause"] == "empty"
            async with AsyncClient(dead, retry=FAST) as gone:
                with pytest.raises(ServerUnreachable):
                    await gone.predict(b"x")
            return p

    assert asyncio.run(go()).label == "cat"


def test_server_lost_mid_run_stops_and_resumes(scripted, tmp_path):
    """A server that stops answering is no file's fault: no error rows, exit 3, then --resume finishes."""
    for i in range(4):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.mp4").write_bytes(b"x")   # the scripted server never decodes
    meta = {"classes": ["cat", "dog"], "model": {"name": "m", "version": "1"}, "backend": "test",
            "modalities": ["audio", "visual"], "preprocess": preprocess_for("tiny", "audio,visual").to_dict()}
    out = tmp_path / "r.csv"
    args = ("score", tmp_path / "in", "--server", scripted.url, "--out", out, "--workers", "1", "--retries", "1",
            "--no-progress")
    scripted.run((200, meta), (200, ANSWER), (200, ANSWER), (503, {"error": "overloaded"}), (503, {"error": "still"}))
    rc, stdout, _ = run_cli(*args)
    assert rc == 3 and "HTTP 503 from /predict: still" in stdout and "--resume" in stdout
    assert [r["error"] for r in read_results(out)] == ["", ""]
    scripted.run((200, meta), (200, ANSWER), (200, ANSWER))
    rc, stdout, _ = run_cli(*args, "--resume")
    assert rc == 0 and sorted(r["path"] for r in read_results(out)) == ["0.mp4", "1.mp4", "2.mp4", "3.mp4"]
    dead = f"http://127.0.0.1:{_free_port()}"
    rc, _, stderr = run_cli("score", tmp_path / "in", "--server", dead, "--out", tmp_path / "x.csv", "--retries", "0")
    assert rc == 2 and "unreachable" in stderr             # found out at start: nothing written
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------------------------------
# every setting: scoring a corpus with a column per source file, locally and through a server

@pytest.mark.parametrize("setting", default_fast(), ids=setting_id)
def test_score_every_setting_local(tiny_bundle, tiny_corpus, setting, tmp_path):
    names = list(preprocess_for("tiny", setting).names)
    corpus = tiny_corpus(setting)
    out = tmp_path / "r.csv"
    rc, stdout, stderr = run_cli("score", corpus, "-r", "--bundle", tiny_bundle(setting), "--out", out,
                                 "--workers", "2", "--batch-size", "4", "--no-progress")
    assert rc == 0, stderr
    header = out.read_text().splitlines()[0].split(",")
    assert header[-3 - len(names) - 1:] == [*(f"weight_{n}" for n in names), "weight_fusion",
                                            "modalities_used", "error", "warning"]
    rows = read_results(out)
    assert len(rows) == 6 and all(r["error"] == r["warning"] == "" and r["modalities_used"] == names for r in rows)
    for r in rows:
        assert sum(r[f"weight_{b}"] for b in (*names, "fusion")) == pytest.approx(1.0, abs=1e-5)
    assert "6 rows, 6 succeeded, 0 failed" in stdout and "accuracy" in stdout   # labels from manifest.csv
    # the manifest as INPUT: the same rows
    rc, _, stderr = run_cli("score", corpus / "manifest.csv", "--bundle", tiny_bundle(setting),
                            "--out", tmp_path / "m.jsonl", "--no-progress")
    assert rc == 0, stderr
    by_manifest = {r["path"]: r for r in read_results(tmp_path / "m.jsonl")}
    assert by_manifest.keys() == {r["path"] for r in rows}
    for r in rows:
        assert by_manifest[r["path"]]["label"] == r["label"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_score_every_setting_remote_matches_local(tiny_bundle, tiny_server, tiny_corpus, setting, tmp_path):
    corpus = tiny_corpus(setting)
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    assert run_cli("score", corpus, "-r", "--bundle", tiny_bundle(setting), "--out", local, "--no-progress")[0] == 0
    rc, stdout, stderr = run_cli("score", corpus, "-r", "--server", tiny_server(setting), "--out", remote,
                                 "--workers", "3", "--no-progress")
    assert rc == 0, stderr
    want = {r["path"]: r for r in read_results(local)}
    got = {r["path"]: r for r in read_results(remote)}
    assert got.keys() == want.keys() and len(got) == 6
    for key, w in want.items():
        assert got[key]["label"] == w["label"] and got[key]["modalities_used"] == w["modalities_used"]
        for col, v in w.items():
            if isinstance(v, float):
                assert got[key][col] == pytest.approx(v, abs=2e-6), (key, col)


@pytest.mark.parametrize("setting", ["audio,visual", "front:image,rear:image"], ids=setting_id)
def test_predict_command_takes_files_by_field(tiny_bundle, tiny_corpus, setting):
    """`dimml-score predict [FIELD=]FILE ...`: a lone file is the model's one field; FIELD=FILE otherwise."""
    from dimml.datasets import read_manifest
    from dimml.predict import Predictor

    bundle, corpus = tiny_bundle(setting), tiny_corpus(setting)
    samples, _ = read_manifest(corpus / "manifest.csv")
    files = samples[0].files
    want = Predictor(bundle).predict_files(files)
    rc, stdout, stderr = run_cli("predict", *(f"{f}={p}" for f, p in files.items()), "--bundle", bundle)
    assert rc == 0, stderr
    got = json.loads(stdout)
    assert got["label"] == want["label"] and got["modalities_used"] == want["modalities_used"]
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-9)
    if list(files) == ["video"]:
        rc, stdout, _ = run_cli("predict", files["video"], "--bundle", bundle)
        assert rc == 0 and json.loads(stdout)["probabilities"] == got["probabilities"]
    else:   # several fields: a lone file cannot say which it is
        rc, _, stderr = run_cli("predict", next(iter(files.values())), "--bundle", bundle)
        assert rc == 2 and "give files keyed by field" in stderr
        rc, _, stderr = run_cli("predict", "front", "--bundle", bundle)
        assert rc == 2
    rc, _, stderr = run_cli("predict", f"sonar={next(iter(files.values()))}", "--bundle", bundle)
    assert rc == 2 and "unknown field" in stderr

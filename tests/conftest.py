"""Shared test constants and fixtures (tests/ is on sys.path: `from conftest import SETTINGS`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dimml.modalities import preprocess_for

# One torch thread per process (set before any test imports torch; subprocesses inherit it): the
# tests run several processes at once (servers, DDP ranks, CLI runs) on two cores, where two
# threads each made training up to 3x slower idle-ish and 24x slower under load (BENCHMARKS.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The four experiment settings every layer's tests are parametrised over (DI-MML's Table 2 + DGL's three).
SETTINGS = ("audio,visual", "visual,flow", "front:image,rear:image", "audio,visual,flow")


def random_arrays(setting: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of every modality of a setting, in the tiny preset's shapes and dtypes."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in preprocess_for("tiny", setting).modalities:
        if np.issubdtype(s.dtype, np.floating):
            out[s.name] = (rng.normal(size=(n, *s.shape)) * 3 - 8).astype(s.dtype)
        else:
            out[s.name] = rng.integers(0, 256, (n, *s.shape), dtype=s.dtype)
    return out


# --- media fixtures: real files, written with PyAV (video/audio) and OpenCV (still images)

def moving_texture(n: int, h: int = 48, w: int = 64, *, seed: int = 0, step: int = 3) -> np.ndarray:
    """uint8 [n, h, w, 3]: a random blocky texture scrolling `step` px right per frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.stack([np.roll(base, step * i, axis=1) for i in range(n)])


def sine(seconds: float, sr: int = 16000, f: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode an RGB uint8 [h, w, 3] image; the format follows the extension (png, jpg, webp...)."""
    import cv2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]))
    assert ok, path
    path.write_bytes(buf.tobytes())
    return path


def write_sample(root: str | Path, setting: str, *, seed: int = 0, seconds: float = 1.0, fps: int = 10,
                 video_ext: str = ".mp4") -> dict[str, str]:
    """Real source files of one sample of a setting, keyed by field ("video", or the image names)."""
    from dimml.modalities import parse_modalities
    from training.synth import write_clip
    root = Path(root)
    specs = parse_modalities(setting)
    files: dict[str, str] = {}
    if any(s.kind_obj.from_video for s in specs):
        with_audio = any(s.kind == "audio" for s in specs)
        path = root / f"clip{seed}{video_ext}"
        write_clip(path, moving_texture(int(seconds * fps), seed=seed), fps=fps,
                   audio=sine(seconds, f=220.0 + 40 * seed) if with_audio else None)
        files["video"] = str(path)
    rng = np.random.default_rng(1000 + seed)
    for s in specs:
        if not s.kind_obj.from_video:
            img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
            files[s.name] = str(write_image(root / f"{s.name}{seed}.png", img))
    return files


# --- export/serving fixtures (owner: export/serving): one random-weight tiny run, bundle, corpus
# and server per setting per session, built on first use and shared by test_export, test_predict,
# test_serving and test_clients.

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent    # the venv's scripts: bentoml, dimml
TINY_CLASSES = ("cat", "dog", "owl")
TINY_UPLOAD_LIMIT_MB = 1    # DIMML_MAX_UPLOAD_MB of the tiny servers (their samples are a few kB)


def make_tiny_run(run_dir: Path, setting: str, *, seed: int = 0, fusion: str = "concat", temperature: float = 0.7,
                  classes: tuple[str, ...] = TINY_CLASSES, report: dict | None = None, rule=None) -> Path:
    """A random-weight tiny run of a setting with a report, as training would leave it: its final
    output `rule` (an OutputRule; default the paper's weighting at `temperature`), or a whole `report`."""
    import json

    import torch

    from training.models import build_model, build_model_config
    from training.run import run_config_fields, save_run_model

    torch.manual_seed(seed)
    pp = preprocess_for("tiny", setting)
    cfg = build_model_config("tiny", len(classes), pp, fusion=fusion)
    config = {"method": "dimml", "preset": "tiny", **run_config_fields(pp, cfg, list(classes)), "lw_temperature": 1.0}
    save_run_model(run_dir, config, build_model(cfg, pp))
    # the shape training.evaluate writes (abridged)
    from dimml.weighting import OutputRule
    rule = rule or OutputRule.paper(temperature).because("chosen on validation (a random-weight test run)")
    (run_dir / "report.json").write_text(json.dumps(report or {
        "method": "dimml", "eval_split": "test", "metrics": {"final": {"accuracy": 0.42}, "fusion": {"accuracy": 0.4}},
        "final_output": {"chosen": rule.name, "rule": rule.to_dict(), "reason": rule.reason,
                         "lw_temperature": temperature, "lw_temperature_source": "val"}}))
    return run_dir


def write_corpus(root: Path, setting: str, per_class: int = 2, classes: tuple[str, ...] = TINY_CLASSES) -> Path:
    """Real media for a setting under root/<class>/ plus manifest.csv (`path`, `<name>_path`, label)."""
    import csv

    from dimml.datasets import manifest_column

    rows = []
    for ci, c in enumerate(classes):
        for i in range(per_class):
            files = write_sample(root / c, setting, seed=ci * per_class + i)
            rows.append(({manifest_column(f): os.path.relpath(p, root) for f, p in files.items()}, c))
    columns = list(rows[0][0])
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, "label", "split"])
        for files, label in rows:
            w.writerow([files[c] for c in columns] + [label, "test"])
    return root


def default_fast(settings=SETTINGS) -> list:
    """The settings as parameters, all but the default audio,visual marked slow (for tests that
    decode a corpus per setting: the fast lane keeps one)."""
    return [s if s == "audio,visual" else pytest.param(s, marks=pytest.mark.slow) for s in settings]


def setting_id(setting: str) -> str:
    """A file-name-safe id of a setting ("front:image,rear:image" -> "front-image_rear-image")."""
    return setting.replace(":", "-").replace(",", "_")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """setting -> bundle folder of a random-weight tiny run, exported once per session.

    The TorchScript exporter (~4x faster than dynamo); test_export covers the default one.
    """
    from export.build import BundleOptions, build_bundle

    made: dict[str, Path] = {}

    def get(setting: str) -> Path:
        if setting not in made:
            root = tmp_path_factory.mktemp(f"bundle-{setting_id(setting)}")
            run = make_tiny_run(root / "tiny-run", setting)
            made[setting] = build_bundle(run, root / "bundle", BundleOptions(exporter="torchscript"), progress=False)
        return made[setting]

    return get


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """setting -> a folder of real media (2 per class, 3 classes) with manifest.csv, written once."""
    made: dict[str, Path] = {}

    def get(setting: str) -> Path:
        if setting not in made:
            made[setting] = write_corpus(tmp_path_factory.mktemp(f"corpus-{setting_id(setting)}"), setting)
        return made[setting]

    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server (it stops its workers); SIGKILL whatever of its tree is left after 15 s."""
    import psutil

    def tree(pid: int) -> set[int]:
        try:
            return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    pids = tree(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    for pid in pids | tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`bentoml serve serving.service:DIMML` from the repository root on a free port."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "serving.service:DIMML",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {timeout} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def tiny_server(tiny_bundle, tmp_path_factory):
    """setting -> base URL of `bentoml serve` serving that setting's tiny bundle (started once,
    stopped at the end of the session)."""
    running: dict[str, tuple[subprocess.Popen, str]] = {}

    def get(setting: str) -> str:
        if setting not in running:
            tmp = tmp_path_factory.mktemp(f"serve-{setting_id(setting)}")
            env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "DIMML_BUNDLE": str(tiny_bundle(setting)),
                   "DIMML_MAX_LATENCY_MS": "30000", "DIMML_MAX_UPLOAD_MB": str(TINY_UPLOAD_LIMIT_MB)}
            proc, url = start_server(env, tmp / "serve.log")
            running[setting] = (proc, url)
            wait_ready(proc, url, tmp / "serve.log")
        return running[setting][1]

    yield get
    for proc, _ in running.values():
        stop_server(proc)

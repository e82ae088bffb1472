"""Packaging: what each extra installs, the bentofiles, and a slim `.[serve,cpu]` install (no torch)
serving an ONNX bundle through a real `bentoml serve` and scoring a folder."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomllib
import yaml

from dimml.extras import MissingExtra, check, install_hint, require

from conftest import BIN, REPO, TINY_CLASSES, free_port, stop_server, wait_ready

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]
HEAVY = ("torch", "bentoml", "matplotlib", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "httpx",
         "tensorrt", "tensorboard", "pyyaml")
# what the slim install copies: the package sources and the project files pip builds from
SOURCES = ("pyproject.toml", "README.md", "dimml", "training", "export", "serving", "clients")


def dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


# ---------------------------------------------------------------------------------------
# pyproject extras and bentofiles (static)

def test_core_dependencies_are_minimal():
    names = {dist_name(r) for r in PYPROJECT["dependencies"]}
    assert names == {"numpy", "scipy", "av", "opencv-contrib-python-headless", "tqdm"}
    assert not names & set(HEAVY)


def test_onnxruntime_build_is_chosen_by_exactly_one_extra():
    ort = {extra: [dist_name(r) for r in reqs if dist_name(r).startswith("onnxruntime")]
           for extra, reqs in EXTRAS.items()}
    assert ort.pop("cpu") == ["onnxruntime"] and ort.pop("gpu") == ["onnxruntime-gpu"]
    assert not any(ort.values()), f"only cpu/gpu may bring ONNX Runtime: {ort}"
    assert {dist_name(r) for r in EXTRAS["client"]} == {"httpx"}
    assert {dist_name(r) for r in EXTRAS["serve"]} == {"bentoml"}
    assert "torch" in {dist_name(r) for r in EXTRAS["train"]} and "pyyaml" in {dist_name(r) for r in EXTRAS["train"]}
    assert PYPROJECT["scripts"]["dimml"] == "dimml.cli:main"


@pytest.mark.parametrize("bentofile, runtime", [("bentofile.yaml", "cpu"), ("bentofile.cuda.yaml", "gpu")])
def test_bentofile_packages_are_core_serve_and_one_runtime(bentofile, runtime):
    spec = yaml.safe_load((REPO / bentofile).read_text())
    want = PYPROJECT["dependencies"] + EXTRAS["serve"] + EXTRAS[runtime]
    assert sorted(spec["python"]["packages"]) == sorted(want)
    assert spec["service"] == "serving.service:DIMML"
    assert "tests/" in spec["exclude"] and not any("training" in p for p in spec["include"])
    if runtime == "gpu":
        assert spec["docker"]["cuda_version"].startswith("12")


@pytest.mark.slow
def test_bentoml_build_cuda_bentofile(tmp_path):
    """`bentoml build -f bentofile.cuda.yaml` packs onnxruntime-gpu on a CUDA base image, no torch."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    r = subprocess.run([str(BIN / "bentoml"), "build", "-f", "bentofile.cuda.yaml",
                        "--output", "tag"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    bento = next(p for p in (tmp_path / "home" / "bentos" / "dimml").iterdir() if p.name != "latest")
    reqs = {dist_name(line) for line in (bento / "env" / "python" / "requirements.txt").read_text().split()}
    assert "onnxruntime-gpu" in reqs and "onnxruntime" not in reqs and "torch" not in reqs
    assert "FROM nvidia/cuda:12" in (bento / "env" / "docker" / "Dockerfile").read_text()
    assert not (bento / "src" / "training").exists()


# ---------------------------------------------------------------------------------------
# missing extras: one line naming the install command

def test_missing_extra_names_the_install_command():
    with pytest.raises(MissingExtra, match=r"^dimml train needs no_such_module_xyz, which is not installed: "
                                           r"pip install 'dimml\[train\]'$"):
        check("no_such_module_xyz", what="dimml train", extra="train")
    with pytest.raises(MissingExtra, match=re.escape(install_hint("cpu"))):
        require("no_such_module_xyz", "cpu", what="onnxruntime-cpu")
    assert require("json").__name__ == "json"
    check("json", "numpy", what="nothing missing")


# ---------------------------------------------------------------------------------------
# pip's resolution of the GPU serving install (no install)

@pytest.mark.slow
def test_serve_gpu_resolution_has_no_cpu_onnxruntime(tmp_path):
    """`pip install --dry-run --report` of `.[serve,gpu]`: onnxruntime-gpu, and no CPU onnxruntime, no torch."""
    src = _copy_sources(tmp_path / "src")
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f"{src}[serve,gpu]"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and "No matching distribution found for onnxruntime-gpu" in r.stderr:
        pytest.skip("no package index reachable here has onnxruntime-gpu")
    assert r.returncode == 0, r.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"dimml", "onnxruntime-gpu", "bentoml"} <= names
    assert "onnxruntime" not in names and "torch" not in names


# ---------------------------------------------------------------------------------------
# a `.[serve,cpu]` virtual environment: no torch, serves and scores

def _copy_sources(dest: Path) -> Path:
    """The files pip builds the package from, copied (so the build leaves nothing in the repository)."""
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without this test run's Python paths (the slim venv must import only its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slim")
    src = _copy_sources(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{src}[serve,cpu]"],
                       capture_output=True, text=True, timeout=900, env=_clean_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return venv


@pytest.mark.slow
def test_slim_serve_cpu_install_serves_and_scores_without_torch(slim_venv, tiny_bundle, tiny_corpus, tmp_path):
    bin_ = slim_venv / "bin"
    work = tmp_path / "work"   # not the repository: the installed package is what runs
    work.mkdir()
    env = _clean_env(BENTOML_HOME=str(tmp_path / "bentoml"), DIMML_MAX_LATENCY_MS="30000")

    r = subprocess.run([str(bin_ / "python"), "-c", "import torch"], capture_output=True, text=True, cwd=work)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = subprocess.run([str(bin_ / "python"), "-c", "import dimml.engines, serving, clients; print(dimml.__file__)"],
                       capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0 and str(slim_venv) in r.stdout, r.stderr
    # a command whose extra is missing: one line with the fix
    r = subprocess.run([str(bin_ / "dimml"), "train", "--data", "d", "--out", "o"], capture_output=True, text=True,
                       cwd=work, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "pip install 'dimml[train]'" in r.stderr

    bundle, corpus = tiny_bundle("audio,visual"), tiny_corpus("audio,visual")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(bin_ / "dimml"), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log_path, timeout=180)
        clip = next(corpus.glob("*/*.mp4"))
        with open(clip, "rb") as f:
            resp = httpx.post(f"{url}/predict", files={"video": (clip.name, f, "video/mp4")}, timeout=60)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["label"] in TINY_CLASSES and answer["backend"] == "onnxruntime-cpu"

        served, local = tmp_path / "served.csv", tmp_path / "local.csv"
        for out, source in ((served, ["--server", url]), (local, ["--bundle", str(bundle)])):
            r = subprocess.run([str(bin_ / "dimml"), "score", str(corpus), "--recursive", "--out", str(out), *source,
                                "--no-progress"],
                               capture_output=True, text=True, cwd=work, env=env, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop_server(proc)
    rows = {kind: list(csv.DictReader(open(path))) for kind, path in (("served", served), ("local", local))}
    assert len(rows["served"]) == 2 * len(TINY_CLASSES) and not any(r["error"] for r in rows["served"])
    by_path = {r["path"]: r for r in rows["local"]}
    for row in rows["served"]:
        assert by_path[row["path"]]["label"] == row["label"]
        assert float(by_path[row["path"]]["confidence"]) == pytest.approx(float(row["confidence"]), abs=1e-5)
    assert answer["label"] == by_path[str(clip.relative_to(corpus))]["label"]


@pytest.mark.slow
def test_slim_client_ray_install_scores_on_ray(tiny_bundle, tiny_corpus, tmp_path):
    """A fresh `.[client,cpu,ray]` venv (no torch, no BentoML): `dimml score --engine ray` on a local Ray
    writes the rows of local scoring, its shards; `--resume` finds nothing left."""
    root = tmp_path / "slim-ray"
    src = _copy_sources(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", f"{src}[client,cpu,ray]"],
                       capture_output=True, text=True, timeout=900, env=_clean_env())
    assert r.returncode == 0, r.stderr[-4000:]
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(RAY_ADDRESS="")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True, cwd=work)
    assert "No module named 'torch'" in r.stderr
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import bentoml"], capture_output=True, text=True, cwd=work)
    assert "No module named 'bentoml'" in r.stderr
    bundle, corpus = tiny_bundle("audio,visual"), tiny_corpus("audio,visual")
    rows = {}
    for name, extra in (("local", []), ("ray", ["--engine", "ray"])):
        out = tmp_path / f"{name}.csv"
        r = subprocess.run([str(venv / "bin" / "dimml"), "score", str(corpus), "-r", "--bundle", str(bundle),
                            "--out", str(out), "--no-progress", *extra],
                           capture_output=True, text=True, cwd=work, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        files = sorted(tmp_path.glob(f"{name}*.csv"))
        rows[name] = [row for f in files for row in csv.DictReader(open(f))]
        if name == "ray":
            assert [f.name for f in files] == ["ray.00000.csv"] and "on Ray (" in r.stdout   # shards by default
            r = subprocess.run([str(venv / "bin" / "dimml"), "score", str(corpus), "-r", "--bundle", str(bundle),
                                "--out", str(out), "--no-progress", "--resume", *extra],
                               capture_output=True, text=True, cwd=work, env=env, timeout=600)
            assert r.returncode == 0 and "0 file(s)" in r.stdout and "6 already in" in r.stdout, r.stdout + r.stderr
    assert len(rows["ray"]) == 2 * len(TINY_CLASSES)
    assert sorted(rows["ray"], key=lambda x: x["path"]) == sorted(rows["local"], key=lambda x: x["path"])


def test_readme_test_command_is_what_ci_runs():
    """The README's second command is exactly `.ci/run`'s, and it installs the extras the tests import."""
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (REPO / "README.md").read_text()
    assert f"```bash\n{ci}\n```" in readme
    extras = re.search(r"-e '\.\[([a-z,]+)\]'", ci).group(1).split(",")
    assert {"train", "export", "serve", "client", "cpu", "dev"} <= set(extras) and "gpu" not in extras
    assert ci.index("torch==") < ci.index("-e '.[")   # the CPU torch first, so the package does not pull CUDA's

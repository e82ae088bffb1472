"""benchmarks/gpu_check.py in its CPU (quick) mode: every stage runs and reports figures, so the
prepared GPU check cannot rot between the rare runs on a GPU machine."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU machine run the script itself")
def test_gpu_check_cpu_mode(tmp_path):
    out = tmp_path / "out"
    # as on a bare GPU machine: no installed package, the repository on PYTHONPATH only
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--device", "cpu"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["mode"] == "quick" and res["device"] == "cpu"
    st = res["stages"]
    assert list(st) == ["step", "train", "infer", "tests"]
    assert all(s["status"] == "ok" and "error" not in s for s in st.values()), {k: s.get("error") for k, s in st.items()}

    rows = st["step"]["rows"]
    assert [(r["setting"], r["batch"]) for r in rows] == [("fp32-eager", 4), ("default", 4)]
    for r in rows:
        assert all(positive(r[k]) for k in ("samples_per_s", "step_ms", "peak_mem_mb", "warmup_s",
                                             "ratio_to_fp32_b16", "ratio_to_authors_step")), r
        assert r["timed_steps"] == 1
    eager, default = rows
    assert eager["ratio_to_fp32_b16"] == 1.0
    assert (eager["amp"], eager["compile"], eager["channels_last"]) == ("fp32", False, False)
    # the default row went through bf16 autocast, torch.compile, channels_last and the augmentation
    assert (default["amp"], default["compile"], default["channels_last"]) == ("bfloat16", True, True)
    assert default["compile_backend"] == "aot_eager" and default["augmented"] == ["visual"]
    assert default["shapes"] == {"audio": [4, 1, 257, 199], "visual": [4, 2, 64, 64, 3]}
    # under 3,000 samples/s: the profiler table of the step was made
    assert default["profile"]["top"] and (out / "profile.txt").read_text().count("\n") > 5

    train = st["train"]
    assert train["clips"] == 8 and positive(train["cache_s"]) and positive(train["synth_s"])
    assert [e["epoch"] for e in train["epochs"]] == [1, 2]
    assert all(positive(e["samples_per_s"]) and positive(e["time_s"]) for e in train["epochs"])
    assert positive(train["samples_per_s"]) and train["samples_per_s"] == train["steady_epochs"][0]["samples_per_s"]
    assert train["split_sizes"]["train"] % train["settings"]["batch_size"] == 0

    infer = st["infer"]
    assert infer["backend"] == "torch-cpu" and "64 MiB" in infer["onnxruntime_cuda"]
    assert [b["batch"] for b in infer["batches"]] == [1, 4]
    assert all(positive(b["clips_per_s"]) and positive(b["p50_ms"]) for b in infer["batches"])

    tests = st["tests"]
    assert tests["files"] == ["tests/test_trainer.py"] or "tests/test_trainer.py" in tests["files"]
    assert tests["tests"] >= 2 and tests["skipped"] == tests["tests"] and tests["failures"] == tests["errors"] == 0
    assert (out / "cuda_tests.log").is_file()

    table = (out / "summary.txt").read_text()
    for word in ("[step]", "[train]", "[infer]", "[tests]", "fp32-eager", "166", "334"):
        assert word in table
    assert table in proc.stdout

"""The Python API: `dimml.Predictor(...).predict` on real files with a real exported bundle."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, default_fast, write_sample


def test_import_dimml_is_light_and_exports_the_api():
    """`import dimml` loads no numpy / ONNX Runtime / torch; the API comes on first use."""
    code = ("import sys, dimml; heavy = [m for m in ('numpy', 'onnxruntime', 'torch', 'av', 'bentoml', 'httpx') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "import dimml.predict, dimml.prediction, clients.result; "
            "assert dimml.Predictor is dimml.predict.Predictor; "
            "assert dimml.Prediction is dimml.prediction.Prediction is clients.result.Prediction; "
            "assert 'Predictor' in dir(dimml); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import sys, dimml.prediction; print('httpx' in sys.modules, "
                        "'numpy' in sys.modules)"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import dimml
        _ = dimml.nope


@pytest.mark.parametrize("setting", default_fast())
def test_predict_one_list_and_fields(setting, tiny_bundle, tmp_path):
    import dimml

    predictor = dimml.Predictor(tiny_bundle(setting), backend="onnxruntime", device="cpu", decode_threads=2)
    assert predictor.backend == "onnxruntime-cpu"
    samples = [write_sample(tmp_path / str(i), setting, seed=i) for i in range(3)]
    want = [dimml.Prediction.from_dict(predictor.predict_files(s)) for s in samples]

    got = predictor.predict(samples)   # a list of samples -> a list, decoded in the thread pool
    assert isinstance(got, list) and all(isinstance(p, dimml.Prediction) for p in got)
    assert got == want
    assert predictor.predict(**samples[1]) == want[1]    # files by field
    assert predictor.predict(samples[2]) == want[2]      # a mapping
    if list(samples[0]) == ["video"]:                    # one source field: a bare path
        assert predictor.predict(samples[0]["video"]) == want[0]
        assert predictor.predict([s["video"] for s in samples]) == want
    assert predictor.predict([]) == []
    assert got[0].raw == predictor.predict_files(samples[0])   # the same JSON the server answers


def test_predict_argument_errors(tiny_bundle, tmp_path):
    from dimml import Predictor

    predictor = Predictor(tiny_bundle("front:image,rear:image"))
    sample = write_sample(tmp_path, "front:image,rear:image")
    with pytest.raises(TypeError, match="not both"):
        predictor.predict(sample, front=sample["front"])
    with pytest.raises(TypeError, match="no file"):
        predictor.predict()
    with pytest.raises(ValueError, match="2 source fields"):
        predictor.predict(sample["front"])
    with pytest.raises(ValueError, match="unknown field"):
        predictor.predict(side=sample["front"])


def test_backend_order_and_device():
    from dimml.predict import backend_order

    assert backend_order("auto") == (["tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "torch-cuda",
                                      "torch-cpu"], 0)
    assert backend_order("auto", "cpu") == (["onnxruntime-cpu", "torch-cpu"], 0)
    assert backend_order("onnxruntime", "cuda:1") == (["onnxruntime-cuda"], 1)
    assert backend_order(["torch", "onnxruntime-cpu"], 2) == (["torch-cuda", "torch-cpu", "onnxruntime-cpu"], 2)
    for bad in ("gpu", "cuda:x", "cpu:0", -1):
        with pytest.raises(ValueError, match="device"):
            backend_order("auto", bad)
    with pytest.raises(ValueError, match="runs on device"):
        backend_order("onnxruntime-cpu", "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        backend_order("tpu")

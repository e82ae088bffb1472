"""Serving settings that need no server: the declared model, the GPU request, the device index, the precision, the inference threads."""
from __future__ import annotations

import pytest

from serving.settings import Settings


def test_declared_model_tag(tmp_path):
    assert Settings.from_env({}).model_tag == "dimml-model:latest"                      # DIMML_MODEL default
    assert Settings.from_env({"DIMML_MODEL": "mine:v1"}).model_tag == "mine:v1"
    assert Settings.from_env({"DIMML_BUNDLE": "other"}).model_tag == "other"            # a tag overrides
    assert Settings.from_env({"DIMML_BUNDLE": str(tmp_path)}).model_tag == ""           # a folder: nothing to pack


@pytest.mark.parametrize("backend,gpus", [("auto", 0), ("onnxruntime", 0), ("onnxruntime-cpu", 0),
                                          ("tensorrt", 1), ("onnxruntime-cuda,torch-cuda", 1),
                                          ("tensorrt,onnxruntime-cpu", 0)])
def test_gpu_resources_follow_the_backend(backend, gpus):
    assert Settings.from_env({"DIMML_BACKEND": backend}).gpus == gpus
    assert Settings.from_env({"DIMML_BACKEND": backend, "DIMML_GPU": "2"}).gpus == 2


def test_device_id():
    assert Settings.from_env({"DIMML_DEVICE_ID": "3"}).device_id == 3
    with pytest.raises(ValueError, match="DIMML_DEVICE_ID must be >= 0"):
        Settings.from_env({"DIMML_DEVICE_ID": "-1"})
    with pytest.raises(ValueError, match="DIMML_DEVICE_ID=.*expected int"):
        Settings.from_env({"DIMML_DEVICE_ID": "cuda:1"})


def test_precision():
    assert Settings.from_env({}).precision == "auto"
    assert Settings.from_env({"DIMML_PRECISION": "fp32"}).precision == "fp32"
    assert Settings.from_env({"DIMML_PRECISION": "int8"}).precision == "int8"
    with pytest.raises(ValueError, match="DIMML_PRECISION='bf16': not one of auto, fp32, int8"):
        Settings.from_env({"DIMML_PRECISION": "bf16"})


def test_infer_threads():
    assert Settings.from_env({}).infer_threads == 0                                    # ONNX Runtime's default
    assert Settings.from_env({"DIMML_INFER_THREADS": "1"}).infer_threads == 1
    with pytest.raises(ValueError, match="DIMML_INFER_THREADS must be >= 0"):
        Settings.from_env({"DIMML_INFER_THREADS": "-1"})

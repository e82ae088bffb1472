"""Serving settings that need no server: the declared model, the GPU request, the device index, precision, threads."""
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


@pytest.mark.parametrize("backend,workers,gpus", [("onnxruntime-cuda", 3, 3), ("auto", 3, 0), ("tensorrt", 1, 1)])
def test_one_gpu_per_inference_worker(backend, workers, gpus):
    s = Settings.from_env({"DIMML_BACKEND": backend, "DIMML_INFERENCE_WORKERS": str(workers)})
    assert s.inference_workers == workers and s.gpus == gpus


def test_each_inference_worker_takes_its_own_gpu():
    """BentoML gives every worker of a service the same CUDA_VISIBLE_DEVICES (all the service's GPUs):
    its real allocator, asked for 2 GPUs for 2 workers, returns one environment for both. So each worker
    picks its GPU by its worker index (Settings.worker_device), else all would run on the first."""
    from types import SimpleNamespace

    from _bentoml_impl.server.allocator import ResourceAllocator

    allocator = ResourceAllocator()
    allocator.remaining_gpus, allocator._available_gpus = 2, [(1.0, 1.0), (1.0, 1.0)]   # a 2-GPU machine's state
    workers, env = allocator.get_worker_env(SimpleNamespace(name="DIMMLInference"),
                                            services={"DIMMLInference": {"resources": {"gpu": 2}, "workers": 2}})
    assert workers == 2 and env == {"CUDA_VISIBLE_DEVICES": "0,1"}   # shared by both workers
    s = Settings.from_env({"DIMML_INFERENCE_WORKERS": "2"})
    assert [s.worker_device(w, visible_gpus=2) for w in (1, 2)] == [0, 1]
    assert [s.worker_device(w, visible_gpus=4) for w in (1, 2, 3, 4, 5)] == [0, 1, 2, 3, 0]   # round-robin
    assert Settings.from_env({"DIMML_DEVICE_ID": "1"}).worker_device(2, visible_gpus=4) == 2   # offset
    assert Settings.from_env({"DIMML_DEVICE_ID": "1"}).worker_device(1, visible_gpus=1) == 0   # the one visible
    assert Settings.from_env({"DIMML_DEVICE_ID": "1"}).worker_device(2, visible_gpus=0) == 1   # all visible: as set
    with pytest.raises(ValueError, match="DIMML_INFERENCE_WORKERS must be >= 1"):
        Settings.from_env({"DIMML_INFERENCE_WORKERS": "0"})
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

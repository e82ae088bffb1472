"""Serving configuration, read from the environment (documented in serving/README.md)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from dimml.engines import BACKENDS, FAMILIES, PRECISIONS, expand_backends


@dataclass(frozen=True)
class Settings:
    """Everything an operator can tune; each field has an env variable DIMML_<FIELD upper-cased>."""

    bundle: str = ""                  # DIMML_BUNDLE: bundle directory or BentoML model-store tag (overrides DIMML_MODEL)
    model: str = "dimml-model:latest"  # DIMML_MODEL: the model-store tag the service declares (`bentoml build` packs it)
    device_id: int = 0                # DIMML_DEVICE_ID: the GPU the GPU backends use
    gpu: int = -1                     # DIMML_GPU: GPUs the inference service asks BentoML for; -1 = one per
                                      # inference worker when DIMML_BACKEND names GPU backends only, else 0
    inference_workers: int = 1        # DIMML_INFERENCE_WORKERS: model processes (each its own GPU, when GPUs)
    backend: str = "auto"             # DIMML_BACKEND: a backend, a family, or a comma-separated order
    precision: str = "auto"           # DIMML_PRECISION: auto (a quantized bundle's checked int8 graphs on
                                      # onnxruntime-cpu, else fp32) | fp32 | int8
    max_batch_size: int = 32          # DIMML_MAX_BATCH_SIZE: clips per inference batch
    max_latency_ms: int = 10_000      # DIMML_MAX_LATENCY_MS: longest a clip may queue for a batch (then 503)
    max_upload_mb: float = 100.0      # DIMML_MAX_UPLOAD_MB: request body limit (413 beyond it)
    max_batch_videos: int = 64        # DIMML_MAX_BATCH_VIDEOS: videos per /predict_batch request
    max_duration_s: float = 0.0       # DIMML_MAX_DURATION_S: media length limit; 0 = the bundle's own
    decode_threads: int = 4           # DIMML_DECODE_THREADS: concurrent decodes per API worker
    codec_threads: int = 1            # DIMML_CODEC_THREADS: FFmpeg's threads per decode (dimml.media.set_codec_threads);
                                      # 0 = FFmpeg's choice; 1: the decode threads already fill the cores
    infer_threads: int = 0            # DIMML_INFER_THREADS: ONNX Runtime intra-op threads of the inference
                                      # service; 0 = ONNX Runtime's default (one per core)
    api_workers: int = 1              # DIMML_API_WORKERS: processes that accept uploads and decode
    max_concurrency: int = 128        # DIMML_MAX_CONCURRENCY: requests in progress at once (all API workers);
                                      # BentoML refuses more at once (429) instead of queueing them
    retry_after_s: int = 1            # DIMML_RETRY_AFTER_S: the Retry-After of a 503 (model restarting or overloaded)
    malloc_arenas: int = 2            # DIMML_MALLOC_ARENAS: glibc malloc arenas per worker (0: glibc's 8 per core)
    malloc_trim_s: float = 10.0       # DIMML_MALLOC_TRIM_S: seconds between malloc_trim calls (0: never)
    malloc_mmap_threshold: int = 0    # DIMML_MALLOC_MMAP_THRESHOLD: bytes from which malloc maps a block on its
                                      # own; 0: glibc's moving threshold (a fixed one did not flatten the
                                      # 30-minute soak: BENCHMARKS.md)

    @property
    def backend_order(self) -> list[str]:
        """DIMML_BACKEND as dimml.engines.open_engine's `prefer` list."""
        return [b.strip() for b in self.backend.split(",") if b.strip()]

    @property
    def model_tag(self) -> str:
        """The model-store tag the service declares: DIMML_BUNDLE when it is one, else DIMML_MODEL;
        '' when DIMML_BUNDLE is a folder (nothing to pack)."""
        from dimml.bundle import is_model_tag

        if not self.bundle:
            return self.model
        return self.bundle if is_model_tag(self.bundle) else ""

    @property
    def gpus(self) -> int:
        """GPUs to ask for (BentoML `resources`): DIMML_GPU, or one per inference worker when every
        backend of DIMML_BACKEND runs on a GPU (tensorrt, onnxruntime-cuda, torch-cuda)."""
        if self.gpu >= 0:
            return self.gpu
        order = expand_backends(self.backend_order)
        return self.inference_workers if order and not any(b.endswith("-cpu") for b in order) else 0

    def worker_device(self, worker_index: int, visible_gpus: int) -> int:
        """The GPU (an index among the visible ones) inference worker `worker_index` (1-based, BentoML's)
        uses. BentoML gives every worker of a service the same CUDA_VISIBLE_DEVICES (all the GPUs the
        service asked for), so without this every worker would run on the first of them: worker k takes
        the k-th visible GPU after DIMML_DEVICE_ID, round-robin. visible_gpus 0 (CUDA_VISIBLE_DEVICES
        unset: every GPU visible, their number unknown here): DIMML_DEVICE_ID."""
        if visible_gpus <= 0:
            return self.device_id
        return (self.device_id + max(worker_index, 1) - 1) % visible_gpus

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Parse DIMML_* variables; a malformed value is an error naming the variable."""
        values = {}
        for f in fields(cls):
            key = f"DIMML_{f.name.upper()}"
            raw = env.get(key, "").strip()
            if not raw:
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r}: expected {kind.__name__}") from None
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        known = (*FAMILIES, *BACKENDS)
        bad = [b for b in self.backend_order if b not in known] or ([] if self.backend_order else [""])
        if bad:
            raise ValueError(f"DIMML_BACKEND={self.backend!r}: {bad[0]!r} is not one of {', '.join(known)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"DIMML_PRECISION={self.precision!r}: not one of {', '.join(PRECISIONS)}")
        if self.device_id < 0:
            raise ValueError(f"DIMML_DEVICE_ID must be >= 0, got {self.device_id}")
        for name in ("max_batch_size", "max_latency_ms", "max_batch_videos", "decode_threads", "api_workers",
                     "inference_workers", "max_concurrency", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"DIMML_{name.upper()} must be >= 1, got {getattr(self, name)}")
        if self.malloc_arenas < 0 or self.malloc_trim_s < 0 or not 0 <= self.malloc_mmap_threshold <= 32 * 2**20:
            raise ValueError("DIMML_MALLOC_ARENAS and DIMML_MALLOC_TRIM_S must be >= 0, "
                             "DIMML_MALLOC_MMAP_THRESHOLD between 0 and 33554432 (glibc's maximum, 32 MiB)")
        if self.codec_threads < 0:
            raise ValueError(f"DIMML_CODEC_THREADS must be >= 0 (0: FFmpeg's choice), got {self.codec_threads}")
        if self.infer_threads < 0:
            raise ValueError(f"DIMML_INFER_THREADS must be >= 0 (0: ONNX Runtime's default), got {self.infer_threads}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"DIMML_MAX_UPLOAD_MB must be > 0, got {self.max_upload_mb}")
        if self.max_duration_s < 0:
            raise ValueError(f"DIMML_MAX_DURATION_S must be >= 0, got {self.max_duration_s}")

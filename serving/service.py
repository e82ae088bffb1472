"""The BentoML service: `bentoml serve` from the repository root (see serving/README.md).

Two services, so decoding and inference scale apart:
  DIMML           the HTTP entry: guards and decodes uploads (CPU, a thread pool per worker,
                  DIMML_API_WORKERS processes), then asks the inference service for results.
  DIMMLInference  one process holding the model; its `infer` API is batchable, so BentoML's
                  adaptive batching merges decoded clips from all concurrent requests.
Decoding goes through dimml.media.decode_clip only; the response dict comes from
dimml.predict.Predictor, the same code offline evaluation uses.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np

from dimml.config import PreprocessConfig
from dimml.media import Clip, MediaError, MediaInfo, decode_clip
from serving.settings import Settings
from serving.uploads import Rejected, Upload, UploadGuard, collect

logger = logging.getLogger("bentoml.dimml")   # under "bentoml": shown by its log config
SETTINGS = Settings.from_env()

READY_PROBE_TIMEOUT_S = 3.0
# Upload endpoints, their file fields and how many files each takes: the guard's routing table.
UPLOAD_ROUTES = {"/predict": {"video": 1}, "/predict_av": {"video": 1, "audio": 1},
                 "/predict_batch": {"videos": SETTINGS.max_batch_videos}}

INFER_SECONDS = bentoml.metrics.Histogram(
    name="dimml_inference_seconds", documentation="Model time per inference batch, by backend",
    labelnames=["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
DECODE_SECONDS = bentoml.metrics.Histogram(
    name="dimml_decode_seconds", documentation="Time to decode one upload into model inputs",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))


def _refuse(ctx: bentoml.Context, e: Rejected):
    """The 4xx JSON answer; BentoML takes the status from the context when a handler has one."""
    ctx.response.status_code = e.status
    return e.response()


# BentoML 1.4 recycles the entry service's connection to this one every 100 calls by default,
# failing the calls in flight (HTTP 500 under load): keep one long-lived connection instead.
@bentoml.service(workers=1, traffic={"timeout": 120},
                 runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9})
class DIMMLInference:
    """Loads the bundle once, picks the backend, and serves batched inference on decoded clips.

    Its /readyz answers only once __init__ (load, engine choice, warm-up) has finished.
    """

    def __init__(self) -> None:
        from dimml.bundle import load_bundle
        from dimml.engines import open_engine
        from dimml.predict import Predictor

        if not SETTINGS.bundle:
            raise RuntimeError("DIMML_BUNDLE is not set: give a bundle folder or a model-store tag")
        self.bundle = load_bundle(SETTINGS.bundle)
        self.engine = open_engine(self.bundle, prefer=SETTINGS.backend_order)
        self.predictor = Predictor(self.bundle, engine=self.engine, max_batch=SETTINGS.max_batch_size)
        self.backend: str = self.engine.backend
        self._warm_up()
        logger.info("loaded bundle %s:%s from %s on backend %s", self.bundle.name,
                    self.bundle.version, SETTINGS.bundle, self.backend)

    def _warm_up(self) -> None:
        """One full-model call at start-up, so a broken engine fails here and not on a request."""
        cfg = self.bundle.preprocess
        self.predictor.predict_arrays(np.zeros((1, *cfg.spectrogram_shape), np.float32),
                                      np.zeros((1, *cfg.frames_shape), np.uint8))

    # DIMML_MAX_BATCH_SIZE=1 turns adaptive batching off (BentoML refuses max_batch_size 1)
    @bentoml.api(batchable=SETTINGS.max_batch_size > 1, max_batch_size=max(2, SETTINGS.max_batch_size),
                 max_latency_ms=SETTINGS.max_latency_ms)
    def infer(self, clips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decoded clips {"name", "spectrogram": [1,F,T] | None, "frames": [N,H,W,3] | None} -> answers.

        One argument, a list, as BentoML's batching requires: concurrent requests' lists are
        concatenated into one batch. Clips lacking a modality are answered by the other branch.
        """
        batch = [Clip(c["spectrogram"], c["frames"], MediaInfo(c["name"], "", None)) for c in clips]
        t0 = time.perf_counter()
        answers = self.predictor.predict_clips(batch)
        INFER_SECONDS.labels(backend=self.backend).observe(time.perf_counter() - t0)
        return answers

    @bentoml.api
    def metadata(self) -> dict[str, Any]:
        """Model, backend and preprocessing facts (the front service decodes with `preprocess`)."""
        m = self.bundle.manifest
        return {"model": self.bundle.model_info(), "tag": self.bundle.tag, "backend": self.backend,
                "classes": self.bundle.classes, "modalities": list(self.bundle.modalities),
                "fusion": m.get("fusion"), "lw_temperature": self.bundle.temperature,
                "output": self.bundle.output,
                "preprocess": self.bundle.preprocess.to_dict(),
                "batching": {"max_batch_size": SETTINGS.max_batch_size,
                             "max_latency_ms": SETTINGS.max_latency_ms}}


@bentoml.service(workers=SETTINGS.api_workers, traffic={"timeout": 300})
class DIMML:
    """HTTP entry: multipart uploads in, one prediction per clip out."""

    inference = bentoml.depends(DIMMLInference)

    def __init__(self) -> None:
        self._meta: dict[str, Any] | None = None
        self._cfg: PreprocessConfig | None = None
        self._decode_limiter = anyio.CapacityLimiter(SETTINGS.decode_threads)

    async def _metadata(self) -> dict[str, Any]:
        """The inference service's metadata, fetched once (it fixes how uploads are decoded)."""
        if self._meta is None:
            meta = await self.inference.to_async.metadata()
            cfg = PreprocessConfig.from_dict(meta["preprocess"])
            if SETTINGS.max_duration_s:
                cfg = cfg.replace(max_duration_s=SETTINGS.max_duration_s)
            self._meta, self._cfg = meta, cfg
        return self._meta

    async def __is_ready__(self) -> bool:
        """Ready once the inference service has loaded the model and answered (bounded wait:
        a probe must not hang on a dependency that is still starting or keeps failing)."""
        try:
            await asyncio.wait_for(self._metadata(), timeout=READY_PROBE_TIMEOUT_S)
        except Exception as e:
            logger.info("not ready: inference service not answering (%s)", type(e).__name__)
            return False
        return True

    async def _decode(self, video: Upload, audio: Upload | None = None, *, both: bool = False) -> dict[str, Any]:
        """Decode in a worker thread (FFmpeg releases the GIL); media errors become 422."""
        await self._metadata()

        def work() -> dict[str, Any]:
            t0 = time.perf_counter()
            clip = decode_clip(video.path, self._cfg, audio=audio.path if audio else None,
                               modalities=self._meta["modalities"], allow_missing=not both,
                               name=video.name, audio_name=audio.name if audio else None)
            DECODE_SECONDS.observe(time.perf_counter() - t0)
            return {"name": video.name, "spectrogram": clip.spectrogram, "frames": clip.frames}

        try:
            return await anyio.to_thread.run_sync(work, limiter=self._decode_limiter)
        except MediaError as e:
            raise Rejected(422, str(e), e.cause) from None

    async def _infer(self, clips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.inference.to_async.infer(clips)

    @bentoml.api
    async def predict(self, video: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """One video with its audio track (either may be missing: answered from the other)."""
        try:
            [up] = collect(ctx.request.scope, "video", [video])
            return (await self._infer([await self._decode(up)]))[0]
        except Rejected as e:
            return _refuse(ctx, e)

    @bentoml.api
    async def predict_av(self, video: Path, audio: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """A video and a separate audio file; each must hold its modality."""
        try:
            [v] = collect(ctx.request.scope, "video", [video])
            [a] = collect(ctx.request.scope, "audio", [audio])
            return (await self._infer([await self._decode(v, a, both=True)]))[0]
        except Rejected as e:
            return _refuse(ctx, e)

    @bentoml.api
    async def predict_batch(self, videos: list[Path], ctx: bentoml.Context) -> list[dict[str, Any]]:
        """Several videos; one result each, in order. Any bad file fails the request, naming it."""
        try:
            if not videos:   # (too many are refused by the guard while uploading)
                raise Rejected(400, "field 'videos' holds no file", "bad_request")
            ups = collect(ctx.request.scope, "videos", videos)
            # decode side by side; wait for all, then report the first bad file in upload order
            decoded = await asyncio.gather(*(self._decode(u) for u in ups), return_exceptions=True)
            for d in decoded:
                if isinstance(d, BaseException):
                    raise d
            return await self._infer(list(decoded))
        except Rejected as e:
            return _refuse(ctx, e)

    @bentoml.api
    async def metadata(self) -> dict[str, Any]:
        """Model, backend, classes, preprocessing and the service's limits."""
        meta = dict(await self._metadata())
        meta["limits"] = {"max_upload_bytes": SETTINGS.max_upload_bytes,
                          "max_batch_videos": SETTINGS.max_batch_videos,
                          "max_duration_s": self._cfg.max_duration_s if self._cfg else None,
                          "decode_threads": SETTINGS.decode_threads}
        return meta


DIMML.add_asgi_middleware(UploadGuard, routes=UPLOAD_ROUTES, max_bytes=SETTINGS.max_upload_bytes)

"""The BentoML service: `bentoml serve` from the repository root (see serving/README.md).

Two services, so decoding and inference scale apart:
  DIMML           the HTTP entry: guards and decodes uploads (CPU, a thread pool per worker,
                  DIMML_API_WORKERS processes), then asks the inference service for results.
  DIMMLInference  one process holding the model; its `infer` API is batchable, so BentoML's
                  adaptive batching merges decoded samples from all concurrent requests.
Decoding goes through dimml.predict.decode_files (dimml.media.decode_sample) only; the response dict comes from
dimml.predict.Predictor, the same code offline evaluation uses.

The upload fields of `/predict` are the bundle's: one optional file field per source field
(`video` for the video-derived modalities, the modality's name for one with a file of its own)
plus, for each video-derived modality, a field named after it that replaces the video for it.
They are read from the bundle's manifest (DIMML_BUNDLE) when this module is imported, and the
API's signature is built from them, so BentoML's schema (/docs.json) lists exactly those fields.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from pydantic import Field

from dimml.media import Clip, MediaError, MediaInfo, set_codec_threads
from dimml.modalities import VIDEO_FIELD, PreprocessConfig
from dimml.predict import decode_files
from serving import allocator, bentoml_fixes
from serving.openapi import OpenAPIErrors
from serving.schemas import Answer, BatchItem, ItemError
from serving.settings import Settings
from serving.uploads import Rejected, Upload, UploadGuard, collect
from serving.upstream import Upstream, sibling_workers

logger = logging.getLogger("bentoml.dimml")   # under "bentoml": shown by its log config
SETTINGS = Settings.from_env()
bentoml_fixes.apply()   # requests no longer outlive their timeout in memory (serving/bentoml_fixes.py)

READY_PROBE_TIMEOUT_S = 3.0
BATCH_FIELD = "videos"   # /predict_batch's repeated file field (bundles with a video field)


def bundle_preprocess(source: str) -> PreprocessConfig | None:
    """The served bundle's preprocessing, read from its manifest (no checksums: the inference
    service checks the bundle fully when it loads it); None when it cannot be read here."""
    if not source:
        return None
    try:
        from dimml.bundle import load_bundle
        return load_bundle(source, checksums=False).preprocess
    except Exception as e:   # the inference service reports it (and never becomes ready)
        logger.warning("cannot read the bundle's fields from %s (%s); serving the default fields", source, e)
        return None


def upload_fields(cfg: PreprocessConfig) -> dict[str, str]:
    """/predict's file fields -> their description, in order: source fields, then own-file replacements."""
    out: dict[str, str] = {}
    for f in cfg.fields:
        if f == VIDEO_FIELD:
            used = [s.name for s in cfg.modalities if s.kind_obj.from_video]
            out[f] = f"a video file (for {', '.join(used)})"
        else:
            out[f] = f"the {cfg.spec(f).kind} file of modality {f!r}"
    for name in cfg.optional_fields:
        out.setdefault(name, f"a file of its own for modality {name!r} ({cfg.spec(name).kind}); "
                             "replaces the video for it")
    return out


def declared_model(tag: str) -> bentoml.models.BentoModel | None:
    """The model the inference service declares (so `bentoml build` packs it): `tag` when it is in
    the model store; else None (a warning: the Bento would hold no model)."""
    if not tag:
        return None
    ref = bentoml.models.BentoModel(tag)
    if ref.stored is None:
        logger.warning("model %s is not in the BentoML model store: the service declares no model "
                       "(register one: python -m export bundle ... --register %s)", tag, tag.split(":")[0])
        return None
    return ref


MODEL = declared_model(SETTINGS.model_tag)
SOURCE = SETTINGS.bundle or (SETTINGS.model_tag if MODEL is not None else "")   # what the model is read from
CFG = bundle_preprocess(SOURCE) or PreprocessConfig()
FIELDS = upload_fields(CFG)
HAS_VIDEO = VIDEO_FIELD in CFG.fields
# Upload endpoints, their file fields and how many files each takes: the guard's routing table.
UPLOAD_ROUTES: dict[str, dict[str, int]] = {"/predict": {f: 1 for f in FIELDS}}
if HAS_VIDEO:
    UPLOAD_ROUTES["/predict_batch"] = {BATCH_FIELD: SETTINGS.max_batch_videos}


def visible_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES's (BentoML sets it to the service's GPUs), else 0
    when it is unset (the GPU backends then see every GPU and DIMML_DEVICE_ID picks one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return len([d for d in visible.split(",") if d.strip()]) if visible else 0


def with_upload_fields(func):
    """Give `func(self, ctx, **uploads)` the signature `(self, *, <field>: Path | None = None, ...,
    ctx: bentoml.Context)`, so that BentoML's input schema names the bundle's fields."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                                 default=Field(default=None, description=doc)) for f, doc in FIELDS.items()]
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=bentoml.Context))
    func.__signature__ = inspect.Signature(params, return_annotation=Answer)
    func.__annotations__ = {**{f: Path for f in FIELDS}, "ctx": bentoml.Context, "return": Answer}
    return func


INFER_SECONDS = bentoml.metrics.Histogram(
    name="dimml_inference_seconds", documentation="Model time per inference batch, by backend",
    labelnames=["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
DECODE_SECONDS = bentoml.metrics.Histogram(
    name="dimml_decode_seconds", documentation="Time to decode one upload into model inputs",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))


def answer_of(decoded: dict[str, Any], answer: dict[str, Any]) -> Answer:
    """The inference service's answer with the damage decoding found in the uploads (only the API worker saw it)."""
    return Answer.model_validate({**answer, "warnings": decoded["warnings"]})


def _refuse(ctx: bentoml.Context, e: Rejected):
    """The 4xx JSON answer; BentoML takes the status from the context when a handler has one."""
    ctx.response.status_code = e.status
    return e.response()


# BentoML 1.4 recycles the entry service's connection to this one every 100 calls by default,
# failing the calls in flight (HTTP 500 under load): keep one long-lived connection instead.
# GPUs are asked for when the settings want GPU backends only (serving.settings.Settings.gpus: one per
# worker; each worker picks its own, Settings.worker_device).
# Its access log is off: every line would be the entry service's own call (logged there).
@bentoml.service(workers=SETTINGS.inference_workers, traffic={"timeout": 120},
                 logging={"access": {"enabled": False}},
                 runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
                 **({"resources": {"gpu": SETTINGS.gpus}} if SETTINGS.gpus else {}))
class DIMMLInference:
    """Loads the bundle once, picks the backend, and serves batched inference on decoded clips.

    The model is the one it declares (`bundle_model`, DIMML_MODEL or a DIMML_BUNDLE tag: packed
    by `bentoml build`), or the bundle folder DIMML_BUNDLE names.
    Its /readyz answers only once __init__ (load, engine choice, warm-up) has finished.
    """

    if MODEL is not None:
        bundle_model = MODEL

    def __init__(self) -> None:
        from dimml.bundle import load_bundle
        from dimml.engines import open_engine
        from dimml.predict import Predictor

        allocator.configure(SETTINGS.malloc_arenas, SETTINGS.malloc_trim_s,
                            SETTINGS.malloc_mmap_threshold)   # before the engine's threads

        if SETTINGS.bundle:
            source = SETTINGS.bundle
        elif MODEL is not None:
            source = str(self.bundle_model.tag)   # resolved from the model store (the Bento's own, when built)
        else:
            raise RuntimeError(f"no model: DIMML_BUNDLE is not set and {SETTINGS.model} is not in the BentoML "
                               "model store (give a bundle folder or tag, or register one with "
                               "python -m export bundle ... --register NAME)")
        self.bundle = load_bundle(source)
        self.device_id = SETTINGS.worker_device(bentoml.server_context.worker_index or 1, visible_gpus())
        self.engine = open_engine(self.bundle, prefer=SETTINGS.backend_order, device_id=self.device_id,
                                  precision=SETTINGS.precision, threads=SETTINGS.infer_threads or None)
        self.predictor = Predictor(self.bundle, engine=self.engine, max_batch=SETTINGS.max_batch_size)
        self.backend: str = self.engine.backend
        self._warm_up()
        logger.info("loaded bundle %s:%s from %s on backend %s, %s (%s)%s", self.bundle.name, self.bundle.version,
                    source, self.backend, self.engine.precision, self.engine.precision_reason,
                    "" if self.backend.endswith("-cpu") else
                    f" (GPU {self.device_id} of CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})")

    def _warm_up(self) -> None:
        """A full batch (DIMML_MAX_BATCH_SIZE clips) through the whole model at start-up: a broken engine,
        or one that cannot take a full batch, fails here and not on a request, and the backend's memory
        pools grow at once to what the largest batch needs (under load the worker's memory then stays
        level, instead of stepping up the first time adaptive batching fills a batch)."""
        n = SETTINGS.max_batch_size
        self.predictor.predict_arrays({s.name: np.zeros((n, *s.shape), s.dtype)
                                       for s in self.bundle.preprocess.modalities})

    # DIMML_MAX_BATCH_SIZE=1 turns adaptive batching off (BentoML refuses max_batch_size 1)
    @bentoml.api(batchable=SETTINGS.max_batch_size > 1, max_batch_size=max(2, SETTINGS.max_batch_size),
                 max_latency_ms=SETTINGS.max_latency_ms)
    def infer(self, clips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decoded samples {"name", "arrays": {modality: array}} -> answers.

        One argument, a list, as BentoML's batching requires: concurrent requests' lists are
        concatenated into one batch. Samples lacking a modality are answered by the others.
        """
        batch = [Clip(dict(c["arrays"]), {"upload": MediaInfo(c["name"], "", None)}) for c in clips]
        t0 = time.perf_counter()
        answers = self.predictor.predict_clips(batch)
        INFER_SECONDS.labels(backend=self.backend).observe(time.perf_counter() - t0)
        return answers

    @bentoml.api
    def metadata(self) -> dict[str, Any]:
        """Model, backend and preprocessing facts (the front service decodes with `preprocess`)."""
        m = self.bundle.manifest
        cfg = self.bundle.preprocess
        return {"model": self.bundle.model_info(), "tag": self.bundle.tag, "backend": self.backend,
                "precision": self.engine.precision, "precision_reason": self.engine.precision_reason,
                "classes": self.bundle.classes, "modalities": list(self.bundle.modalities),
                "fields": list(cfg.fields), "upload_fields": list(upload_fields(cfg)),
                "schema_version": self.bundle.schema,
                "fusion": m.get("fusion"), "lw_temperature": self.bundle.temperature,
                "final_output": self.bundle.final_output.to_dict(),
                "preprocess": cfg.to_dict(),
                "batching": {"max_batch_size": SETTINGS.max_batch_size,
                             "max_latency_ms": SETTINGS.max_latency_ms}}


# max_concurrency: BentoML refuses requests beyond it at once (429) rather than queueing them without
# bound (each queued request holds its upload); the model's own overload and restarts are 503s (Upstream).
@bentoml.service(workers=SETTINGS.api_workers,
                 traffic={"timeout": 300, "max_concurrency": SETTINGS.max_concurrency})
class DIMML:
    """HTTP entry: multipart uploads in, one prediction per sample out."""

    inference = bentoml.depends(DIMMLInference)

    def __init__(self) -> None:
        allocator.configure(SETTINGS.malloc_arenas, SETTINGS.malloc_trim_s,
                            SETTINGS.malloc_mmap_threshold)   # before the decode threads
        set_codec_threads(SETTINGS.codec_threads)   # the decode threads fill the cores: no FFmpeg threads
        self._meta: dict[str, Any] | None = None
        self._cfg: PreprocessConfig | None = None
        self._decode_limiter = anyio.CapacityLimiter(SETTINGS.decode_threads)
        self.upstream = Upstream(lambda: self.inference.to_async.metadata(), SETTINGS.retry_after_s,
                                 workers=functools.partial(sibling_workers, DIMMLInference.name))

    async def _metadata(self) -> dict[str, Any]:
        """The inference service's metadata, fetched once (it fixes how uploads are decoded)."""
        if self._meta is None:
            meta = await self.upstream.call(self.inference.to_async.metadata)
            cfg = PreprocessConfig.from_dict(meta["preprocess"])
            if cfg.fields != CFG.fields or cfg.names != CFG.names:
                # the API's fields were built at import from DIMML_BUNDLE; the model must match them
                logger.error("the served model reads %s, but this API was built for %s (DIMML_BUNDLE "
                             "unreadable at import?)", cfg.names, CFG.names)
            if SETTINGS.max_duration_s:
                cfg = dataclasses.replace(cfg, max_duration_s=SETTINGS.max_duration_s)
            self._meta, self._cfg = meta, cfg
        return self._meta

    async def __is_ready__(self) -> bool:
        """Ready once the inference service has loaded the model and answered (bounded wait:
        a probe must not hang on a dependency that is still starting or keeps failing), and not
        while it is restarting (Upstream: its calls fail until it is back)."""
        if not self.upstream.up:
            return False
        try:
            await asyncio.wait_for(self._metadata(), timeout=READY_PROBE_TIMEOUT_S)
        except Exception as e:
            logger.info("not ready: inference service not answering (%s)", type(e).__name__)
            return False
        return True

    async def _decode(self, ups: dict[str, Upload]) -> dict[str, Any]:
        """Decode one sample's uploads in a worker thread (FFmpeg releases the GIL); media errors become 422.

        A missing modality is answered by the others, but a file sent in a modality's own field
        must hold that modality (else 422 with the decoder's reason).
        """
        await self._metadata()
        cfg = self._cfg

        def work() -> dict[str, Any]:
            t0 = time.perf_counter()
            clip = decode_files({f: u.path for f, u in ups.items()}, cfg, names={f: u.name for f, u in ups.items()})
            DECODE_SECONDS.observe(time.perf_counter() - t0)
            first = next(iter(ups.values()))
            return {"name": first.name, "arrays": clip.arrays, "warnings": clip.warnings}

        try:
            return await anyio.to_thread.run_sync(work, limiter=self._decode_limiter)
        except MediaError as e:
            raise Rejected(422, str(e), e.cause) from None

    async def _infer(self, clips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model's answers; Rejected(503) with Retry-After when it is restarting or overloaded."""
        return await self.upstream.call(self.inference.to_async.infer, clips)

    @bentoml.api
    @with_upload_fields
    async def predict(self, ctx: bentoml.Context, **uploads: Path | None) -> Answer:
        """One sample: a file per source field of the model (each optional; at least one).

        A modality whose file is missing (or a video without that track) is answered by the others.
        A refused request gets a 4xx JSON body {"error", "cause"} (400, 413, 415, 422).
        """
        try:
            self.upstream.check()
            given = {f: p for f, p in uploads.items() if p is not None}
            if not given:
                raise Rejected(400, f"no file: give at least one of the fields {', '.join(FIELDS)}",
                               "bad_request")
            ups = {f: collect(ctx.request.scope, f, [p])[0] for f, p in given.items()}
            decoded = await self._decode(ups)
            return answer_of(decoded, (await self._infer([decoded]))[0])
        except Rejected as e:
            return _refuse(ctx, e)

    if HAS_VIDEO:
        @bentoml.api
        async def predict_batch(self, videos: list[Path], ctx: bentoml.Context) -> list[BatchItem]:
            """Several videos; one item each, in upload order: an answer, or for a file that cannot
            be decoded its error {"error", "cause", "status"} (the others are still answered).
            A request refused as a whole (no file, too many, too large, not multipart) gets a 4xx."""
            try:
                self.upstream.check()
                if not videos:   # (too many are refused by the guard while uploading)
                    raise Rejected(400, f"field {BATCH_FIELD!r} holds no file", "bad_request")
                ups = collect(ctx.request.scope, BATCH_FIELD, videos)
                decoded = await asyncio.gather(*(self._decode({VIDEO_FIELD: u}) for u in ups),
                                               return_exceptions=True)
            except Rejected as e:
                return _refuse(ctx, e)
            for d in decoded:   # anything but a refused file is a server fault: a 500 as before
                if isinstance(d, BaseException) and not isinstance(d, Rejected):
                    raise d
                if isinstance(d, Rejected) and d.status == 503:   # the model is away: the whole request
                    return _refuse(ctx, d)
            good = [d for d in decoded if not isinstance(d, Rejected)]
            try:
                answers = iter(await self._infer(good) if good else [])
            except Rejected as e:
                return _refuse(ctx, e)
            return [ItemError(error=d.message, cause=d.cause, status=d.status) if isinstance(d, Rejected)
                    else answer_of(d, next(answers)) for d in decoded]

    @bentoml.api
    async def metadata(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Model, backend, classes, modalities, upload fields, preprocessing and the service's limits."""
        try:
            meta = dict(await self._metadata())
        except Rejected as e:
            return _refuse(ctx, e)
        meta["limits"] = {"max_upload_bytes": SETTINGS.max_upload_bytes,
                          "max_batch_videos": SETTINGS.max_batch_videos if HAS_VIDEO else None,
                          "max_duration_s": self._cfg.max_duration_s if self._cfg else None,
                          "decode_threads": SETTINGS.decode_threads, "max_concurrency": SETTINGS.max_concurrency}
        meta["endpoints"] = sorted(UPLOAD_ROUTES)
        return meta


DIMML.add_asgi_middleware(UploadGuard, routes=UPLOAD_ROUTES, max_bytes=SETTINGS.max_upload_bytes)
DIMML.add_asgi_middleware(OpenAPIErrors, routes=list(UPLOAD_ROUTES),
                          answers={"/predict_batch": list[BatchItem]} if HAS_VIDEO else {})

"""Scoring on Ray Data: `dimml score ... --engine ray`, and `ScoreBatch` for your own Ray pipelines.

    dimml score videos/ -r --bundle bundles/a --engine ray --out results.csv       # a local Ray
    RAY_ADDRESS=ray://head:10001 dimml score /shared/videos -r --bundle /shared/bundles/a \\
        --engine ray --gpus-per-actor 1 --out results.csv                          # a cluster

    import ray
    from clients.ray_scoring import ScoreBatch
    ds = ray.data.from_items([{"video": "/shared/a.mp4"}, {"video": "/shared/b.flv"}])
    ds = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"bundle": "/shared/bundles/a"},
                        batch_size=32, compute=ray.data.ActorPoolStrategy(size=4), num_cpus=1)
    ds.write_parquet("/shared/scores")        # columns: path, label, confidence, prob_*, weight_*, ...

How it runs (Ray Data's batch-inference pattern): the driver finds the samples (clients/inputs.py,
as local scoring does) and makes a dataset of their file *paths*; `map_batches` runs `ScoreBatch`
on a fixed pool of actors (`compute=ActorPoolStrategy(size=N)`: the `concurrency=` argument is
deprecated since Ray 2.51), each of which loads the bundle once (a dimml.Predictor through
LocalScorer), reads its files from the paths (shared storage, not the object store), decodes them
in `cpus_per_actor` threads with the engine on as many intra-op threads (so N actors x their CPUs
never oversubscribe the node: Ray sets OMP_NUM_THREADS, but ONNX Runtime does not read it), and
answers the batch with LocalScorer.score_batch, the code local scoring runs. A file that cannot be
decoded is an error row, as locally; only infrastructure faults raise (an actor killed, a node
lost), and Ray restarts the actor and retries its task. The answers stream back to the driver,
which writes every row through run_score's code (clients.output.result_row, ResultWriter or its
shards): the same rows as local scoring, written and flushed as they arrive, so a driver killed
mid-run leaves whole rows and `--resume` scores exactly the rest (a row that comes back twice,
from a retried task, is written once).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.inputs import Job
from clients.output import columns_for, result_row
from clients.result import Prediction, branch_names

NAME_SUFFIX = "_name"       # optional input column <field>_name: how messages name that file
OUTPUTS = ("row", "answer")  # ScoreBatch's output: the `dimml score` row, or the answer as JSON
FLOAT_PREFIXES = ("prob_", "weight_")


# ---------------------------------------------------------------------------------------
# the callable class for map_batches

class ScoreBatch:
    """A Ray Data `map_batches` callable class: a batch of samples' file paths -> their scores.

    Input columns: one per source field of the bundle holding a path (`video`; an own-file
    modality's name such as `audio`, `front`, `rear`; None or "" where a sample has none),
    optionally `path` (the row's name; default: the sample's video, else its first file) and
    `<field>_name` (how error messages name that file; default: its path).
    output="row" (default): the input's other columns plus the `dimml score` row (`path`,
    `label`, `confidence`, `prob_<class>`, `weight_<branch>` as float64 with NaN where empty,
    `modalities_used` '+'-joined, `error`: "" when scored, else "<cause>: <message>").
    output="answer": `path`, `answer` (the full answer as JSON, "" when not scored) and `error`.
    Runs in an actor: the bundle is loaded once per actor. Its GPU when the actor has one (Ray
    sets CUDA_VISIBLE_DEVICES), else the CPU backends; `threads` (decode threads and the engine's
    intra-op threads) default to the CPUs Ray gave the actor.
    """

    def __init__(self, bundle: str, *, backend: str | Sequence[str] = "auto", device: int | str | None = None,
                 batch_size: int = 32, threads: int | None = None, output: str = "row", precision: str = "auto"):
        from clients.score import LocalScorer

        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        share = threads or _actor_cpus()
        if device is None:
            device = 0 if _actor_gpus() else "cpu"
        self.output = output
        self.scorer = LocalScorer(bundle, workers=share, batch_size=batch_size, backend=backend, device_id=device,
                                  threads=share, precision=precision)
        cfg = self.scorer.preprocess
        self.fields = tuple(dict.fromkeys((*cfg.fields, *cfg.optional_fields)))
        self.columns = columns_for(self.scorer.classes, self.scorer.branches)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = batch_jobs(batch, self.fields)
        results = self.scorer.score_batch(jobs)
        if self.output == "answer":
            return {"path": _strings(j.key for j in jobs),
                    "answer": _strings(json.dumps(p.raw) if p is not None else "" for _, p, _ in results),
                    "error": _strings("" if p is not None else e for _, p, e in results)}
        rows = [result_row(j.key, p, e, self.scorer.classes, self.scorer.branches) for j, p, e in results]
        out = {k: np.asarray(v) for k, v in batch.items() if k not in self.columns}
        out.update(row_columns(rows, self.columns))
        return out


def _actor_cpus() -> int:
    """The CPUs Ray reserved for this actor (1 outside Ray or when it reserved less)."""
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:   # not in a Ray worker
        return 1


def _actor_gpus() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids())
    except Exception:
        return []


def _present(value: Any) -> str | None:
    """A cell holding a path, or None (None, NaN, "")."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None
    text = str(value)
    return text or None


def batch_jobs(batch: Mapping[str, np.ndarray], fields: Sequence[str]) -> list[Job]:
    """The samples of a batch: its field columns (paths) -> Jobs, keyed by the `path` column or the key file."""
    have = [f for f in fields if f in batch]
    if not have:
        raise ValueError(f"the batch has none of this model's file columns ({', '.join(fields)}); "
                         f"its columns: {', '.join(batch)}")
    n = len(batch[have[0]])
    jobs = []
    for i in range(n):
        files = {f: p for f in have if (p := _present(batch[f][i])) is not None}
        names = {f: _present(batch[f + NAME_SUFFIX][i]) or files[f] for f in files if f + NAME_SUFFIX in batch}
        key = _present(batch["path"][i]) if "path" in batch else None
        if key is None:
            key = files.get(fields[0]) or next(iter(files.values()), f"row {i}")
        jobs.append(Job(key, files, (), names))
    return jobs


def _strings(values: Iterable[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=object)


def row_columns(rows: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Result rows -> typed columns (Arrow needs one type per column: floats with NaN, strings)."""
    out: dict[str, np.ndarray] = {}
    for c in columns:
        values = [r[c] for r in rows]
        if c == "confidence" or c.startswith(FLOAT_PREFIXES):
            out[c] = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        elif c == "modalities_used":
            out[c] = _strings("+".join(v) for v in values)
        else:
            out[c] = _strings("" if v is None else str(v) for v in values)
    return out


# ---------------------------------------------------------------------------------------
# the engine of `dimml score --engine ray`

@dataclass(frozen=True)
class RayOptions:
    """Where and how `--engine ray` runs (the CLI's --address, --actors, ... flags)."""

    address: str | None = None       # a cluster (ray://host:10001 or host:6379); None: RAY_ADDRESS, else a local Ray
    actors: int = 0                  # actor pool size; 0: the cluster's CPUs (GPUs) / what one actor takes
    cpus_per_actor: float = 1.0      # CPUs each actor reserves: its decode threads and engine threads
    gpus_per_actor: float = 0.0      # GPUs each actor reserves (0: CPU backends only)
    num_cpus: int | None = None      # a local Ray's CPUs (default: all of this machine's)
    object_store_mb: int = 256       # a local Ray's object store (paths and answers are small)


def _ray():
    from dimml.extras import require

    return require("ray", "ray", what="--engine ray")


def connect(opts: RayOptions) -> bool:
    """Join Ray: the running session, the cluster at --address / RAY_ADDRESS, or a new local Ray with a
    small footprint (no dashboard). True when this call started or joined it (and so shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    if address is None:
        kwargs.update(num_cpus=opts.num_cpus or os.cpu_count() or 1,
                      object_store_memory=opts.object_store_mb * 2**20)
    # ray.init installs its own SIGTERM handler (exit at once): keep the caller's (a graceful stop)
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        ray.init(address=address, **kwargs)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False   # the scoring bar reports progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # "progress bars disabled"
    return True


def pool_size(opts: RayOptions, resources: Mapping[str, float]) -> int:
    """Actors to run: --actors, else as many as the cluster's CPUs (and GPUs, when asked) hold."""
    if opts.actors:
        return opts.actors
    fit = [resources.get("CPU", 1) / opts.cpus_per_actor] if opts.cpus_per_actor else []
    if opts.gpus_per_actor:
        fit.append(resources.get("GPU", 0) / opts.gpus_per_actor)
    return max(1, int(min(fit))) if fit else 1


def _bundle_ref(bundle: str | os.PathLike) -> str:
    """The bundle as workers can open it: an absolute folder (their working folder differs), or a tag."""
    path = Path(bundle).expanduser()
    return str(path.resolve()) if path.exists() else str(bundle)


class RayScorer:
    """Scoring on a pool of Ray actors (see the module docstring); the driver writes the rows."""

    def __init__(self, bundle: str | os.PathLike, opts: RayOptions | None = None, *, batch_size: int = 32,
                 backend: str | Sequence[str] = "auto", precision: str = "auto"):
        from dimml.bundle import load_bundle

        opts = opts or RayOptions()
        if opts.cpus_per_actor <= 0 or opts.gpus_per_actor < 0 or opts.actors < 0:
            raise ValueError(f"cpus per actor must be > 0, GPUs per actor and actors >= 0: {opts}")
        self.bundle = _bundle_ref(bundle)
        manifest = load_bundle(self.bundle, checksums=False)   # its classes and fields; each actor checks it fully
        self.classes: list[str] = list(manifest.classes)
        self.preprocess = manifest.preprocess
        self.branches = branch_names(self.preprocess.names)
        self.fields = tuple(dict.fromkeys((*self.preprocess.fields, *self.preprocess.optional_fields)))
        self.opts, self.batch_size, self.backend, self.precision = opts, batch_size, backend, precision
        _ray()   # the extra is installed (else one line saying which), before any work
        self._started = False
        self.actors = 0
        self._model = f"bundle {manifest.name}:{manifest.version}"
        self.description = f"{self._model} on Ray (not started: nothing to score)"

    def _connect(self) -> None:
        """Join or start Ray (once, when there is work) and size the actor pool."""
        if self.actors:
            return
        self._started = connect(self.opts)
        self.actors = pool_size(self.opts, _ray().cluster_resources())

    def _describe(self, actors: int) -> None:
        gpus = f", {self.opts.gpus_per_actor:g} GPU" if self.opts.gpus_per_actor else ""
        self.description = f"{self._model} on Ray ({actors} actor(s) x {self.opts.cpus_per_actor:g} CPU{gpus})"

    def _item(self, job: Job) -> dict[str, Any]:
        item: dict[str, Any] = {"path": job.key}
        for f in self.fields:
            item[f] = job.files.get(f)
            item[f + NAME_SUFFIX] = job.names.get(f)
        return item

    def results(self, jobs: Iterable[Job], stop) -> Iterator[tuple[Job, Prediction | None, str | None]]:
        """As LocalScorer.results: (job, prediction, error) as the actors' batches come back."""
        ray = _ray()
        pending = {j.key: j for j in jobs}
        if not pending:
            return
        self._connect()
        blocks = max(1, min(math.ceil(len(pending) / self.batch_size), 4096))   # a block per batch (when not huge)
        actors = min(self.actors, blocks)   # an actor with no block to take would only load the model
        self._describe(actors)
        ds = ray.data.from_items([self._item(j) for j in pending.values()], override_num_blocks=blocks)
        threads = max(1, int(self.opts.cpus_per_actor))
        ds = ds.map_batches(
            ScoreBatch, batch_size=self.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"bundle": self.bundle, "backend": self.backend, "batch_size": self.batch_size,
                                   "threads": threads, "output": "answer", "precision": self.precision,
                                   "device": 0 if self.opts.gpus_per_actor else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.opts.cpus_per_actor, num_gpus=self.opts.gpus_per_actor or None)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for key, answer, error in zip(batch["path"], batch["answer"], batch["error"]):
                job = pending.pop(str(key), None)
                if job is None:   # a retried task's row that already came back
                    continue
                if answer:
                    yield job, Prediction.from_dict(json.loads(answer)), None
                else:
                    yield job, None, str(error) or "error: no answer and no error from the worker"
            if stop.is_set():
                return

    def close(self) -> None:
        if self._started:
            _ray().shutdown()
            self._started = False


__all__ = ["ScoreBatch", "RayScorer", "RayOptions", "connect", "batch_jobs", "row_columns", "pool_size"]

"""Batch scoring: every sample of some folders or manifests -> one results row each (see clients/cli.py).

What a sample is (a video; a video plus own files; a set of image views) follows the model's
source fields, read from the bundle or the server's /metadata (clients/inputs.py). Two scorers
yield (job, prediction, error) as results arrive:
  LocalScorer   loads the bundle in-process: decode_sample runs in a thread pool (FFmpeg and
                NumPy release the GIL; measured on 2 cores, 192 tiny-preset clips: 2 threads
                ~45 files/s, a 2-process pool ~27 files/s with its start-up and pickling),
                decoded clips are batched into the Predictor.
  RemoteScorer  sends concurrent /predict requests (files by field) to a server (which batches
                on its side).
  RayScorer     (clients/ray_scoring.py) runs LocalScorer's batch code on a pool of Ray actors,
                streaming the results back here.
Every result becomes its row through clients.output.result_row, here, whatever the engine.
`run_score` feeds them the files not yet in the output, writes rows as they come, and stops
cleanly on Ctrl-C / SIGTERM (`graceful_stop`): no new work, finished rows flushed.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.http import Client, ClientError, RequestTimeout, RetryPolicy, ServerError, ServerUnreachable
from clients.inputs import InputError, Job, find_jobs
from clients.output import check_target, open_writer, result_row
from clients.result import Prediction, branch_names

if TYPE_CHECKING:
    from clients.ray_scoring import RayOptions, RayScorer

Result = tuple[Job, "Prediction | None", "str | None"]   # (job, prediction, error message)
POLL_S = 0.1   # how often waits wake up to notice a stop request


class Stop:
    """A stop request (from a signal or the caller): no new work is started once it is set."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    def set(self, signum: int | None = None) -> None:
        if self.signal is None:
            self.signal = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextmanager
def graceful_stop(stop: Stop) -> Iterator[Stop]:
    """SIGINT / SIGTERM set `stop` (a second one aborts at once); handlers restored after.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():   # second signal: the user insists
            raise KeyboardInterrupt
        stop.set(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _pipeline(jobs: Iterable[Job], submit: Callable[[Job], Future], handle: Callable[[Job, Future], Iterator[Result]],
              limit: int, stop: Stop) -> Iterator[Result]:
    """Keep up to `limit` jobs in flight; yield what `handle` makes of each finished one.

    On stop: queued work is cancelled, running work is finished and yielded.
    """
    pending: dict[Future, Job] = {}
    it = iter(jobs)
    exhausted = False
    try:
        while True:
            while not exhausted and not stop.is_set() and len(pending) < limit:
                job = next(it, None)
                if job is None:
                    exhausted = True
                else:
                    pending[submit(job)] = job
            if stop.is_set():
                for f in [f for f in pending if f.cancel()]:
                    del pending[f]
            if not pending:
                return
            done, _ = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for f in done:
                yield from handle(pending.pop(f), f)
    finally:   # closed early (an exception in the consumer): drop queued work
        for f in pending:
            f.cancel()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def decode_error(e: Exception) -> str:
    """The error cell of a sample whose files could not be decoded: the media's cause, else the exception."""
    from dimml.media import MediaError

    if isinstance(e, MediaError):
        return f"{e.cause}: {_one_line(e)}"
    return f"decode: {type(e).__name__}: {_one_line(e)}"   # a decoder bug must not end the run either


class LocalScorer:
    """In-process scoring with a bundle: threaded decoding, batched inference."""

    def __init__(self, bundle: str | os.PathLike, *, workers: int = 0, batch_size: int = 32,
                 backend: str | Sequence[str] = "auto", device_id: int | str = 0, precision: str = "auto",
                 threads: int | None = None):
        """device_id: a GPU index, or "cpu" (CPU backends only); precision: auto | fp32 | int8;
        threads: the engine's intra-op threads (default: the cores the decode threads leave, at least one)."""
        from dimml.predict import Predictor  # heavy (onnxruntime / torch): only when scoring locally

        self.workers = workers or os.cpu_count() or 1
        # the decode threads keep the cores busy: ONNX Runtime gets the cores they leave (at least one);
        # more of its threads only add overhead there (BENCHMARKS.md, fp32 and int8 on the CPU)
        threads = threads or max(1, (os.cpu_count() or 1) - self.workers)
        self.predictor = Predictor(bundle, max_batch=batch_size, prefer=backend, device=device_id, precision=precision,
                                   threads=threads)
        self.classes: list[str] = list(self.predictor.classes)
        self.preprocess = self.predictor.preprocess
        self.branches = branch_names(self.predictor.names)
        self.batch_size = batch_size
        self.description = (f"bundle {self.predictor.bundle.name}:{self.predictor.bundle.version} "
                            f"on {self.predictor.backend} ({self.predictor.engine.precision})")
        self._pool: ThreadPoolExecutor | None = None   # score_batch's decode threads

    def _decode(self, job: Job):
        return self.predictor.decode(job.files, names=job.names)

    def _predict(self, batch: list[tuple[Job, Any]]) -> Iterator[Result]:
        clips = [c for _, c in batch]
        try:
            answers = self.predictor.predict_clips(clips)
        except Exception:
            # find the clip that fails; the others still get their answer
            answers = []
            for clip in clips:
                try:
                    answers.append(self.predictor.predict_clips([clip])[0])
                except Exception as e:
                    answers.append(e)
        for (job, _), a in zip(batch, answers):
            if isinstance(a, Exception):
                yield job, None, f"inference: {_one_line(a)}"
            else:
                yield job, Prediction.from_dict(a), None

    def results(self, jobs: Iterable[Job], stop: Stop) -> Iterator[Result]:
        """(job, prediction, error) for every job, in completion order, until done or stopped."""
        ready: list[tuple[Job, Any]] = []

        def handle(job: Job, f: Future) -> Iterator[Result]:
            try:
                ready.append((job, f.result()))
            except Exception as e:
                yield job, None, decode_error(e)
                return
            if len(ready) >= self.batch_size:
                batch = ready[:]
                ready.clear()
                yield from self._predict(batch)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            # enough in flight to fill a batch while the previous one runs
            yield from _pipeline(jobs, lambda j: pool.submit(self._decode, j), handle,
                                 self.batch_size + 2 * self.workers, stop)
        if ready:
            yield from self._predict(ready)

    def score_batch(self, jobs: Sequence[Job]) -> list[Result]:
        """One result per job, in order: the batch decoded in `workers` threads, then answered together
        (what a Ray worker runs on each batch; see clients/ray_scoring.py)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        futures = [self._pool.submit(self._decode, j) for j in jobs]
        out: dict[str, Result] = {}
        ready: list[tuple[Job, Any]] = []
        for job, f in zip(jobs, futures):
            try:
                ready.append((job, f.result()))
            except Exception as e:
                out[job.key] = (job, None, decode_error(e))
        for result in self._predict(ready) if ready else ():
            out[result[0].key] = result
        return [out[j.key] for j in jobs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class RemoteScorer:
    """Scoring through a server: concurrent /predict requests."""

    def __init__(self, url: str, *, workers: int = 0, timeout: float = 120.0, retries: int = 3,
                 max_wait_s: float = 120.0):
        self.client = Client(url, timeout=timeout, retry=RetryPolicy(retries=retries, max_wait_s=max_wait_s))
        try:
            meta = self.client.metadata()
        except BaseException:
            self.client.close()
            raise
        from dimml.modalities import PreprocessConfig

        self.classes: list[str] = [str(c) for c in meta["classes"]]
        self.preprocess = PreprocessConfig.from_dict(meta["preprocess"])
        self.branches = branch_names(meta["modalities"])
        self.workers = workers or 8
        model = meta.get("model") or {}
        self.description = f"server {url} ({model.get('name', '?')}:{model.get('version', '?')} on {meta.get('backend', '?')})"

    def _predict(self, job: Job) -> Prediction:
        return self.client.predict(job.files, filenames={f: os.path.basename(p) for f, p in job.files.items()})

    def results(self, jobs: Iterable[Job], stop: Stop) -> Iterator[Result]:
        """As LocalScorer.results. A server that is unreachable, or still answers 429 / 503 after every
        retry, stops the run: ServerUnreachable / ServerError is raised once in-flight requests are done."""
        down: list[ClientError] = []

        def handle(job: Job, f: Future) -> Iterator[Result]:
            try:
                yield job, f.result(), None
            except ServerError as e:
                if e.status in self.client.retry.statuses:   # still overloaded after every retry:
                    down.append(e)                           # the server's state, not the file's
                    stop.set()
                    return
                cause = e.body.get("cause") if isinstance(e.body, dict) else None
                yield job, None, f"{cause or f'http_{e.status}'}: {_one_line(e)}"
            except RequestTimeout as e:
                yield job, None, f"timeout: {_one_line(e)}"
            except FileNotFoundError:
                yield job, None, f"missing: {job.key}: no such file"
            except OSError as e:
                yield job, None, f"unreadable: {job.key}: {_one_line(e)}"
            except ServerUnreachable as e:   # not the file's fault: no row, stop the run
                down.append(e)
                stop.set()

        with ThreadPoolExecutor(self.workers, thread_name_prefix="request") as pool:
            yield from _pipeline(jobs, lambda j: pool.submit(self._predict, j), handle, 2 * self.workers, stop)
        if down:
            raise down[0]

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------
# the run

@dataclass
class ScoreOptions:
    """Everything `score` takes (the CLI's flags)."""

    inputs: list[str]
    out: Path
    server: str | None = None
    bundle: str | None = None
    workers: int = 0                 # 0: CPU count (local), 8 (remote)
    recursive: bool = False
    exts: tuple[str, ...] | None = None   # None: videos, or images for a model without a video field
    resume: bool = False
    overwrite: bool = False
    batch_size: int = 32
    backend: str = "auto"
    device_id: int = 0               # local mode: GPU index of the GPU backends
    precision: str = "auto"          # local mode: auto | fp32 | int8 (dimml.engines.choose_precision)
    timeout: float = 120.0
    retries: int = 3
    max_wait_s: float = 120.0        # remote: how long to keep retrying 503s that carry Retry-After
    progress: bool = True
    engine: str = "local"            # with --bundle: "local" (this process) or "ray" (Ray Data)
    shard_rows: int = 0              # > 0: --out is written as shards of this many rows (clients/output.py)
    ray: RayOptions | None = None  # engine "ray": the cluster and the actors (clients/ray_scoring.py)


@dataclass
class Summary:
    """What a run did, and the whole output file's tally (resumed rows included)."""

    found: int = 0                   # samples the inputs hold
    skipped: int = 0                 # already in the output (resume)
    scored: int = 0                  # rows written by this run
    failed_now: int = 0
    ok: int = 0                      # rows of the output without error
    failed: int = 0                  # rows of the output with an error
    elapsed_s: float = 0.0
    interrupted: int | None = None   # the signal that stopped the run
    server_lost: str | None = None   # why the server stopped answering mid-run
    description: str = ""
    classes: list[str] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)             # error cause -> rows
    pairs: list[tuple[str, str]] = field(default_factory=list)   # (true, predicted) for labelled rows
    unknown_truth: Counter = field(default_factory=Counter)      # true labels that are no model class

    @property
    def complete(self) -> bool:
        return self.interrupted is None and self.server_lost is None


ENGINES = ("local", "ray")


def make_scorer(opts: ScoreOptions) -> LocalScorer | RemoteScorer | RayScorer:
    if bool(opts.server) == bool(opts.bundle):
        raise ValueError("give exactly one of --server URL or --bundle BUNDLE")
    if opts.engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {opts.engine!r}")
    if opts.engine == "ray":
        if opts.server:
            raise InputError("--engine ray scores with a bundle on Ray workers: give --bundle, not --server")
        from clients.ray_scoring import RayOptions, RayScorer

        return RayScorer(opts.bundle, opts.ray or RayOptions(), batch_size=opts.batch_size, backend=opts.backend,
                         precision=opts.precision)
    if opts.server:
        return RemoteScorer(opts.server, workers=opts.workers, timeout=opts.timeout, retries=opts.retries,
                            max_wait_s=opts.max_wait_s)
    return LocalScorer(opts.bundle, workers=opts.workers, batch_size=opts.batch_size, backend=opts.backend,
                       device_id=opts.device_id, precision=opts.precision)


def run_score(opts: ScoreOptions, stop: Stop | None = None,
              scorer: LocalScorer | RemoteScorer | RayScorer | None = None) -> Summary:
    """Score every sample of opts.inputs not yet in opts.out, appending rows; returns the tally."""
    from tqdm import tqdm

    stop = stop or Stop()
    for raw in opts.inputs:   # before loading a model
        if not Path(raw).expanduser().exists():
            raise InputError(f"{raw}: no such file or folder")
    check_target(Path(opts.out), resume=opts.resume, overwrite=opts.overwrite, shard_rows=opts.shard_rows)
    own = scorer is None
    scorer = scorer or make_scorer(opts)
    t0 = time.monotonic()
    rows: dict[str, tuple[str, str]] = {}   # path -> (label, error) of every row in the output
    try:
        # what a sample is follows the model's source fields
        jobs = find_jobs(opts.inputs, scorer.preprocess, recursive=opts.recursive, exts=opts.exts)
        summary = Summary(found=len(jobs), description=scorer.description, classes=list(scorer.classes))
        with open_writer(opts.out, scorer.classes, scorer.branches, resume=opts.resume,
                         overwrite=opts.overwrite, shard_rows=opts.shard_rows) as writer:
            rows.update((r["path"], (r.get("label") or "", r.get("error") or "")) for r in writer.existing)
            todo = [j for j in jobs if j.key not in writer.done]
            summary.skipped = len(jobs) - len(todo)
            bar = tqdm(total=len(todo), unit="file", desc="score", file=sys.stderr, disable=not opts.progress,
                       dynamic_ncols=True)
            try:
                for job, pred, err in scorer.results(todo, stop):
                    row = result_row(job.key, pred, err, scorer.classes, scorer.branches)
                    writer.write(row)
                    rows[job.key] = (row["label"] or "", row["error"] or "")
                    summary.scored += 1
                    summary.failed_now += bool(row["error"])
                    bar.update()
                    if summary.failed_now:
                        bar.set_postfix(failed=summary.failed_now, refresh=False)
            except (ServerUnreachable, ServerError) as e:   # raised only when the server is gone
                summary.server_lost = str(e)
            finally:
                bar.close()
    finally:
        if own:
            scorer.close()
    summary.elapsed_s = time.monotonic() - t0
    summary.description = scorer.description   # as it ended (a Ray scorer names its actors once started)
    if stop.is_set() and summary.server_lost is None and summary.skipped + summary.scored < summary.found:
        summary.interrupted = stop.signal or 0   # 0: stopped by the caller, not by a signal
    _tally(summary, rows, {j.key: j.truth for j in jobs if j.truth})
    return summary


def _tally(summary: Summary, rows: dict[str, tuple[str, str]], truth: dict[str, tuple[str, ...]]) -> None:
    """Rows ok/failed by cause; (true, predicted) pairs of labelled rows. A file with several labels
    is right when the prediction is any of them (its pair is then (prediction, prediction))."""
    classes = set(summary.classes)
    for key, (label, error) in rows.items():
        if error:
            summary.failed += 1
            summary.errors[error.split(":", 1)[0]] += 1
            continue
        summary.ok += 1
        labels = truth.get(key, ())
        known = [t for t in labels if t in classes]
        if known:
            summary.pairs.append((label if label in known else known[0], label))
        elif labels:
            summary.unknown_truth[labels[0]] += 1


# ---------------------------------------------------------------------------------------
# reporting

def confusion_matrix(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> list[list[int]]:
    """counts[true][predicted] over the model's classes."""
    index = {c: i for i, c in enumerate(classes)}
    m = [[0] * len(classes) for _ in classes]
    for t, p in pairs:
        if t in index and p in index:
            m[index[t]][index[p]] += 1
    return m


def format_confusion(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> str:
    """A text table: rows are true classes, columns predicted ones."""
    m = confusion_matrix(pairs, classes)
    names = [str(c) for c in classes]
    width = max([len(n) for n in names] + [len(str(x)) for r in m for x in r] + [4])
    head = "true \\ predicted".ljust(max(width, 16))
    lines = [head + " " + " ".join(n.rjust(width) for n in names)]
    for n, r in zip(names, m):
        lines.append(n.ljust(max(width, 16)) + " " + " ".join(str(x).rjust(width) for x in r))
    return "\n".join(lines)


def format_summary(s: Summary, out: Path) -> str:
    """The end-of-run report: counts, failures by cause, accuracy and confusion matrix when labelled."""
    rate = s.scored / s.elapsed_s if s.elapsed_s > 0 else 0.0
    lines = [f"scored {s.scored} file(s) with {s.description} in {s.elapsed_s:.1f} s ({rate:.1f} files/s); "
             f"{s.failed_now} failed" + (f"; {s.skipped} already in {out} (resume)" if s.skipped else "")]
    lines.append(f"{out}: {s.ok + s.failed} rows, {s.ok} succeeded, {s.failed} failed"
                 + (" (" + ", ".join(f"{c}: {n}" for c, n in s.errors.most_common()) + ")" if s.errors else ""))
    if s.server_lost:
        lines.append(f"stopped: {s.server_lost}; rerun with --resume once the server is up")
    elif s.interrupted is not None:
        name = signal.Signals(s.interrupted).name if s.interrupted else "stop request"
        left = s.found - s.skipped - s.scored
        lines.append(f"interrupted ({name}): {left} file(s) not scored; rerun with --resume to finish")
    if s.pairs:
        correct = sum(t == p for t, p in s.pairs)
        lines.append(f"accuracy {correct / len(s.pairs):.4f} ({correct}/{len(s.pairs)} labelled files)")
        lines.append(format_confusion(s.pairs, s.classes))
    if s.unknown_truth:
        lines.append(f"not in accuracy: {sum(s.unknown_truth.values())} file(s) whose label is no class of the "
                     f"model ({', '.join(sorted(s.unknown_truth)[:5])}{', ...' if len(s.unknown_truth) > 5 else ''})")
    return "\n".join(lines)


__all__ = ["ScoreOptions", "Summary", "Stop", "graceful_stop", "run_score", "make_scorer", "LocalScorer",
           "RemoteScorer", "confusion_matrix", "format_confusion", "format_summary"]

"""Preprocessing cache: decode every clip once into a compact on-disk store reused by all epochs and runs.

An entry is a folder of .npy arrays (memory-mapped when read):
    spectrograms.npy  float16 [M, 1, F, T]     frames.npy  uint8 [M, N, H, W, 3]
    labels.npy        int64   [M]  (-1: a sample skipped as undecodable; its rows are zeros)
plus meta.json, written last. Its name hashes the content (sha256) of every media file, the
labels, cfg.fingerprint() and the decoder's own fingerprint, so changed files, a changed
config or changed decoding code all give a new entry (old ones stay until `prune`).

A build writes into `<entry>.tmp-<pid>` and is renamed into place only when complete, so a
half-written entry is never used. An interrupted build leaves its progress (done.npy) behind;
the next build of the same entry adopts it (when its process is gone) and decodes only the rest.
Rows whose content is already decoded in another entry of the same config are copied, not decoded,
so a changed file or a subset of a dataset costs only the new clips.
Arrays come from `dimml.media.decode_clip`: the one preprocessing code path training and serving share.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from dimml.config import PreprocessConfig
from dimml.fileio import atomic_write_json
from dimml.media import MediaError, decode_clip
from training.datasets import DatasetError, Sample, format_list

CACHE_VERSION = 1
CACHE_ENV = "DIMML_CACHE_DIR"
DEFAULT_DIRNAME = ".dimml-cache"
HASH_INDEX = "hash-index.json"
HASH_CHUNK = 1 << 20
CHECKPOINT_S = 10.0     # how often an ongoing build saves its progress (seconds)


def default_cache_dir(data_root: str | os.PathLike) -> Path:
    """$DIMML_CACHE_DIR if set, else `<data root>/.dimml-cache`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(data_root) / DEFAULT_DIRNAME


def decoder_fingerprint() -> str:
    """Hash of the decoding code and PyAV version: a change in how clips decode invalidates caches."""
    import av
    import dimml.media
    h = hashlib.sha256(Path(dimml.media.__file__).read_bytes())
    h.update(av.__version__.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# content hashes, remembered by (path, size, mtime, inode) so unchanged files are hashed once

def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashIndex:
    """Side index path -> (size, mtime_ns, inode, sha256) kept in the cache folder."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / HASH_INDEX
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            pass   # no index yet, or a damaged one: files are simply hashed again

    def digest(self, path: str) -> str:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.entries.get(path)
        if hit is not None and hit[:3] == stamp:
            return hit[3]
        digest = file_digest(path)
        self.entries[path] = stamp + [digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.entries)
            self.dirty = False


def content_key(sample: Sample, index: HashIndex) -> str:
    """What a sample decodes from: its video file's and its audio file's content."""
    audio = index.digest(sample.audio_path) if sample.audio_path else ""
    return hashlib.sha256(f"{index.digest(sample.path)}:{audio}".encode()).hexdigest()


def row_key(content: str, label: int) -> str:
    """What a cache row holds: decoded content plus label."""
    return hashlib.sha256(f"{content}:{label}".encode()).hexdigest()


def _content_keys(samples: Sequence[Sample], index: HashIndex, progress: bool) -> list[str]:
    bar = tqdm(samples, desc="hashing", unit="file", file=sys.stderr,
               disable=not progress or len(samples) < 200)
    return [content_key(s, index) for s in bar]


def entry_name(keys: Iterable[str], cfg: PreprocessConfig) -> str:
    """Cache entry folder name: hash of the sorted row keys, the config and the decoder."""
    blob = json.dumps({"version": CACHE_VERSION, "rows": sorted(set(keys)), "cfg": cfg.fingerprint(),
                       "decoder": decoder_fingerprint()})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------
# a finished entry

@dataclass
class DecodedCache:
    """A complete cache entry: memory-mapped arrays plus which sample path lives in which row."""

    directory: Path
    meta: dict
    row_of: dict[str, int]              # sample path -> row (every path of the current sample set)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike, samples: Sequence[Sample] | None = None,
             keys: Sequence[str] | None = None) -> "DecodedCache":
        """Open a complete entry; map the given samples (by row key) or the recorded paths to rows."""
        directory = Path(directory)
        meta = _read_meta(directory)
        if meta is None:
            raise DatasetError(f"{directory}: not a complete cache entry (no valid meta.json)")
        if samples is None:
            row_of = {os.path.abspath(r["path"]): i for i, r in enumerate(meta["rows"])}
        else:
            row_by_key = {r["key"]: i for i, r in enumerate(meta["rows"])}
            row_of = {os.path.abspath(s.path): row_by_key[k] for s, k in zip(samples, keys)}
        return cls(directory, meta, row_of)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def spectrograms(self) -> np.ndarray:
        """float16 [M, 1, F, T], memory-mapped."""
        return self._array("spectrograms")

    @property
    def frames(self) -> np.ndarray:
        """uint8 [M, N, H, W, 3], memory-mapped."""
        return self._array("frames")

    @property
    def labels(self) -> np.ndarray:
        """int64 [M]; -1 marks the rows of skipped (undecodable) samples."""
        return self._array("labels")

    @property
    def cfg(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["cfg"])

    @property
    def paths(self) -> list[str]:
        """Per row, the first current sample path it holds (the recorded one if none maps to it)."""
        out = [r["path"] for r in self.meta["rows"]]
        seen: set[int] = set()
        for p, i in self.row_of.items():
            if i not in seen:
                out[i] = p
                seen.add(i)
        return out

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, error) of the current samples left out as undecodable (rows with label -1)."""
        error = {e["row"]: e["error"] for e in self.meta["skipped"]}
        return [(p, error[i]) for p, i in self.row_of.items() if i in error]

    def __len__(self) -> int:
        return len(self.meta["rows"])

    def index_of(self, path: str) -> int:
        """Row of a sample path."""
        try:
            return self.row_of[os.path.abspath(path)]
        except KeyError:
            raise KeyError(f"{path} is not in the cache {self.directory}") from None

    def subset(self, paths: Iterable[str]) -> np.ndarray:
        """Rows of the given sample paths, leaving out samples skipped as undecodable (label -1)."""
        rows = np.asarray([self.index_of(p) for p in paths], dtype=np.int64)
        return rows[self.labels[rows] >= 0] if rows.size else rows

    def __getstate__(self) -> dict:
        # pickled into DataLoader workers: send the folder name, not gigabytes of mapped arrays
        return {**self.__dict__, "_arrays": {}}


def _read_meta(directory: Path) -> dict | None:
    """The entry's meta if it is complete and its arrays match it, else None."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != directory.name:
            return None
        m = len(meta["rows"])
        want = {"spectrograms": (m, *meta["spectrogram_shape"]), "frames": (m, *meta["frames_shape"]),
                "labels": (m,)}
        for name, shape in want.items():
            arr = np.load(directory / f"{name}.npy", mmap_mode="r")   # checks header and file size
            if arr.shape != shape:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


# ---------------------------------------------------------------------------------------
# building

@dataclass
class _Row:
    """One row to fill: its keys and the sample it is decoded from."""

    key: str
    content: str
    sample: Sample


def _decode_one(job: tuple[int, str, str | None, dict]) -> tuple[int, np.ndarray | None, np.ndarray | None, str | None]:
    """Worker: (row, path, audio_path, cfg dict) -> (row, spectrogram float16, frames, error)."""
    row, path, audio_path, cfg_dict = job
    try:
        clip = decode_clip(path, PreprocessConfig.from_dict(cfg_dict), audio=audio_path)
    except MediaError as e:
        return row, None, None, f"{e.cause}: {e.detail}"
    return row, clip.spectrogram.astype(np.float16), clip.frames, None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False   # an earlier, failed build of this very process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_pid(tmp: Path) -> int:
    try:
        return int(tmp.name.rsplit("-", 1)[1])
    except ValueError:
        return -1


def _adopt_leftover(cache_dir: Path, name: str, mine: Path) -> bool:
    """Take over an interrupted build of this entry (its process gone); remove other dead ones."""
    adopted = False
    for tmp in sorted(cache_dir.glob(f"{name}.tmp-*")):
        pid = _tmp_pid(tmp)
        if pid > 0 and _pid_alive(pid):
            continue   # another process is building this entry right now: leave it alone
        if not adopted and (tmp / "done.npy").is_file():
            try:
                os.rename(tmp, mine)
                adopted = True
                continue
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return adopted


def _check_space(cache_dir: Path, nbytes: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if free < nbytes * 1.02:
        raise OSError(f"not enough disk space for the preprocessing cache in {cache_dir}: needs "
                      f"{nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free (set {CACHE_ENV} or --cache-dir "
                      f"to a bigger disk)")


class _Builder:
    """Fills one entry's temp folder, saving progress so an interrupted build can resume."""

    def __init__(self, tmp: Path, rows: list[_Row], cfg: PreprocessConfig, resume: bool):
        self.tmp, self.rows, self.cfg = tmp, rows, cfg
        m = len(rows)
        shapes = {"spectrograms": ((m, *cfg.spectrogram_shape), np.float16),
                  "frames": ((m, *cfg.frames_shape), np.uint8), "labels": ((m,), np.int64)}
        self.arrays: dict[str, np.ndarray] = {}
        self.done = np.zeros(m, dtype=bool)
        if resume:
            try:
                done = np.load(tmp / "done.npy")
                if done.shape != (m,):
                    raise ValueError("progress of another size")
                for name, (shape, dtype) in shapes.items():
                    self.arrays[name] = np.load(tmp / f"{name}.npy", mmap_mode="r+")
                    if self.arrays[name].shape != shape or self.arrays[name].dtype != dtype:
                        raise ValueError("arrays of another shape")
                self.done = done.astype(bool)
            except (OSError, ValueError):
                self.arrays.clear()   # unusable leftovers: start over
        if not self.arrays:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, (shape, dtype) in shapes.items():
                self.arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+",
                                                              dtype=dtype, shape=shape)
        self.errors: dict[int, str] = {}
        self.last_save = time.monotonic()

    def put(self, row: int, spec: np.ndarray | None, frames: np.ndarray | None, error: str | None) -> None:
        if error is not None:
            self.errors[row] = error
            return
        self.arrays["spectrograms"][row] = spec
        self.arrays["frames"][row] = frames
        self.arrays["labels"][row] = self.rows[row].sample.label
        self.done[row] = True
        if time.monotonic() - self.last_save > CHECKPOINT_S:
            self.save_progress()

    def reuse(self, cache_dir: Path) -> int:
        """Copy rows of the same content from other complete entries of this config; returns how many."""
        want = {r.content: i for i, r in enumerate(self.rows) if not self.done[i]}
        copied = 0
        for entry in sorted(cache_dir.iterdir()):
            if not want or not entry.is_dir() or ".tmp-" in entry.name or entry == self.tmp:
                continue
            meta = _read_meta(entry)
            if (meta is None or meta["cfg_fingerprint"] != self.cfg.fingerprint()
                    or meta["decoder"] != decoder_fingerprint()):
                continue
            other = DecodedCache(entry, meta, {})
            for j, r in enumerate(meta["rows"]):
                i = want.get(r["content"])
                if i is None or other.labels[j] < 0:
                    continue
                self.put(i, other.spectrograms[j], other.frames[j], None)
                del want[r["content"]]
                copied += 1
        return copied

    def save_progress(self) -> None:
        """Flush the arrays, then record which rows they hold (in that order: done.npy never lies)."""
        for a in self.arrays.values():
            a.flush()
        tmp_done = self.tmp / "done.tmp.npy"
        np.save(tmp_done, self.done)
        os.replace(tmp_done, self.tmp / "done.npy")
        self.last_save = time.monotonic()

    def finish(self, key: str) -> None:
        """Mark skipped rows (label -1), flush, and write meta.json last."""
        for row in self.errors:
            self.arrays["labels"][row] = -1
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        (self.tmp / "done.npy").unlink(missing_ok=True)
        meta = {"version": CACHE_VERSION, "key": key, "cfg": self.cfg.to_dict(),
                "cfg_fingerprint": self.cfg.fingerprint(), "decoder": decoder_fingerprint(),
                "spectrogram_shape": list(self.cfg.spectrogram_shape),
                "frames_shape": list(self.cfg.frames_shape), "created": time.time(),
                "rows": [{"key": r.key, "content": r.content, "path": r.sample.path,
                          "audio_path": r.sample.audio_path, "label": r.sample.label} for r in self.rows],
                "skipped": [{"row": i, "path": self.rows[i].sample.path, "error": e}
                            for i, e in sorted(self.errors.items())]}
        atomic_write_json(self.tmp / "meta.json", meta)


def _decode_rows(builder: _Builder, todo: list[int], workers: int, progress: bool) -> None:
    """Decode the given rows into the builder, in this process or a pool of `workers`."""
    cfg = builder.cfg.to_dict()
    jobs = [(i, builder.rows[i].sample.path, builder.rows[i].sample.audio_path, cfg) for i in todo]
    bar = tqdm(total=len(jobs), desc="decoding", unit="clip", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                builder.put(*_decode_one(job))
                bar.update()
        else:
            # spawn, not fork: the caller may hold torch / decoder threads that fork would copy mid-state
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_decode_one, job) for job in jobs]
                try:
                    for fut in as_completed(futures):
                        builder.put(*fut.result())
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
        builder.save_progress()   # also when interrupted: the next build resumes from here


def _build(final: Path, rows: list[_Row], cfg: PreprocessConfig, workers: int, progress: bool) -> None:
    """Build an entry in a temp folder and rename it into place once complete."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    resume = _adopt_leftover(final.parent, final.name, tmp)
    if not resume:
        per_row = int(np.prod(cfg.spectrogram_shape)) * 2 + int(np.prod(cfg.frames_shape)) + 8
        _check_space(final.parent, per_row * len(rows))
    builder = _Builder(tmp, rows, cfg, resume)
    builder.reuse(final.parent)
    todo = [i for i in range(len(rows)) if not builder.done[i]]
    _decode_rows(builder, todo, workers, progress)
    builder.finish(final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        # another process finished the same entry first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_meta(final) is None:
            raise


def build_cache(samples: Sequence[Sample], cfg: PreprocessConfig, cache_dir: str | os.PathLike, *,
                workers: int = 2, skip_bad: bool = False, progress: bool = True) -> DecodedCache:
    """Decode every sample once into a cache entry (or reuse the complete one); returns it opened.

    Undecodable samples raise DatasetError naming them, or with skip_bad are left out with a
    warning (their rows hold label -1 and `subset` leaves them out). workers <= 1 decodes in
    this process; rows already decoded in another entry of the same config are copied, not decoded.
    """
    if not samples:
        raise ValueError("build_cache needs at least one sample")
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the cache folder {cache_dir} ({e.strerror}); set {CACHE_ENV} "
                      f"or --cache-dir to a writable place") from None
    index = HashIndex(cache_dir)
    contents = _content_keys(samples, index, progress)
    index.save()
    keys = [row_key(c, s.label) for c, s in zip(contents, samples)]
    final = cache_dir / entry_name(keys, cfg)

    if final.exists() and _read_meta(final) is None:
        shutil.rmtree(final)   # never use a folder without a complete meta.json: rebuild it
    if not final.exists():
        rows = {k: _Row(k, c, s) for k, c, s in zip(keys, contents, samples)}   # one row per distinct key
        _build(final, [rows[k] for k in sorted(rows)], cfg, workers, progress)
    cache = DecodedCache.open(final, samples, keys)
    if cache.skipped:
        bad = [f"{p} ({err})" for p, err in cache.skipped]
        msg = f"{len(bad)} of {len(samples)} samples cannot be decoded"
        if not skip_bad:
            raise DatasetError(f"{msg}:\n{format_list(bad)}\n(pass skip_bad / --skip-bad to train without them)")
        warnings.warn(f"{msg}; training without them (skip_bad):\n{format_list(bad)}", stacklevel=2)
    return cache


def prune(cache_dir: str | os.PathLike, keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Delete entries (and dead builds' leftovers) in cache_dir except those in `keep`; returns them."""
    cache_dir = Path(cache_dir)
    keep_names = {Path(k).name for k in keep}
    removed = []
    for p in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if not p.is_dir() or p.name in keep_names:
            continue
        if ".tmp-" in p.name and _tmp_pid(p) > 0 and _pid_alive(_tmp_pid(p)):
            continue   # a build in progress
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------
# torch view (torch imported on use, so the cache itself works without it)

class CachedAVDataset:
    """Map-style dataset over cache rows: (spectrogram float32 [1,F,T], frames uint8 [N,H,W,3], label)."""

    def __init__(self, cache: DecodedCache, indices: Sequence[int] | np.ndarray | None = None):
        self.cache = cache
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch
        row = int(self.indices[i])
        spec = torch.from_numpy(self.cache.spectrograms[row].astype(np.float32))
        frames = torch.from_numpy(np.array(self.cache.frames[row]))
        return spec, frames, int(self.cache.labels[row])


__all__ = ["build_cache", "DecodedCache", "CachedAVDataset", "prune", "default_cache_dir",
           "file_digest", "HashIndex", "content_key", "row_key", "entry_name", "decoder_fingerprint",
           "CACHE_ENV"]

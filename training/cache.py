"""Preprocessing cache: decode every sample once into a compact on-disk store reused by all epochs and runs.

An entry is a folder of .npy arrays (memory-mapped when read), one per modality of the config:
    <name>.npy    [M, *spec.shape] of the kind's cache_dtype (audio float16, the others uint8)
    _labels.npy   int64 [M]  (-1: a sample skipped as undecodable; its rows are zeros)
plus meta.json, written last (internal files start with "_": modality names start with a letter).
Its name hashes the content (sha256) of every source file of every sample (all its fields; a
folder source by the files its kind reads), the labels, cfg.fingerprint() and the decoder's own
fingerprint, so changed files, a changed config or changed decoding code all give a new entry
(old ones stay until `prune`). CACHE_VERSION 2 (one array per modality); entries of version 1
(spectrograms.npy + frames.npy) are never read: they are rebuilt, then pruned like any other.

A build writes into `<entry>.tmp-<host>-<pid>` and is renamed into place only when complete, so a
half-written entry is never used. An interrupted build leaves its progress (_done.npy) behind;
the next build of the same entry on the same machine adopts it (when its process is gone) and
decodes only the rest. Another machine's temp folders (a cache folder shared by several nodes)
are never adopted nor removed: nodes building one entry at once each decode it, and the first to
finish is used (`dimml cache` once before a multi-node run avoids the repeated work).
Rows whose content is already decoded in another entry of the same config are copied, not decoded,
so a changed file or a subset of a dataset costs only the new samples.
Arrays come from `dimml.media.decode_sample`: the one preprocessing code path training and serving share.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dimml.datasets import DatasetError, Sample, format_list
from dimml.fileio import atomic_write_json
from dimml.media import MediaError, decode_sample
from dimml.modalities import PreprocessConfig

CACHE_VERSION = 2       # 1: spectrograms.npy + frames.npy; 2: one <name>.npy per modality
LABELS = "_labels"      # array file names of the entry's own (a modality name cannot start with "_")
DONE = "_done"
DAMAGE = "_damage"      # an interrupted build's damage warnings so far (row -> warnings)
CACHE_ENV = "DIMML_CACHE_DIR"
DEFAULT_DIRNAME = ".dimml-cache"
HASH_INDEX = "hash-index.json"
HASH_CHUNK = 1 << 20
CHECKPOINT_S = 10.0     # how often an ongoing build saves its progress (seconds)


def default_cache_dir(data_root: str | os.PathLike) -> Path:
    """$DIMML_CACHE_DIR if set, else `<data root>/.dimml-cache`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(data_root) / DEFAULT_DIRNAME


def decoder_fingerprint(cfg: PreprocessConfig) -> str:
    """Hash of the decoding code (dimml.media and cfg's kinds) and library versions (PyAV, OpenCV):
    a change in how samples decode invalidates caches."""
    import inspect

    import av

    import dimml.media
    sources = [dimml.media.__file__] + sorted({inspect.getsourcefile(type(s.kind_obj)) for s in cfg.modalities})
    h = hashlib.sha256()
    for path in sources:
        h.update(Path(path).read_bytes())
    h.update(av.__version__.encode())
    try:
        import cv2
        h.update(cv2.__version__.encode())
    except ImportError:
        pass   # OpenCV absent: no kind that needs it can decode, so nothing cached depends on it
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


def source_digest(path: str, cfg: PreprocessConfig, fld: str, index: HashIndex) -> str:
    """Content hash of one source: a file's sha256, or for a folder the files its kind reads (with
    their names relative to it); "missing" when it is absent (decoding then reports it)."""
    if not os.path.exists(path):
        return "missing"
    if not os.path.isdir(path):
        return index.digest(path)
    kinds = {s.kind_obj for s in cfg.modalities if fld in (s.field, s.name)} or {cfg.modalities[0].kind_obj}
    files = sorted({f for k in kinds for f in k.source_files(path)})
    listing = "\n".join(f"{os.path.relpath(f, path)}:{index.digest(f)}" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def content_key(sample: Sample, cfg: PreprocessConfig, index: HashIndex) -> str:
    """What a sample decodes from: the content of every one of its source files, by field."""
    parts = [f"{fld}={source_digest(path, cfg, fld, index)}" for fld, path in sorted(sample.files.items())]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


def row_key(content: str, label: int) -> str:
    """What a cache row holds: decoded content plus label."""
    return hashlib.sha256(f"{content}:{label}".encode()).hexdigest()


def _content_keys(samples: Sequence[Sample], cfg: PreprocessConfig, index: HashIndex, progress: bool) -> list[str]:
    bar = tqdm(samples, desc="hashing", unit="sample", file=sys.stderr,
               disable=not progress or len(samples) < 200)
    return [content_key(s, cfg, index) for s in bar]


def entry_name(keys: Iterable[str], cfg: PreprocessConfig) -> str:
    """Cache entry folder name: hash of the sorted row keys, the config and the decoder."""
    blob = json.dumps({"version": CACHE_VERSION, "rows": sorted(set(keys)), "cfg": cfg.fingerprint(),
                       "decoder": decoder_fingerprint(cfg)})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def array_specs(cfg: PreprocessConfig, m: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """File name -> (shape, dtype) of every array of an entry of m rows."""
    out = {s.name: ((m, *s.shape), np.dtype(s.kind_obj.cache_dtype)) for s in cfg.modalities}
    out[LABELS] = ((m,), np.dtype(np.int64))
    return out


# ---------------------------------------------------------------------------------------
# a finished entry

@dataclass
class DecodedCache:
    """A complete cache entry: memory-mapped arrays plus which sample (by key) lives in which row."""

    directory: Path
    meta: dict
    row_of: dict[str, int]              # sample key -> row (every key of the current sample set)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike, samples: Sequence[Sample] | None = None,
             keys: Sequence[str] | None = None) -> DecodedCache:
        """Open a complete entry; map the given samples (by row key) or the recorded sample keys to rows."""
        directory = Path(directory)
        meta = _read_meta(directory)
        if meta is None:
            raise DatasetError(f"{directory}: not a complete cache entry (no valid meta.json)")
        if samples is None:
            row_of = {r["sample"]: i for i, r in enumerate(meta["rows"])}
        else:
            row_by_key = {r["key"]: i for i, r in enumerate(meta["rows"])}
            row_of = {s.key: row_by_key[k] for s, k in zip(samples, keys)}
        return cls(directory, meta, row_of)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def array(self, name: str) -> np.ndarray:
        """One modality's rows [M, *spec.shape] in the kind's cache dtype, memory-mapped."""
        if name not in self.names:
            raise KeyError(f"no modality {name!r} in the cache {self.directory} (it has {', '.join(self.names)})")
        return self._array(name)

    @property
    def names(self) -> tuple[str, ...]:
        """The modalities cached, in the config's order."""
        return tuple(self.meta["arrays"])

    @property
    def labels(self) -> np.ndarray:
        """int64 [M]; -1 marks the rows of skipped (undecodable) samples."""
        return self._array(LABELS)

    @property
    def cfg(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["cfg"])

    @property
    def keys(self) -> list[str]:
        """Per row, the first current sample key it holds (the recorded one if none maps to it)."""
        out = [r["sample"] for r in self.meta["rows"]]
        seen: set[int] = set()
        for k, i in self.row_of.items():
            if i not in seen:
                out[i] = k
                seen.add(i)
        return out

    @property
    def damaged(self) -> list[tuple[str, list[str]]]:
        """(sample key, damage warnings) of the current samples whose files decoded with damage
        (dimml.media: frames the decoder flagged, streams far shorter than declared)."""
        damage = {d["row"]: d["warnings"] for d in self.meta.get("damaged", [])}
        return [(k, damage[i]) for k, i in self.row_of.items() if i in damage]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(sample key, error) of the current samples left out as undecodable (rows with label -1)."""
        error = {e["row"]: e["error"] for e in self.meta["skipped"]}
        return [(k, error[i]) for k, i in self.row_of.items() if i in error]

    def __len__(self) -> int:
        return len(self.meta["rows"])

    def index_of(self, key: str) -> int:
        """Row of a sample key (Sample.key)."""
        try:
            return self.row_of[key]
        except KeyError:
            raise KeyError(f"{key} is not in the cache {self.directory}") from None

    def subset(self, keys: Iterable[str]) -> np.ndarray:
        """Rows of the given sample keys, leaving out samples skipped as undecodable (label -1)."""
        rows = np.asarray([self.index_of(k) for k in keys], dtype=np.int64)
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
        want = {name: ((m, *a["shape"]), np.dtype(a["dtype"])) for name, a in meta["arrays"].items()}
        want[LABELS] = ((m,), np.dtype(np.int64))
        for name, (shape, dtype) in want.items():
            arr = np.load(directory / f"{name}.npy", mmap_mode="r")   # checks header and file size
            if arr.shape != shape or arr.dtype != dtype:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


Decoded = tuple[int, "dict[str, np.ndarray] | None", "str | None", list[str]]   # row, arrays, error, damage


def _decode_one(job: tuple[int, dict[str, str], dict]) -> Decoded:
    """Worker: (row, files, cfg dict) -> (row, arrays in the cache dtypes, error, damage warnings)."""
    row, files, cfg_dict = job
    cfg = PreprocessConfig.from_dict(cfg_dict)
    try:
        clip = decode_sample(files, cfg)
    except MediaError as e:
        return row, None, f"{e.cause}: {e.detail}", []
    arrays = {s.name: clip.arrays[s.name].astype(s.kind_obj.cache_dtype, copy=False) for s in cfg.modalities}
    return row, arrays, None, clip.warnings


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


def _host() -> str:
    """This machine's name as a temp folder carries it (a cache folder may be shared by several nodes)."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def _tmp_folder(final: Path) -> Path:
    """Where this process builds `final`: `<entry>.tmp-<host>-<pid>`."""
    return final.with_name(f"{final.name}.tmp-{_host()}-{os.getpid()}")


def _tmp_pid(tmp: Path) -> int:
    """The pid of the build a temp folder belongs to; -1 if unreadable."""
    try:
        return int(tmp.name.rsplit("-", 1)[1])
    except ValueError:
        return -1


def _build_alive(tmp: Path) -> bool:
    """Whether a temp folder may belong to a running build: its process lives, or it is another
    machine's (on a shared cache folder: its pid says nothing here, so it is left alone).
    Folders named `<entry>.tmp-<pid>` (before the host was recorded) count as this machine's."""
    host, sep, _ = tmp.name.split(".tmp-", 1)[1].rpartition("-")
    if sep and host != _host():
        return True
    pid = _tmp_pid(tmp)
    return pid > 0 and _pid_alive(pid)


def _adopt_leftover(cache_dir: Path, name: str, mine: Path) -> bool:
    """Take over an interrupted build of this entry (its process gone); remove other dead ones."""
    adopted = False
    for tmp in sorted(cache_dir.glob(f"{name}.tmp-*")):
        if _build_alive(tmp):
            continue   # another process (or machine) may be building this entry right now: leave it alone
        if not adopted and (tmp / f"{DONE}.npy").is_file():
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
        specs = array_specs(cfg, m)
        self.arrays: dict[str, np.ndarray] = {}
        self.done = np.zeros(m, dtype=bool)
        if resume:
            try:
                done = np.load(tmp / f"{DONE}.npy")
                if done.shape != (m,):
                    raise ValueError("progress of another size")
                for name, (shape, dtype) in specs.items():
                    self.arrays[name] = np.load(tmp / f"{name}.npy", mmap_mode="r+")
                    if self.arrays[name].shape != shape or self.arrays[name].dtype != dtype:
                        raise ValueError("arrays of another shape")
                self.done = done.astype(bool)
            except (OSError, ValueError):
                self.arrays.clear()   # unusable leftovers: start over
        if not self.arrays:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, (shape, dtype) in specs.items():
                self.arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+",
                                                              dtype=dtype, shape=shape)
        self.errors: dict[int, str] = {}
        self.damage: dict[int, list[str]] = {}
        if resume and (tmp / f"{DAMAGE}.json").is_file():
            self.damage = {int(k): v for k, v in json.loads((tmp / f"{DAMAGE}.json").read_text()).items()}
        self.last_save = time.monotonic()

    def put(self, row: int, arrays: dict[str, np.ndarray] | None, error: str | None, damage: list[str] = ()) -> None:
        if error is not None:
            self.errors[row] = error
            return
        if damage:
            self.damage[row] = list(damage)
        for name in self.cfg.names:
            self.arrays[name][row] = arrays[name]
        self.arrays[LABELS][row] = self.rows[row].sample.label
        self.done[row] = True
        if time.monotonic() - self.last_save > CHECKPOINT_S:
            self.save_progress()

    def reuse(self, cache_dir: Path) -> int:
        """Copy rows of the same content from other complete entries of this config; returns how many."""
        want = {r.content: i for i, r in enumerate(self.rows) if not self.done[i]}
        decoder = decoder_fingerprint(self.cfg)
        copied = 0
        for entry in sorted(cache_dir.iterdir()):
            if not want or not entry.is_dir() or ".tmp-" in entry.name or entry == self.tmp:
                continue
            meta = _read_meta(entry)
            if meta is None or meta["cfg_fingerprint"] != self.cfg.fingerprint() or meta["decoder"] != decoder:
                continue
            other = DecodedCache(entry, meta, {})
            damage = {d["row"]: d["warnings"] for d in meta.get("damaged", [])}
            for j, r in enumerate(meta["rows"]):
                i = want.get(r["content"])
                if i is None or other.labels[j] < 0:
                    continue
                self.put(i, {name: other.array(name)[j] for name in self.cfg.names}, None, damage.get(j, []))
                del want[r["content"]]
                copied += 1
        return copied

    def save_progress(self) -> None:
        """Flush the arrays, then record which rows they hold (in that order: _done.npy never lies)."""
        for a in self.arrays.values():
            a.flush()
        tmp_done = self.tmp / f"{DONE}.tmp.npy"
        atomic_write_json(self.tmp / f"{DAMAGE}.json", self.damage)   # before _done: a done row's damage is kept
        np.save(tmp_done, self.done)
        os.replace(tmp_done, self.tmp / f"{DONE}.npy")
        self.last_save = time.monotonic()

    def finish(self, key: str) -> None:
        """Mark skipped rows (label -1), flush, and write meta.json last."""
        for row in self.errors:
            self.arrays[LABELS][row] = -1
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        (self.tmp / f"{DONE}.npy").unlink(missing_ok=True)
        (self.tmp / f"{DAMAGE}.json").unlink(missing_ok=True)
        meta = {"version": CACHE_VERSION, "key": key, "cfg": self.cfg.to_dict(),
                "cfg_fingerprint": self.cfg.fingerprint(), "decoder": decoder_fingerprint(self.cfg),
                "arrays": {s.name: {"shape": list(s.shape), "dtype": s.kind_obj.cache_dtype}
                           for s in self.cfg.modalities},
                "created": time.time(),
                "rows": [{"key": r.key, "content": r.content, "sample": r.sample.key, "files": r.sample.files,
                          "label": r.sample.label} for r in self.rows],
                "skipped": [{"row": i, "sample": self.rows[i].sample.key, "error": e}
                            for i, e in sorted(self.errors.items())],
                "damaged": [{"row": i, "sample": self.rows[i].sample.key, "warnings": w}
                            for i, w in sorted(self.damage.items())]}
        atomic_write_json(self.tmp / "meta.json", meta)


def _decode_rows(builder: _Builder, todo: list[int], workers: int, progress: bool) -> None:
    """Decode the given rows into the builder, in this process or a pool of `workers`."""
    cfg = builder.cfg.to_dict()
    jobs = [(i, dict(builder.rows[i].sample.files), cfg) for i in todo]
    bar = tqdm(total=len(jobs), desc="decoding", unit="sample", disable=not progress, file=sys.stderr)
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
    tmp = _tmp_folder(final)
    resume = _adopt_leftover(final.parent, final.name, tmp)
    if not resume:
        _check_space(final.parent, sum(int(np.prod(shape)) * dtype.itemsize
                                       for shape, dtype in array_specs(cfg, len(rows)).values()))
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
                workers: int = 2, skip_bad: bool = False, strict: bool = False, progress: bool = True) -> DecodedCache:
    """Decode every sample once into a cache entry (or reuse the complete one); returns it opened.

    Undecodable samples raise DatasetError naming them, or with skip_bad are left out with a
    warning (their rows hold label -1 and `subset` leaves them out). Samples that decoded with
    damage (`DecodedCache.damaged`) are kept, or with strict refused. workers <= 1 decodes in
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
    contents = _content_keys(samples, cfg, index, progress)
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
    if strict and cache.damaged:
        damaged = [f"{k} ({'; '.join(w)})" for k, w in cache.damaged]
        raise DatasetError(f"{len(damaged)} of {len(samples)} samples decoded with damage (strict):\n"
                           f"{format_list(damaged)}\n(repair or re-download them, or drop --strict to train "
                           "on them with a warning each)")
    return cache


def prune(cache_dir: str | os.PathLike, keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Delete entries (and dead builds' leftovers) in cache_dir except those in `keep`; returns them."""
    cache_dir = Path(cache_dir)
    keep_names = {Path(k).name for k in keep}
    removed = []
    for p in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if not p.is_dir() or p.name in keep_names:
            continue
        if ".tmp-" in p.name and _build_alive(p):
            continue   # a build in progress (or another machine's, which this one cannot tell)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------
# torch view (torch imported on use, so the cache itself works without it)

class CachedDataset:
    """Map-style dataset over cache rows: ({name: tensor of the kind's dtype, spec.shape}, label)."""

    def __init__(self, cache: DecodedCache, rows: Sequence[int] | np.ndarray | None = None):
        self.cache = cache
        self.rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.dtypes = {s.name: np.dtype(s.kind_obj.dtype) for s in cache.cfg.modalities}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import torch
        row = int(self.rows[i])
        # np.array copies out of the read-only memory map (torch wants writable memory)
        x = {name: torch.from_numpy(np.array(self.cache.array(name)[row], dtype=dtype))
             for name, dtype in self.dtypes.items()}
        return x, int(self.cache.labels[row])


__all__ = ["build_cache", "DecodedCache", "CachedDataset", "prune", "default_cache_dir", "file_digest",
           "HashIndex", "content_key", "source_digest", "row_key", "entry_name", "decoder_fingerprint",
           "array_specs", "CACHE_ENV", "CACHE_VERSION"]

"""Preprocessing cache: equals fresh decoding, reuse, invalidation, interrupted builds, bad files."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import training.cache as cache_mod
from dimml.config import PREPROCESS_PRESETS
from dimml.media import decode_clip
from training.cache import CachedAVDataset, build_cache, prune
from training.datasets import DatasetError, Sample
from test_datasets import write_clip, write_wav

CFG = PREPROCESS_PRESETS["tiny"].replace(frame_height=32, frame_width=40)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Four mp4 clips with audio, and one flv whose audio is a separate wav (CREMA-D style)."""
    root = tmp_path_factory.mktemp("media")
    for i in range(4):
        write_clip(root / f"c{i}.mp4", seed=i)
    write_clip(root / "d.flv", seed=9, video_codec="flv", audio=False)
    write_wav(root / "d.wav", seed=9)
    return root


@pytest.fixture
def data(tmp_path, media) -> Path:
    """A fresh, writable copy of the media (tests change files)."""
    return Path(shutil.copytree(media, tmp_path / "data"))


def samples_of(root: Path) -> list[Sample]:
    out = [Sample(str(root / f"c{i}.mp4"), i % 2, "train") for i in range(4)]
    return out + [Sample(str(root / "d.flv"), 1, "test", audio_path=str(root / "d.wav"))]


class DecodeCounter:
    """Counts decode_clip calls made by the cache (in-process builds, workers=0); can fail on call k."""

    def __init__(self, monkeypatch, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on
        monkeypatch.setattr(cache_mod, "decode_clip", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return decode_clip(*args, **kwargs)


def assert_matches_fresh(cache, samples) -> None:
    """Cached rows equal a fresh decode: frames exactly, spectrograms as float16 of the fresh ones."""
    for s in samples:
        row = cache.index_of(s.path)
        fresh = decode_clip(s.path, CFG, audio=s.audio_path)
        np.testing.assert_array_equal(cache.frames[row], fresh.frames)
        np.testing.assert_array_equal(cache.spectrograms[row], fresh.spectrogram.astype(np.float16))
        assert cache.labels[row] == s.label


def build(samples, cache_dir, cfg=CFG, **kw):
    return build_cache(samples, cfg, cache_dir, workers=0, progress=False, **kw)


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------

def test_cache_equals_fresh_decode_and_dataset_view(data, tmp_path):
    samples = samples_of(data)
    cache = build(samples, tmp_path / "cache")
    assert len(cache) == 5
    assert cache.spectrograms.dtype == np.float16 and cache.spectrograms.shape == (5, *CFG.spectrogram_shape)
    assert cache.frames.dtype == np.uint8 and cache.frames.shape == (5, *CFG.frames_shape)
    assert cache.labels.dtype == np.int64
    assert_matches_fresh(cache, samples)
    assert sorted(cache.paths) == sorted(s.path for s in samples)

    rows = cache.subset([s.path for s in samples if s.split == "test"])
    ds = CachedAVDataset(cache, rows)
    spec, frames, label = ds[0]
    assert len(ds) == 1 and label == 1
    assert spec.dtype.is_floating_point and tuple(spec.shape) == CFG.spectrogram_shape
    assert str(frames.dtype) == "torch.uint8" and tuple(frames.shape) == CFG.frames_shape
    np.testing.assert_array_equal(frames.numpy(), decode_clip(data / "d.flv", CFG, audio=data / "d.wav").frames)


def test_second_build_is_a_cache_hit(data, tmp_path, monkeypatch):
    samples = samples_of(data)
    first = build(samples, tmp_path / "cache")
    counter = DecodeCounter(monkeypatch)
    hashed = []
    real_digest = cache_mod.file_digest
    monkeypatch.setattr(cache_mod, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    second = build(samples[::-1], tmp_path / "cache")          # same set, any order: same entry
    assert counter.calls == 0 and hashed == []                 # no decoding, no re-hashing
    assert second.directory == first.directory
    assert_matches_fresh(second, samples)


def test_config_change_rebuilds(data, tmp_path, monkeypatch):
    samples = samples_of(data)
    old = build(samples, tmp_path / "cache")
    counter = DecodeCounter(monkeypatch)
    other = CFG.replace(num_frames=3)
    new = build(samples, tmp_path / "cache", cfg=other)
    assert counter.calls == 5 and new.directory != old.directory
    assert new.frames.shape[1] == 3 and old.directory.is_dir()    # the old entry is left
    assert new.cfg == other
    # limits are not part of the key: same entry
    build(samples, tmp_path / "cache", cfg=other.replace(max_duration_s=5.0))
    assert counter.calls == 5
    assert prune(tmp_path / "cache", keep=[new.directory]) == [old.directory]
    assert entries(tmp_path / "cache") == [new.directory.name]


def test_content_change_rebuilds_and_reuses_unchanged_rows(data, tmp_path, monkeypatch):
    samples = samples_of(data)
    old = build(samples, tmp_path / "cache")
    write_clip(data / "c2.mp4", seed=42)                       # same path, new content
    counter = DecodeCounter(monkeypatch)
    new = build(samples, tmp_path / "cache")
    assert new.directory != old.directory
    assert counter.calls == 1                                  # only the changed clip is decoded again
    assert_matches_fresh(new, samples)
    assert not np.array_equal(new.frames[new.index_of(samples[2].path)], old.frames[old.index_of(samples[2].path)])


def test_interrupted_build_resumes_without_redecoding(data, tmp_path, monkeypatch):
    samples = samples_of(data)
    cache_dir = tmp_path / "cache"
    counter = DecodeCounter(monkeypatch, fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        build(samples, cache_dir)
    names = entries(cache_dir)
    assert len(names) == 1 and ".tmp-" in names[0]             # only a temp folder: nothing complete
    counter = DecodeCounter(monkeypatch)
    cache = build(samples, cache_dir)
    assert counter.calls == 2                                  # 3 rows were saved before the interruption
    assert entries(cache_dir) == [cache.directory.name]
    assert_matches_fresh(cache, samples)


def test_leftovers_without_meta_are_never_used(data, tmp_path, monkeypatch):
    samples = samples_of(data)
    cache_dir = tmp_path / "cache"
    name = build(samples, cache_dir).directory.name
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                # a pid that is gone
    # a dead build's temp folder with garbage progress, and the entry itself without meta.json
    stale = cache_dir / f"{name}.tmp-{proc.pid}"
    shutil.copytree(cache_dir / name, stale)
    np.save(stale / "done.npy", np.ones(2, dtype=bool))
    (stale / "frames.npy").write_bytes(b"garbage")
    (cache_dir / name / "meta.json").unlink()
    np.lib.format.open_memmap(cache_dir / name / "frames.npy", mode="r+")[:] = 7

    counter = DecodeCounter(monkeypatch)
    cache = build(samples, cache_dir)
    assert counter.calls == 5 and cache.directory.name == name
    assert entries(cache_dir) == [name]
    assert_matches_fresh(cache, samples)


def test_undecodable_file_error_or_skip(data, tmp_path):
    samples = samples_of(data)
    (data / "c1.mp4").write_bytes(b"this is not a video" * 10)
    with pytest.raises(DatasetError, match=r"1 of 5 samples cannot be decoded:\n.*c1\.mp4 \(not_media"):
        build(samples, tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"1 of 5 samples cannot be decoded") as rec:
        cache = build(samples, tmp_path / "cache", skip_bad=True)
    assert "c1.mp4" in str(rec[0].message)
    assert cache.labels[cache.index_of(samples[1].path)] == -1
    assert cache.skipped[0][0] == samples[1].path
    rows = cache.subset([s.path for s in samples])
    assert len(rows) == 4 and cache.index_of(samples[1].path) not in rows
    with pytest.raises(DatasetError, match="c1.mp4"):            # a later run without skip_bad: same error
        build(samples, tmp_path / "cache")


def test_process_pool_build_matches_in_process(data, tmp_path):
    samples = samples_of(data)
    pooled = build_cache(samples, CFG, tmp_path / "a", workers=2, progress=False)
    inproc = build(samples, tmp_path / "b")
    assert pooled.directory.name == inproc.directory.name
    np.testing.assert_array_equal(pooled.frames, inproc.frames)
    np.testing.assert_array_equal(pooled.spectrograms, inproc.spectrograms)
    np.testing.assert_array_equal(pooled.labels, inproc.labels)


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(cache_mod.CACHE_ENV, raising=False)
    assert cache_mod.default_cache_dir(tmp_path) == tmp_path / ".dimml-cache"
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_mod.default_cache_dir(tmp_path) == tmp_path / "elsewhere"

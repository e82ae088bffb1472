"""Preprocessing cache: equals fresh decoding, reuse, invalidation, interrupted builds, bad files; per setting."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import training.cache as cache_mod
from dimml.datasets import DatasetError, Sample
from dimml.media import decode_sample
from dimml.modalities import preprocess_for
from training.cache import CachedDataset, build_cache, prune
from training.synth import write_clip

from conftest import SETTINGS, moving_texture, sine, write_image, write_sample

# a per-setting tiny config, smaller still so builds take milliseconds
SMALL = {"audio,visual": {"visual.height": 32, "visual.width": 40},
         "visual,flow": {"visual.height": 32, "visual.width": 40, "flow.height": 32, "flow.width": 40},
         "front:image,rear:image": {"front.height": 32, "rear.height": 24, "rear.width": 20},
         "audio,visual,flow": {"visual.height": 32, "visual.width": 40, "flow.height": 24, "flow.width": 24}}
# a change of one decoding parameter per setting (a new entry)
CHANGE = {"audio,visual": {"visual.num_frames": 3}, "visual,flow": {"flow.num_pairs": 3},
          "front:image,rear:image": {"rear.height": 16}, "audio,visual,flow": {"audio.seconds": 1.0}}


def cfg_of(setting: str):
    return preprocess_for("tiny", setting, SMALL[setting])


def write_flow_folder(root: Path, video: str, n: int = 5, level: int = 100) -> Path:
    """Pre-extracted flow: root/u/<video>/frame%06d.jpg and root/v/<video>/frame%06d.jpg."""
    for axis in ("u", "v"):
        for i in range(1, n + 1):
            write_image(root / axis / video / f"frame{i:06d}.jpg", np.full((24, 32, 3), level + i, np.uint8))
    return root / "u" / video


@pytest.fixture(scope="module", params=SETTINGS)
def media(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    """Per setting: four samples' files, plus a fifth that uses a modality's file of its own
    (CREMA-D style flv + separate wav; a pre-extracted flow folder; a JPEG view)."""
    setting = request.param
    root = tmp_path_factory.mktemp("media")
    files = [write_sample(root, setting, seed=i) for i in range(4)]
    extra = write_sample(root, setting, seed=9, video_ext=".flv")
    if "audio" in setting:
        extra = {"video": str(write_clip(root / "d.flv", moving_texture(10, seed=9), fps=10)),
                 "audio": str(root / "d.wav")}
        sf.write(root / "d.wav", sine(1.0, f=700.0), 16000)
    elif "flow" in setting:
        extra["flow"] = str(write_flow_folder(root / "flow", "v_x_g01_c01"))
    else:
        extra["rear"] = str(write_image(root / "rear9.jpg", moving_texture(1, 40, 48, seed=9)[0]))
    return setting, root, files + [extra]


@pytest.fixture
def data(tmp_path, media) -> tuple[str, Path, list[Sample]]:
    """A fresh, writable copy of the setting's media (tests change files) and its samples."""
    setting, root, files = media
    copy = Path(shutil.copytree(root, tmp_path / "data"))
    moved = [{k: str(copy / Path(v).relative_to(root)) for k, v in f.items()} for f in files]
    samples = [Sample(f, i % 2, "train") for i, f in enumerate(moved[:4])] + [Sample(moved[4], 1, "test")]
    return setting, copy, samples


class DecodeCounter:
    """Counts decode_sample calls made by the cache (in-process builds, workers=0); can fail on call k."""

    def __init__(self, monkeypatch, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on
        monkeypatch.setattr(cache_mod, "decode_sample", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return decode_sample(*args, **kwargs)


def assert_matches_fresh(cache, samples, cfg) -> None:
    """Cached rows equal a fresh decode, cast to the kind's cache dtype (float16 audio, uint8 the rest)."""
    for s in samples:
        row = cache.index_of(s.key)
        fresh = decode_sample(s.files, cfg)
        for spec in cfg.modalities:
            np.testing.assert_array_equal(cache.array(spec.name)[row],
                                          fresh.arrays[spec.name].astype(spec.kind_obj.cache_dtype))
        assert cache.labels[row] == s.label


def build(samples, cache_dir, cfg, **kw):
    return build_cache(samples, cfg, cache_dir, workers=0, progress=False, **kw)


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------

def test_cache_equals_fresh_decode_and_dataset_view(data, tmp_path):
    import torch
    setting, root, samples = data
    cfg = cfg_of(setting)
    cache = build(samples, tmp_path / "cache", cfg)
    assert len(cache) == 5 and cache.names == cfg.names
    for spec in cfg.modalities:
        arr = cache.array(spec.name)
        assert arr.dtype == np.dtype(spec.kind_obj.cache_dtype) and arr.shape == (5, *spec.shape)
        assert (cache.directory / f"{spec.name}.npy").is_file()
    assert cache.labels.dtype == np.int64
    assert_matches_fresh(cache, samples, cfg)
    assert sorted(cache.keys) == sorted(s.key for s in samples)

    rows = cache.subset([s.key for s in samples if s.split == "test"])
    ds = CachedDataset(cache, rows)
    x, label = ds[0]
    assert len(ds) == 1 and label == 1 and list(x) == list(cfg.names)
    fresh = decode_sample(samples[4].files, cfg)
    for spec in cfg.modalities:
        assert x[spec.name].dtype == getattr(torch, spec.kind_obj.dtype) and tuple(x[spec.name].shape) == spec.shape
        if spec.kind_obj.dtype == "uint8":
            np.testing.assert_array_equal(x[spec.name].numpy(), fresh.arrays[spec.name])
    batch, labels = next(iter(torch.utils.data.DataLoader(CachedDataset(cache), batch_size=5)))
    assert tuple(labels.shape) == (5,) and all(tuple(batch[s.name].shape) == (5, *s.shape) for s in cfg.modalities)


def test_second_build_is_a_cache_hit(data, tmp_path, monkeypatch):
    setting, root, samples = data
    cfg = cfg_of(setting)
    first = build(samples, tmp_path / "cache", cfg)
    counter = DecodeCounter(monkeypatch)
    hashed = []
    real_digest = cache_mod.file_digest
    monkeypatch.setattr(cache_mod, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    second = build(samples[::-1], tmp_path / "cache", cfg)     # same set, any order: same entry
    assert counter.calls == 0 and hashed == []                 # no decoding, no re-hashing
    assert second.directory == first.directory
    assert_matches_fresh(second, samples, cfg)


def test_config_change_rebuilds(data, tmp_path, monkeypatch):
    setting, root, samples = data
    cfg = cfg_of(setting)
    old = build(samples, tmp_path / "cache", cfg)
    counter = DecodeCounter(monkeypatch)
    other = cfg.override(CHANGE[setting])
    new = build(samples, tmp_path / "cache", cfg=other)
    assert counter.calls == 5 and new.directory != old.directory
    assert new.cfg == other and old.directory.is_dir()          # the old entry is left
    (name, param), = [k.split(".") for k in CHANGE[setting]]
    assert new.array(name).shape[1:] == other.spec(name).shape != cfg.spec(name).shape
    # limits are not part of the key: same entry
    build(samples, tmp_path / "cache", cfg=other.override({"max_duration_s": 5.0}))
    assert counter.calls == 5
    assert prune(tmp_path / "cache", keep=[new.directory]) == [old.directory]
    assert entries(tmp_path / "cache") == [new.directory.name]


def test_content_change_rebuilds_and_reuses_unchanged_rows(data, tmp_path, monkeypatch):
    setting, root, samples = data
    cfg = cfg_of(setting)
    old = build(samples, tmp_path / "cache", cfg)
    changed = samples[2].files[cfg.fields[-1]]                    # same path, new content
    fresh = write_sample(tmp_path / "other", setting, seed=42)[cfg.fields[-1]]
    shutil.copyfile(fresh, changed)
    counter = DecodeCounter(monkeypatch)
    new = build(samples, tmp_path / "cache", cfg)
    assert new.directory != old.directory
    assert counter.calls == 1                                  # only the changed sample is decoded again
    assert_matches_fresh(new, samples, cfg)
    name = next(s.name for s in cfg.modalities if s.field == cfg.fields[-1])
    assert not np.array_equal(new.array(name)[new.index_of(samples[2].key)], old.array(name)[old.index_of(samples[2].key)])


def test_pre_extracted_flow_folder_content_is_the_key(tmp_path, monkeypatch):
    cfg = cfg_of("visual,flow")
    video = write_sample(tmp_path, "visual,flow")["video"]
    u_dir = write_flow_folder(tmp_path / "flow", "v_a", n=5)
    samples = [Sample({"video": video, "flow": str(u_dir)}, 0, "train")]
    first = build(samples, tmp_path / "cache", cfg)
    # a v image changes (the u folder itself is untouched): a new entry, the new values
    write_image(tmp_path / "flow" / "v" / "v_a" / "frame000003.jpg", np.full((24, 32, 3), 7, np.uint8))
    counter = DecodeCounter(monkeypatch)
    second = build(samples, tmp_path / "cache", cfg)
    assert counter.calls == 1 and second.directory != first.directory
    assert_matches_fresh(second, samples, cfg)


def test_old_version_entries_are_rebuilt(data, tmp_path, monkeypatch):
    setting, root, samples = data
    if setting != "audio,visual":
        pytest.skip("the entry format is the same code for every setting; audio,visual is the one old entries had")
    cfg = cfg_of(setting)
    cache_dir = tmp_path / "cache"
    name = build(samples, cache_dir, cfg).directory.name
    meta = json.loads((cache_dir / name / "meta.json").read_text())
    (cache_dir / name / "meta.json").write_text(json.dumps({**meta, "version": 1}))   # an entry of the old format
    counter = DecodeCounter(monkeypatch)
    cache = build(samples, cache_dir, cfg)
    assert counter.calls == 5 and cache.meta["version"] == cache_mod.CACHE_VERSION == 2
    assert_matches_fresh(cache, samples, cfg)


def test_interrupted_build_resumes_without_redecoding(data, tmp_path, monkeypatch):
    setting, root, samples = data
    cfg = cfg_of(setting)
    cache_dir = tmp_path / "cache"
    counter = DecodeCounter(monkeypatch, fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        build(samples, cache_dir, cfg)
    names = entries(cache_dir)
    assert len(names) == 1 and ".tmp-" in names[0]             # only a temp folder: nothing complete
    counter = DecodeCounter(monkeypatch)
    cache = build(samples, cache_dir, cfg)
    assert counter.calls == 2                                  # 3 rows were saved before the interruption
    assert entries(cache_dir) == [cache.directory.name]
    assert_matches_fresh(cache, samples, cfg)


def test_leftovers_without_meta_are_never_used(data, tmp_path, monkeypatch):
    setting, root, samples = data
    cfg = cfg_of(setting)
    first = cfg.names[0]
    cache_dir = tmp_path / "cache"
    name = build(samples, cache_dir, cfg).directory.name
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                # a pid that is gone
    # a dead build's temp folder with garbage progress, and the entry itself without meta.json
    stale = cache_dir / f"{name}.tmp-{proc.pid}"
    shutil.copytree(cache_dir / name, stale)
    np.save(stale / "_done.npy", np.ones(2, dtype=bool))
    (stale / f"{first}.npy").write_bytes(b"garbage")
    (cache_dir / name / "meta.json").unlink()
    np.lib.format.open_memmap(cache_dir / name / f"{first}.npy", mode="r+")[:] = 7

    counter = DecodeCounter(monkeypatch)
    cache = build(samples, cache_dir, cfg)
    assert counter.calls == 5 and cache.directory.name == name
    assert entries(cache_dir) == [name]
    assert_matches_fresh(cache, samples, cfg)


def test_another_machines_build_is_left_alone(data, tmp_path, monkeypatch):
    """A cache folder shared by nodes: another host's temp folder is never adopted nor removed
    (its pid means nothing here); this machine builds its own and is used, and prune keeps it."""
    setting, root, samples = data
    if setting != "audio,visual":
        pytest.skip("the temp folder rules are the same code for every setting")
    cfg = cfg_of(setting)
    cache_dir = tmp_path / "cache"
    name = build(samples, cache_dir, cfg).directory.name
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                # a pid that is gone here
    theirs = cache_dir / f"{name}.tmp-other-node-7-{proc.pid}"   # progress of a build on host "other-node-7"
    shutil.copytree(cache_dir / name, theirs)
    np.save(theirs / "_done.npy", np.ones(5, dtype=bool))
    shutil.rmtree(cache_dir / name)
    counter = DecodeCounter(monkeypatch)
    cache = build(samples, cache_dir, cfg)
    assert counter.calls == 5 and cache.directory.name == name  # decoded here, not adopted
    assert theirs.is_dir() and (theirs / "_done.npy").is_file()
    assert prune(cache_dir, keep=[cache.directory]) == [] and theirs.is_dir()
    monkeypatch.setattr(cache_mod, "_host", lambda: "other-node-7")   # on that host, its pid is dead: removed
    assert prune(cache_dir, keep=[cache.directory]) == [theirs]


def test_undecodable_file_error_or_skip(data, tmp_path):
    setting, root, samples = data
    cfg = cfg_of(setting)
    bad_file = Path(samples[1].files[cfg.fields[0]])
    bad_file.write_bytes(b"this is not a media file" * 10)
    with pytest.raises(DatasetError, match=rf"1 of 5 samples cannot be decoded:\n.*{samples[1].key}.*not_media"):
        build(samples, tmp_path / "cache", cfg)
    with pytest.warns(UserWarning, match=r"1 of 5 samples cannot be decoded") as rec:
        cache = build(samples, tmp_path / "cache", cfg, skip_bad=True)
    assert bad_file.name in str(rec[0].message) or samples[1].key in str(rec[0].message)
    assert cache.labels[cache.index_of(samples[1].key)] == -1
    assert cache.skipped[0][0] == samples[1].key
    rows = cache.subset([s.key for s in samples])
    assert len(rows) == 4 and cache.index_of(samples[1].key) not in rows
    with pytest.raises(DatasetError, match=samples[1].key):    # a later run without skip_bad: same error
        build(samples, tmp_path / "cache", cfg)


def test_process_pool_build_matches_in_process(data, tmp_path):
    setting, root, samples = data
    if setting != "audio,visual,flow":
        pytest.skip("one pool build covers the worker path (float16 audio, uint8 frames and flow); "
                    "spawning workers costs seconds per setting")
    cfg = cfg_of(setting)
    pooled = build_cache(samples, cfg, tmp_path / "a", workers=2, progress=False)
    inproc = build(samples, tmp_path / "b", cfg)
    assert pooled.directory.name == inproc.directory.name
    for name in (*cfg.names, cache_mod.LABELS):
        np.testing.assert_array_equal(pooled._array(name), inproc._array(name))


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(cache_mod.CACHE_ENV, raising=False)
    assert cache_mod.default_cache_dir(tmp_path) == tmp_path / ".dimml-cache"
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_mod.default_cache_dir(tmp_path) == tmp_path / "elsewhere"

"""A run's data: the dataset read as configured, its decode cache, the rows of each split, loaders.

    data = prepare_data(cfg, cfg.preprocess_config())     # RunData: spec, cache, rows per split
    loader = make_loader(data, "train", batch_size=16, workers=0, pin=False)

Under several processes (training/distributed.py) each node's local rank 0 builds the node's
cache, the others open it, and every rank checks it sees rank 0's data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from dimml.datasets import SPLITS, DatasetError, DatasetSpec, stratified_split
from dimml.modalities import PreprocessConfig
from training import distributed
from training.cache import CachedDataset, DecodedCache, build_cache, default_cache_dir
from training.config import TrainConfig
from training.distributed import Ranks


@dataclass
class RunData:
    """A dataset, its decoded cache and the cache rows of each split."""

    spec: DatasetSpec
    cache: DecodedCache
    rows: dict[str, np.ndarray]
    val_carved: bool

    @property
    def sizes(self) -> dict[str, int]:
        return {s: int(len(r)) for s, r in self.rows.items()}


def prepare_data(cfg: TrainConfig, preprocess: PreprocessConfig, *, ranks: Ranks | None = None,
                 progress: bool = True) -> RunData:
    """Read the dataset, build its cache (each node's local rank 0; the node's others then open it)
    and index the splits; under several processes, check every rank sees the same data.

    A dataset without a validation split gets one carved from train (val_fraction, or 0.1).
    """
    ranks = ranks or Ranks()   # one process
    spec = cfg.load_dataset(preprocess)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(spec.root)
    cache = distributed.once_per_node(
        lambda: build_cache(spec.samples, preprocess, cache_dir, workers=cfg.decode_workers, skip_bad=cfg.skip_bad,
                            strict=cfg.strict, progress=progress and ranks.node_main), ranks)
    rows = {s: cache.subset([x.key for x in spec.split(s)]) for s in SPLITS}
    if len(rows["train"]) == 0:
        raise DatasetError(f"{spec.root}: no training samples")
    carved = len(rows["val"]) == 0
    if carved:   # the one class-stratified split, train rows only (keys: the rows, zero-padded so they sort)
        train = rows["train"]
        where = np.asarray(stratified_split([f"{r:012d}" for r in train], np.asarray(cache.labels[train]).tolist(),
                                            seed=cfg.split_seed, val_fraction=cfg.val_fraction or 0.1,
                                            test_fraction=0.0))
        rows["train"], rows["val"] = train[where == "train"], train[where == "val"]
    # the same cache entry (content, config, decoder) and the same rows per split on every node:
    # DistributedSampler then deals every rank its share of one permutation
    distributed.same_on_every_rank({"classes": spec.classes, "cache entry": cache.directory.name,
                                    **{f"{s} rows": distributed.digest(r) for s, r in rows.items()}},
                                   ranks, f"{spec.root}")
    return RunData(spec, cache, rows, carved)


def make_loader(data: RunData, split: str, batch_size: int, workers: int, pin: bool,
                sampler: DistributedSampler | None = None) -> DataLoader:
    """Batches of ({modality: [B, *shape]}, label [B]) from the cache."""
    ds = CachedDataset(data.cache, data.rows[split])
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                      pin_memory=pin, persistent_workers=workers > 0, drop_last=False)


__all__ = ["RunData", "prepare_data", "make_loader"]

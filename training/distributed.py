"""Where a training process sits under torchrun (one node or several) and the collectives of the setup.

torchrun starts one process per accelerator (or per CPU share) on each node and gives each its
place in the environment: RANK and WORLD_SIZE across all nodes, LOCAL_RANK and LOCAL_WORLD_SIZE
on its node, GROUP_RANK and GROUP_WORLD_SIZE for the node itself. A plain `python -m training
fit` has none of them: one process, rank 0 of 1.

The decode cache lives on each node's own disk: `once_per_node` lets LOCAL_RANK 0 of every node
build it while the node's other processes wait (a cross-node barrier follows, so a failure on
one node stops every node with its message), and `same_on_every_rank` checks that every node
then sees the same split, class list and cache rows (the cache is keyed by content, so identical
files give identical entries). Both, and the other ranks' wait for rank 0's evaluation, run on
a gloo group with a long timeout (`wait_group`). Global rank 0 alone writes the run folder; the
trainer logs every rank's `weights_checksum` after training.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long processes wait for one another's long work: a node's cache build (decoding a large
# dataset takes hours), rank 0's final evaluation. The default collective timeouts (10 min NCCL,
# 30 min gloo) would kill the waiting processes first. A node whose build fails stops everyone at
# once (its error is gathered), and a dead process breaks the others' connections, so this limit
# only matters for work that hangs.
LONG_WAIT = timedelta(hours=12)
_wait_group = None   # the gloo group with LONG_WAIT, made once per process group (wait_group)


@dataclass(frozen=True)
class Ranks:
    """This process's place: global rank of world, local rank of the node's processes, node of nodes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    node: int = 0
    nodes: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ranks:
        """From torchrun's variables; one process when they are absent."""
        world = int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        return cls(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_world=local_world, node=int(env.get("GROUP_RANK", "0")),
                   nodes=int(env.get("GROUP_WORLD_SIZE", str(max(1, world // max(1, local_world))))))

    @property
    def main(self) -> bool:
        """Global rank 0: the process that writes the run folder and logs."""
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        """Local rank 0: the process that builds its node's decode cache."""
        return self.local_rank == 0


def start(device: torch.device) -> None:
    """Join the process group torchrun's rendezvous set up (NCCL on CUDA, gloo on the CPU)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # CPU convolutions return channels_last weight gradients for the frames' layout: harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def stop() -> None:
    """Leave the process group (and forget the wait group made in it)."""
    global _wait_group
    _wait_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def wait_group():
    """A gloo group of every rank with the LONG_WAIT timeout (made on first use, by every rank).

    gloo whatever the training backend: it waits on the CPU, and NCCL's watchdog would abort a
    collective that waits for hours.
    """
    global _wait_group
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return _wait_group


def long_barrier(ranks: Ranks) -> None:
    """Every rank waits for every other, up to LONG_WAIT (e.g. for rank 0's evaluation)."""
    if ranks.world > 1:
        dist.barrier(group=wait_group())


def _gather(obj: Any, group) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def once_per_node(fn: Callable[[], T], ranks: Ranks) -> T:
    """fn() on each node's local rank 0, then, once every node's has returned, on the node's others.

    Used to build the node's decode cache, which the others then open complete. If fn fails
    on some node, every process raises (the failing one its own exception, the others a
    ValueError naming the rank and its message) instead of waiting for it.
    """
    if ranks.world == 1:
        return fn()
    result, error = None, None
    if ranks.node_main:
        try:
            result = fn()
        except Exception as e:   # reported to every rank below, then re-raised here
            error = e
    failures = _gather(None if error is None else f"{type(error).__name__}: {error}", wait_group())
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(failures) if msg]
    if failed:
        r, msg = failed[0]
        raise ValueError(f"rank {r} could not prepare its node's data: {msg}")
    return fn() if not ranks.node_main else result


def same_on_every_rank(facts: dict[str, Any], ranks: Ranks, what: str) -> None:
    """Raise ValueError on every rank unless every rank's facts equal rank 0's (naming the first difference)."""
    if ranks.world == 1:
        return
    every = _gather(facts, wait_group())
    for r, theirs in enumerate(every):
        for key, value in every[0].items():
            if theirs.get(key) != value:
                raise ValueError(f"{what}: rank {r} has another {key} than rank 0 ({theirs.get(key)!r} vs "
                                 f"{value!r}); every node needs the same files, options and library versions")


def digest(array) -> str:
    """Short sha256 of an array's bytes (to compare row lists across ranks without sending them)."""
    import numpy as np
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def weights_checksum(modules: Mapping[str, torch.nn.Module]) -> str:
    """sha256 of every parameter's bytes, by module and parameter name (buffers left out: see README)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        for pname, p in modules[name].named_parameters():
            h.update(f"{name}.{pname}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())   # float(): exact for fp16/bf16
    return h.hexdigest()[:16]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank (the default group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    return _gather(obj, None)

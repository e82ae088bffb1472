"""Several torchrun agents on this machine as several nodes (c10d rendezvous, gloo): used by
tests/test_nodes.py and benchmarks/bench_nodes.py.

Each agent is one "node" with one process, its own dataset copy, cache folder and run folder, as
separate machines would have. c10d numbers the nodes in the order of their addresses
(`--local-addr`; then the agents' process ids), so node i gets 127.0.0.(i+1): the first node is
node 0 and holds global rank 0. Its agent hosts the rendezvous store.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Node:
    """One node's folders; cache_env: its cache folder through DIMML_CACHE_DIR, else --cache-dir."""

    data: Path
    out: Path
    cache: Path
    cache_env: bool = False


def agent_command(index: int, nodes: int, port: int, node: Node, fit_args: list[str]) -> list[str]:
    """torchrun for node `index` of `nodes` (one process each) running `python -m training fit`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-conf", f"is_host={int(index == 0)},join_timeout=60", "--local-addr", f"127.0.0.{index + 1}",
           "--max-restarts", "0", "-m", "training", "fit", "--data", str(node.data), "--out", str(node.out),
           *fit_args]
    return cmd if node.cache_env else cmd + ["--cache-dir", str(node.cache)]


def start(nodes: list[Node], port: int, fit_args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Start one agent per node (node 0 first: it hosts the store); logs/node<i>.log holds each one's output."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, node in enumerate(nodes):
        # one thread per process: the nodes share this machine's cores (torchrun sets this itself only
        # for several processes per node)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if node.cache_env:
            env["DIMML_CACHE_DIR"] = str(node.cache)
        with open(logs / f"node{i}.log", "wb") as log:
            procs.append(subprocess.Popen(agent_command(i, len(nodes), port, node, fit_args), env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every agent and its workers (torchrun starts workers in sessions of their own)."""
    import psutil

    pids = set()
    for p in procs:
        try:
            pids |= {p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def wait(procs: list[subprocess.Popen], timeout: float, until=None) -> list[int | None]:
    """Wait until every agent exited, or `until()` is true (then they go on running); kill them all
    after `timeout` s or once one fails (a test must not hang on a node). Exit codes, None: running
    or killed."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or (until is not None and until()):
            return codes
        if time.monotonic() > deadline or any(c not in (None, 0) for c in codes):
            kill(procs)
            return codes
        time.sleep(0.05)


def logs_text(logs: Path, nodes: int, tail: int = 3000) -> str:
    """The end of every node's log, for an assertion message."""
    return "\n".join(f"--- node {i}:\n{(logs / f'node{i}.log').read_text(errors='replace')[-tail:]}"
                     for i in range(nodes))

"""serving/allocator.py on glibc: the arena cap holds for new threads, and the trimming thread gives
freed-but-kept memory back to the OS (each in a fresh interpreter: malloc's state is per process)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

PROGRAM = r"""
import json, sys, threading, time
from serving import allocator
from serving.allocator import arena_count

arenas, trim_s = int(sys.argv[1]), float(sys.argv[2])
assert allocator.configure(arenas, trim_s)

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

kept, start = [], threading.Barrier(8)
def work():
    start.wait()   # all at once: contending threads get arenas of their own
    blocks = [bytearray(64 * 1024) for _ in range(400)]   # 25 MiB per thread, below the mmap threshold
    kept.append(blocks[-1])   # the heap's top stays in use: its free memory cannot shrink from the top
    del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
base = rss_mib()
[t.start() for t in threads]
[t.join() for t in threads]
time.sleep(3 * trim_s if trim_s else 0.5)
# the peak, not the RSS after the threads: on a busy machine the trimming thread may already run between them.
# VmHWM (this program's own high-water mark; getrusage's ru_maxrss starts at the forking parent's)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"arenas": arena_count(), "base": base, "peak": peak, "after": rss_mib()}))
"""


def run(arenas: int, trim_s: float) -> dict:
    r = subprocess.run([sys.executable, "-c", PROGRAM, str(arenas), str(trim_s)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only (Linux)")
def test_arena_cap_and_trimming():
    default = run(0, 0)     # glibc's own: an arena per contending thread, freed memory kept
    capped = run(2, 0.2)    # 2 arenas, trimmed every 0.2 s
    assert default["arenas"] > 2 and capped["arenas"] <= 2, (default, capped)
    for r in (default, capped):
        assert r["peak"] - r["base"] > 20, r   # tens of MiB freed (8 threads x 25 MiB, in 2 or more arenas)
    kept = lambda r: (r["after"] - r["base"]) / (r["peak"] - r["base"])   # of the peak's growth, still held
    assert kept(default) > 0.7, default   # nothing gives it back
    assert kept(capped) < 0.3, capped     # the trimming thread does


THRESHOLD_PROGRAM = r"""
import json, sys
from serving import allocator

assert allocator.configure(0, 0, int(sys.argv[1]))
big = bytearray(4 * 2**20)   # mapped on its own; freeing it moves glibc's threshold up to 4 MiB
del big
before = allocator.mallinfo()["hblks"]
block = bytearray(512 * 1024)   # a decoder-sized buffer: mapped, or carved from the heap?
print(json.dumps({"mapped_blocks": allocator.mallinfo()["hblks"] - before}))
"""


def mapped_blocks(threshold: int) -> int:
    r = subprocess.run([sys.executable, "-c", THRESHOLD_PROGRAM, str(threshold)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["mapped_blocks"]   # blocks mapped by the 512 KiB allocation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only (Linux)")
def test_a_fixed_mmap_threshold_keeps_large_buffers_out_of_the_heap():
    """glibc's moving threshold: after a large block is freed, blocks below its size come from the
    heap (where they fragment it); a fixed threshold keeps mapping them, and unmaps them on free."""
    assert mapped_blocks(0) == 0            # moving: the 512 KiB buffer came from the heap
    assert mapped_blocks(128 * 1024) == 1   # fixed at 128 KiB (DIMML_MALLOC_MMAP_THRESHOLD=131072): mapped

"""A diagnostic wrapper of the service: where a worker's memory goes (Python objects or native).

    DIMML_MEMPROBE_DIR=/tmp/probe PYTHONPATH=. bentoml serve benchmarks.memprobe:DIMML
    (bench_soak.py --probe does this)

Serves serving.service unchanged; in every worker that imports it, a daemon thread writes one
JSON line every DIMML_MEMPROBE_S seconds (default 30) to DIR/<pid>.jsonl:
  rss              resident memory (the figure that grows);
  traced           bytes of live Python allocations (tracemalloc): Python objects kept;
  malloc_in_use    glibc mallinfo2 uordblks + hblkhd: native memory handed out by malloc (Python
                   objects, NumPy arrays, FFmpeg buffers, ...) and not freed;
  malloc_free      fordblks: memory malloc holds freed but has not returned to the OS (arena
                   fragmentation: what MALLOC_ARENA_MAX / malloc_trim act on);
  arenas           the number of malloc arenas (glibc makes one per thread that contends, up to
                   8 x cores);
  threads, gc_objects;
and at the first, the middle (DIMML_MEMPROBE_DIFF_AT seconds, default 600) and every later
dump the top allocation sites that grew since the first snapshot (tracemalloc, 12 frames),
to DIR/<pid>-top.txt, with live counts of per-request objects (WATCH) and who holds the oldest
Request. DIMML_MEMPROBE_COLLECT=1 also runs gc.collect() at each sample and records what it
freed (cyclic garbage waiting for a full collection is not a leak). DIMML_MEMPROBE_OBJECTS=0 leaves
out the per-type counts and the loop's timers (they walk gc.get_objects(), and doing that from
another thread can hand out a tuple that the serving thread is still building: CPython then fails
its resize with "SystemError: Objects/tupleobject.c: bad argument to internal function"; once,
that error stopped BentoML's batching controller, and the model answered only 503 until restarted:
a diagnostic run, not a production one). RSS growing with `traced` flat says native memory; with `malloc_free`
growing, the allocator keeps freed memory (fragmentation), with `malloc_in_use` growing,
something native is kept.
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time
import tracemalloc
from pathlib import Path

from serving import allocator
from serving.allocator import arena_count
from serving.service import DIMML, DIMMLInference  # noqa: F401  (what bentoml serves)

FRAMES = 12


def mallinfo() -> dict[str, int]:
    """glibc's malloc statistics in the probe's terms (bytes), or {} where they are missing."""
    m = allocator.mallinfo()
    if not m:
        return {}
    return {"malloc_in_use": m["uordblks"] + m["hblkhd"], "malloc_free": m["fordblks"], "malloc_mmap": m["hblkhd"],
            "malloc_arena_bytes": m["arena"]}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _top(first: tracemalloc.Snapshot, now: tracemalloc.Snapshot, n: int = 15) -> str:
    lines = []
    for stat in now.compare_to(first, "traceback")[:n]:
        lines.append(f"{stat.size_diff / 2**20:+.2f} MiB ({stat.count_diff:+d} blocks), now {stat.size / 2**20:.2f} MiB")
        lines += ["    " + line for line in stat.traceback.format()[-FRAMES:]]
    return "\n".join(lines)


WATCH = ("Request", "RequestResponseCycle", "_Span", "Clip", "UploadFile")   # per-request objects to count


def live_counts() -> dict[str, int]:
    """Live objects of the per-request types in WATCH (a count growing with requests is a leak)."""
    counts = dict.fromkeys(WATCH, 0)
    for o in gc.get_objects():
        name = type(o).__name__
        if name in counts:
            counts[name] += 1
    return counts


def _describe(o) -> str:
    kind = type(o)
    text = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(o, dict):
        text += f" keys={list(o)[:8]}"
    elif isinstance(o, (list, tuple, set)):
        text += f" len={len(o)}"
    return text


def referrers(obj, depth: int = 5, width: int = 4) -> str:
    """A tree of who refers to obj, `depth` levels up (frames and this probe's own containers skipped)."""
    import types

    lines: list[str] = []
    seen = {id(obj)}
    skip = (types.FrameType,)

    def walk(o, level):
        if level == depth:
            return
        gc.collect()
        refs = [r for r in gc.get_referrers(o) if id(r) not in seen and not isinstance(r, skip)]
        for r in refs[:width]:
            seen.add(id(r))
            lines.append("  " * level + "<- " + _describe(r))
            walk(r, level + 1)
        del refs

    walk(obj, 0)
    return "\n".join(lines)


def timer_census() -> dict[str, int]:
    """The event loops' scheduled timers by callback and state: long timers that a request leaves behind
    (or cancelled ones the loop keeps until they are due) pin the context they were created in."""
    import asyncio
    from collections import Counter

    out: Counter = Counter()
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        for h in list(getattr(loop, "_scheduled", ())):
            if h.cancelled():
                name = "cancelled"
            else:
                cb = getattr(h, "_callback", None)
                name = getattr(cb, "__qualname__", type(cb).__name__)
            out[name] += 1
            ctx = getattr(h, "_context", None)
            for var, value in (ctx.items() if ctx is not None else ()):
                if type(value).__name__ == "Request":   # the context it pins holds a request
                    out[f"{name} (context var {var.name!r} holds a Request)"] += 1
    return dict(out)


def oldest_holders(name: str = "Request") -> str:
    found = [o for o in gc.get_objects() if type(o).__name__ == name]
    if not found:
        return f"no live {name}"
    return f"who holds a live {name} ({len(found)} alive):\n" + referrers(found[0])


def _run(out: Path, every_s: float, diff_at_s: float, collect: bool, objects: bool) -> None:
    pid = os.getpid()
    t0 = time.monotonic()
    first = tracemalloc.take_snapshot()
    diffed = False
    with open(out / f"{pid}.jsonl", "a") as log:
        while True:
            traced, peak = tracemalloc.get_traced_memory()
            rec = {"t": round(time.monotonic() - t0, 1), "pid": pid, "rss": rss_bytes(), "traced": traced,
                   "traced_peak": peak, **mallinfo(), "arenas": arena_count(),
                   "threads": threading.active_count()}
            if objects:
                rec.update(gc_objects=len(gc.get_objects()), **live_counts(), timers=timer_census())
            if collect:   # what a full collection frees: cyclic garbage, not a leak
                rec["gc_freed"] = gc.collect()
                rec["traced_after_gc"] = tracemalloc.get_traced_memory()[0]
                rec["gc_objects_after_gc"] = len(gc.get_objects())
            log.write(json.dumps(rec) + "\n")
            log.flush()
            elapsed = time.monotonic() - t0
            if elapsed >= diff_at_s and not diffed or elapsed >= 2 * diff_at_s:
                snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                with open(out / f"{pid}-top.txt", "a") as top:
                    top.write(f"=== t={elapsed:.0f} s, traced {traced / 2**20:.1f} MiB, rss {rec['rss'] / 2**20:.1f} MiB\n")
                    top.write(_top(first, snap) + "\n")
                    if objects:
                        for name in ("Request", "RequestResponseCycle"):
                            top.write(oldest_holders(name) + "\n")
                diffed = True
                diff_at_s = elapsed   # then at every doubling
            time.sleep(every_s)


def start() -> None:
    where = os.environ.get("DIMML_MEMPROBE_DIR")
    if not where:
        return
    out = Path(where)
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)
    threading.Thread(target=_run, args=(out, float(os.environ.get("DIMML_MEMPROBE_S", "30")),
                                        float(os.environ.get("DIMML_MEMPROBE_DIFF_AT", "600")),
                                        os.environ.get("DIMML_MEMPROBE_COLLECT", "") == "1",
                                        os.environ.get("DIMML_MEMPROBE_OBJECTS", "1") != "0"),
                     daemon=True, name="memprobe").start()


start()

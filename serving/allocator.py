"""glibc malloc settings for the serving workers: freed memory goes back to the OS.

Measured in the API worker under a steady load (benchmarks/memprobe.py, with BentoML's timer
defect fixed): Python objects (tracemalloc) and the memory malloc has handed out (mallinfo2
uordblks) stay flat, but the memory malloc holds *freed* (fordblks) keeps growing, 2 -> 43 MiB in
4 minutes, and RSS with it (~3 MiB/min over a 30-minute soak). Decoding runs in a pool of threads;
glibc gives contending threads arenas of their own (up to 8 per core: 16 here), and a thread
arena's heap gives memory back to the OS only from its top, so the decoders' short-lived
buffers (frames, spectrograms, uploads) leave fragmented free memory behind in each arena.
`configure` caps the arenas (fewer heaps to fragment) and starts a thread that calls
malloc_trim(0) every few seconds, which returns the free pages of every arena to the OS.
Elsewhere than glibc (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

logger = logging.getLogger("bentoml.dimml")

M_ARENA_MAX = -8   # mallopt parameter (malloc.h)
_started = False


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def configure(arenas: int, trim_every_s: float) -> bool:
    """Cap malloc's arenas at `arenas` (0: glibc's default) and trim every `trim_every_s` seconds (0: never).
    Call early in a worker, before its thread pools start. True when glibc took the settings."""
    global _started
    libc = _libc()
    if libc is None:
        return False
    if arenas > 0 and libc.mallopt(M_ARENA_MAX, arenas) != 1:
        logger.warning("mallopt(M_ARENA_MAX, %d) refused", arenas)
    if trim_every_s > 0 and not _started:
        _started = True

        def trim() -> None:
            stop = threading.Event()
            while not stop.wait(trim_every_s):
                libc.malloc_trim(0)

        threading.Thread(target=trim, daemon=True, name="malloc-trim").start()
    return True


__all__ = ["configure"]

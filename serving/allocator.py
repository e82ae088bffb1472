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

That left a slower creep (+0.7 to +0.9 MiB/min in the API worker over 30-minute soaks), which went
with two changes to the decoders, not to malloc's settings: PyAV leaked ~150 bytes per demux left
before its end (fixed in dimml.media.FrameTally and decode_audio), and FFmpeg started and stopped
~8 threads per upload (now none: dimml.media.set_codec_threads). The soaks with them are level
(BENCHMARKS.md).
One suspect on the way was glibc's *moving* mmap threshold: a block of 128 KiB or more starts
as a mapping of its own, but each free of one raises the threshold to its size (up to 32 MiB), so
the decoders' 200-820 KiB buffers then come from the heaps. `mmap_threshold` fixes the threshold
(mallopt M_MMAP_THRESHOLD; DIMML_MALLOC_MMAP_THRESHOLD), at ~+10% CPU per decode; a 30-minute
soak with it set to 128 KiB still grew +0.91 MiB/min, so it is off by default.
Elsewhere than glibc (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

logger = logging.getLogger("bentoml.dimml")

M_MMAP_THRESHOLD = -3   # mallopt parameters (malloc.h)
M_ARENA_MAX = -8
_started = False


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> dict[str, int]:
    """glibc's mallinfo2, summed over the arenas (uordblks: in use, fordblks: free in the heaps,
    hblkhd / hblks: bytes / blocks mapped on their own); {} where glibc (>= 2.33) is missing."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = _Mallinfo2
    m = f()
    return {name: getattr(m, name) for name, _ in _Mallinfo2._fields_}


def arena_count() -> int:
    """Number of glibc malloc arenas (malloc_info's XML lists one <heap> per arena); -1 where missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.open_memstream.restype = ctypes.c_void_p
        buf, size = ctypes.c_char_p(), ctypes.c_size_t()
        stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        text = ctypes.string_at(buf, size.value).decode()
        libc.free(buf)
        return text.count("<heap nr=")
    except (OSError, AttributeError):
        return -1


def configure(arenas: int, trim_every_s: float, mmap_threshold: int = 0) -> bool:
    """Cap malloc's arenas at `arenas` (0: glibc's default), trim every `trim_every_s` seconds (0: never)
    and map blocks of `mmap_threshold` bytes or more on their own (0: glibc's moving threshold).
    Call early in a worker, before its thread pools start. True when glibc took the settings."""
    global _started
    libc = _libc()
    if libc is None:
        return False
    if arenas > 0 and libc.mallopt(M_ARENA_MAX, arenas) != 1:
        logger.warning("mallopt(M_ARENA_MAX, %d) refused", arenas)
    if mmap_threshold > 0 and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) refused (glibc takes at most 32 MiB)", mmap_threshold)
    if trim_every_s > 0 and not _started:
        _started = True

        def trim() -> None:
            stop = threading.Event()
            while not stop.wait(trim_every_s):
                libc.malloc_trim(0)

        threading.Thread(target=trim, daemon=True, name="malloc-trim").start()
    return True


__all__ = ["configure", "mallinfo", "arena_count"]

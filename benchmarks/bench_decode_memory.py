"""The decoders' memory alone: RSS of a process that decodes clips in a loop, by malloc setting.

    .venv/bin/python benchmarks/bench_decode_memory.py --minutes 4 --threads 4 --json decode_memory.json

Each variant runs in a fresh process with the API worker's default settings (serving/allocator.py:
2 arenas, malloc_trim every 10 s; FFmpeg's threads per decode: 1), then --threads threads decode the
soak's 3 s clip (the tiny bundle's preprocessing, dimml.predict.decode_files, as the API worker does per upload) in a closed
loop for --minutes, sampling the process's RSS every --sample-s seconds. Variants (--thresholds):
glibc's moving mmap threshold (the default) and a fixed threshold of 128 KiB. Reported
per variant: decodes, decodes/s, CPU ms per decode, RSS at the start / middle / end and the slope
over the second half (MiB per minute), and where the second half's growth went (malloc's heaps in
use and free, its mapped blocks, pymalloc's arenas). No server, no model: what grows here is the
decoders'.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_serving: shared set-up helpers
from bench_soak import SOAK_CLIP, slope_mib_per_min  # noqa: E402

from bench_serving import REPO, log, machine, make_bundle, make_clips  # noqa: E402

VARIANTS = {"moving threshold (glibc's)": 0, "fixed 128 KiB threshold": 128 * 1024}
MIB = 2**20


def pymalloc_arenas() -> float:
    """MiB of pymalloc arenas allocated now (sys._debugmallocstats, written to stderr by C code)."""
    import os
    import re

    with tempfile.TemporaryFile("w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read()
    arenas = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    size = re.search(r"(\d+) arenas \* (\d+) bytes/arena", text)
    if not arenas:
        return float("nan")
    per = int(size.group(2)) if size else 1 << 20
    return int(arenas.group(1).replace(",", "")) * per / MIB


def child(bundle: str, clip: str, threads: int, minutes: float, sample_s: float, mmap_threshold: int,
          modalities: str) -> dict:
    """Runs in the variant's own process: configure malloc, decode in a loop, sample RSS."""
    import os
    import threading

    import psutil

    sys.path.insert(0, str(REPO))
    from dimml.bundle import load_bundle
    from dimml.media import set_codec_threads
    from dimml.predict import decode_files
    from serving import allocator
    from serving.settings import Settings

    service = Settings()   # the API worker's defaults
    allocator.configure(service.malloc_arenas, service.malloc_trim_s, mmap_threshold)
    set_codec_threads(service.codec_threads)
    def where() -> dict[str, float]:
        """RSS split: malloc's heaps (in use, free), its mapped blocks, pymalloc's arenas (MiB)."""
        m = allocator.mallinfo()
        return {"rss": me.memory_info().rss / MIB, "heap_in_use": m["uordblks"] / MIB, "heap_free": m["fordblks"] / MIB,
                "mapped": m["hblkhd"] / MIB, "pymalloc_arenas": pymalloc_arenas()}
    cfg = load_bundle(bundle, checksums=False).preprocess
    if modalities != "all":   # one modality's decoder alone (bisecting what grows)
        from dimml.modalities import preprocess_for
        cfg = preprocess_for("tiny", modalities)
    me, done, stop = psutil.Process(), [0], threading.Event()

    def loop() -> None:
        while not stop.is_set():
            decode_files({"video": Path(clip)}, cfg)
            done[0] += 1   # a race between threads loses a count at worst

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    t0, c0 = time.perf_counter(), sum(os.times()[:2])
    for w in workers:
        w.start()
    samples = []
    while (elapsed := time.perf_counter() - t0) < minutes * 60:
        samples.append((elapsed, me.memory_info().rss / MIB, done[0], where()))   # (s, MiB, decodes, split)
        time.sleep(sample_s)
    stop.set()
    for w in workers:
        w.join()
    cpu = sum(os.times()[:2]) - c0
    return {"samples": samples, "decodes": done[0], "wall_s": time.perf_counter() - t0, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=4, help="decode threads (the service's DIMML_DECODE_THREADS)")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--thresholds", default=",".join(str(v) for v in VARIANTS.values()),
                    help="mmap thresholds to run, bytes (0: glibc's moving one) (%(default)s)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dimml-bench")
    ap.add_argument("--modalities", default="all", help="decode only these (e.g. audio or visual; default: the bundle's)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        bundle, clip, threads, minutes, sample_s, threshold, modalities = args.child
        print(json.dumps(child(bundle, clip, int(threads), float(minutes), float(sample_s), int(threshold), modalities)))
        return
    bundle = make_bundle("tiny", args.work)
    clip = make_clips(SOAK_CLIP, 4, args.work)[0]
    results = {"machine": machine(), "threads": args.threads, "minutes": args.minutes, "modalities": args.modalities,
               "variants": {}}
    names = {v: k for k, v in VARIANTS.items()}
    for threshold in (int(t) for t in args.thresholds.split(",")):
        name = names.get(threshold, f"fixed {threshold} B threshold")
        log(f"{name}: {args.threads} threads decoding {args.modalities} for {args.minutes} min")
        r = subprocess.run([sys.executable, __file__, "--child", str(bundle), str(clip), str(args.threads),
                            str(args.minutes), str(args.sample_s), str(threshold), args.modalities],
                           capture_output=True, text=True, check=True, cwd=REPO)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        t = [s[0] for s in out["samples"]]
        rss = [s[1] for s in out["samples"]]
        half = len(t) // 2
        figures = {"mmap_threshold": threshold, "decodes": out["decodes"],
                   "decodes_per_s": round(out["decodes"] / out["wall_s"], 2),
                   "cpu_ms_per_decode": round(1000 * out["cpu_s"] / max(1, out["decodes"]), 1),
                   "rss_mib": {"start": round(rss[0], 1), "middle": round(rss[half], 1), "end": round(rss[-1], 1)},
                   "slope_2nd_half_mib_per_min": round(slope_mib_per_min(t[half:], rss[half:]), 3), "samples": out["samples"]}
        results["variants"][name] = figures
        first, last = out["samples"][half][3], out["samples"][-1][3]
        figures["growth_2nd_half_mib"] = {k: round(last[k] - first[k], 2) for k in last}
        log(f"  2nd half growth by place (MiB): {figures['growth_2nd_half_mib']}")
        log(f"  {figures['decodes']} decodes ({figures['decodes_per_s']}/s, {figures['cpu_ms_per_decode']} CPU ms each), "
            f"RSS {figures['rss_mib']} MiB, 2nd half {figures['slope_2nd_half_mib_per_min']:+.3f} MiB/min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

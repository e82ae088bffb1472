"""`python -m training cache` / `dimml cache`: build the decode cache a `dimml train` would use, and stop.

    dimml cache --data DATA [--modalities audio,visual] [--preset tiny] [--cache-dir DIR] [--config FILE] [...]

It takes every `dimml train` option and resolves them exactly as `dimml train` does (one parser,
one TrainConfig, the trainer's own `prepare_data`), so the same command line with `cache` in
place of `train` builds the very entry that run will open; the options that do not change the
data (learning rate, epochs, method hyper-parameters...) change nothing here, and --out is not
needed. Use it to prebuild the cache of each node before a multi-node run, or of a shared
cache folder once. It prints the entry's folder and the split sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def register(subparsers) -> None:
    from training.fit_cmd import add_config_options
    p = subparsers.add_parser("cache", help="build the decode cache `dimml train` with the same options uses",
                              description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p, "accepted and ignored (so a `dimml train` command line works as it is)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    from training.config_file import dump
    from training.fit_cmd import config_from_args
    from training.trainer import prepare_data
    try:
        cfg = config_from_args(args, required=("data",)).resolve()
        if args.print_config:
            print(dump(dataclasses.asdict(cfg)))
            return 0
        t0 = time.monotonic()
        data = prepare_data(cfg, cfg.preprocess_config(), progress=not args.no_progress)
    except (ValueError, FileNotFoundError, OSError) as e:   # includes DatasetError: the user's input or disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{s} {n}" for s, n in data.sizes.items())
    print(f"{data.cache.directory} ({len(data.cache)} rows; {sizes}; {time.monotonic() - t0:.1f} s)")
    return 0

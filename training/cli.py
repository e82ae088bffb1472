"""`python -m training` / `dimml-train`: the training-side commands.

Bad input ends a command with one `error: ...` line and exit code 2 (DIMML_DEBUG=1 shows the
traceback). Each command lives in its own module exposing `register(subparsers)`, which adds an
argparse sub-parser whose `func(args) -> int` runs it. Modules are imported lazily so that a
light command (inspect) does not pay for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> module that registers it
COMMANDS: dict[str, str] = {
    "synth": "training.synth",
    "inspect": "training.inspect_cmd",
    "fit": "training.fit_cmd",
    "evaluate": "training.fit_cmd",
    "cache": "training.cache_cmd",
    "compare": "training.compare",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimml-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = [a for a in argv if a in COMMANDS][:1]
    # Import only the module of the command given (all of them for --help or no command).
    modules = {COMMANDS[w] for w in wanted} or set(COMMANDS.values())
    for mod in dict.fromkeys(COMMANDS.values()):
        if mod not in modules:
            continue
        try:
            importlib.import_module(mod).register(sub)
        except ModuleNotFoundError as e:
            if e.name != mod:   # a real missing dependency, not a command not written yet
                raise
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run a command; `prog` names it in usage and errors (`dimml train` runs `fit` with prog 'dimml train')."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    from dimml.cli import parse_args
    args = parse_args(parser, argv, prog)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # bad input (unknown method, missing files, undecodable media...): one line, no traceback
        if os.environ.get("DIMML_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`dimml`: one command line for training, export, serving and scoring.

    dimml train --data DATA --out RUN [--config run.yaml] [--print-config] [...]   (python -m training fit)
    dimml cache --data DATA [...]: the decode cache `dimml train [...]` uses      (python -m training cache)
    dimml evaluate | compare | synth | inspect ...                                (python -m training ...)
    dimml export --run RUN --out BUNDLE | verify BUNDLE --data DATA | register     (python -m export ...)
    dimml score INPUT... --out results.csv (--bundle B | --server URL) | predict  (python -m clients ...)
    dimml serve [BUNDLE] [--port 3000]                                            (bentoml serve)

Each command is the existing parser of its package, imported only when that command runs, so
`dimml --help` and the light commands need none of torch, BentoML or ONNX Runtime; a command
whose extra is not installed says which `pip install 'dimml[...]'` adds it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from dimml.extras import MissingExtra, check


@dataclass(frozen=True)
class Command:
    """A `dimml` command: the CLI module whose main(argv, prog=) runs it, its name there, what it needs."""

    module: str
    name: str
    help: str
    needs: tuple[str, ...] = ()   # top-level modules it imports
    extra: str | None = None      # the extra installing them (default: each module's, dimml.extras)


TRAIN_NEEDS = ("torch", "matplotlib")
COMMANDS: dict[str, Command] = {
    "train": Command("training.cli", "fit", "train a method into a run folder (flags and/or --config FILE)",
                     TRAIN_NEEDS),
    "cache": Command("training.cli", "cache", "build the decode cache `dimml train` with the same options uses "
                                             "(prebuild it per node)", ("torch",), "train"),
    "evaluate": Command("training.cli", "evaluate", "re-evaluate a finished run", TRAIN_NEEDS),
    "compare": Command("training.cli", "compare", "train several methods under one budget and tabulate them",
                       TRAIN_NEEDS),
    "synth": Command("training.cli", "synth", "write a synthetic corpus of real media files"),
    "inspect": Command("training.cli", "inspect", "show what a media file decodes to, or why it cannot"),
    "export": Command("export.cli", "bundle", "export a finished run to a model bundle (ONNX, TensorRT)",
                      ("torch", "onnx", "onnxscript"), "export"),
    "verify": Command("export.cli", "verify", "check a bundle's engines against PyTorch on real clips",
                      ("torch", "onnx", "onnxruntime"), "export,cpu"),
    "register": Command("export.cli", "register", "store a bundle in the BentoML model store", ("bentoml",)),
    "score": Command("clients.cli", "score", "score folders or manifests into a CSV / JSONL file "
                                             "(--bundle locally or --server URL)", ("httpx",)),
    "predict": Command("clients.cli", "predict", "classify one sample and print the answer as JSON", ("httpx",)),
    "serve": Command("dimml.cli", "serve", "serve a bundle over HTTP (bentoml serve serving.service:DIMML)",
                     ("bentoml",)),
}


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    try:
        from importlib.metadata import version as dist_version
        return dist_version("dimml")
    except Exception:   # running from a source tree that was never installed
        from dimml import __version__
        return __version__


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    """parser.parse_args(argv), its sub-command's usage and errors named `prog` when given (dimml CLI)."""
    if prog and argv:
        set_prog(parser, argv[0], prog)
    return parser.parse_args(argv)


def set_prog(parser: argparse.ArgumentParser, command: str, prog: str) -> None:
    """Name a sub-command's parser `prog` (e.g. 'dimml train' for training's 'fit') in usage and errors."""
    for action in parser._actions:   # argparse keeps sub-parsers in a private action; stable since 3.2
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            action.choices[command].prog = prog


def top_parser() -> argparse.ArgumentParser:
    """`dimml --help`: every command listed, none imported."""
    p = argparse.ArgumentParser(prog="dimml", description=__doc__.splitlines()[0],
                                epilog="`dimml COMMAND --help` shows a command's options.")
    p.add_argument("--version", action="version", version=f"dimml {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, c in COMMANDS.items():
        sub.add_parser(name, help=c.help, add_help=False)
    return p


# ---------------------------------------------------------------------------------------
# dimml serve

def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dimml serve", description="Serve a bundle with `bentoml serve serving.service:DIMML`.",
        epilog="Other DIMML_* settings (serving/README.md) pass through the environment; arguments after "
               "`--` go to bentoml serve as they are.")
    p.add_argument("bundle", nargs="?", default=None,
                   help="bundle folder or BentoML model tag (default: $DIMML_BUNDLE)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--host", default=None, help="address to bind (default: bentoml's, 0.0.0.0)")
    p.add_argument("--backend", default=None, help="inference backend (sets DIMML_BACKEND; default auto)")
    return p


def serve_command(args: argparse.Namespace, extra: list[str] | tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The `bentoml serve` command line and environment for `dimml serve` arguments (`extra`: after `--`)."""
    env = dict(os.environ)
    if args.bundle:
        path = Path(args.bundle)
        env["DIMML_BUNDLE"] = str(path.resolve()) if path.exists() else args.bundle   # else a model tag
    if not env.get("DIMML_BUNDLE"):
        raise ValueError("no bundle: give BUNDLE (a bundle folder or model tag) or set DIMML_BUNDLE")
    if args.backend:
        env["DIMML_BACKEND"] = args.backend
    exe = Path(sys.executable).parent / "bentoml"
    cmd = [str(exe) if exe.exists() else (shutil.which("bentoml") or "bentoml"), "serve", "serving.service:DIMML",
           "--port", str(args.port)]
    if args.host:
        cmd += ["--host", args.host]
    return cmd + list(extra), env


def main_serve(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    cmd, env = serve_command(serve_parser().parse_args(argv[:cut]), argv[cut + 1:])
    os.execve(cmd[0], cmd, env)   # bentoml owns the process from here: signals reach it directly


# ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else None
    if name not in COMMANDS:   # --help, --version, nothing or a typo: the top-level parser answers
        top_parser().parse_args(argv)
        return 2
    cmd, rest = COMMANDS[name], argv[1:]
    prog = f"dimml {name}"
    try:
        check(*cmd.needs, what="this command", extra=cmd.extra)
        if name == "serve":
            return main_serve(rest)
        import importlib
        module = importlib.import_module(cmd.module)
        return int(module.main([cmd.name, *rest], prog=prog) or 0)
    except (MissingExtra, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

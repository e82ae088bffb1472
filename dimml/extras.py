"""Optional dependencies: which extra installs a module, and one error line naming the install command.

    torch = require("torch", "train")          # -> the module, or MissingExtra:
    # error: dimml train needs torch, which is not installed: pip install 'dimml[train]'

Used where an optional package is first needed (the `dimml` CLI's commands, the engines' backend
choice), so a slim install (e.g. `dimml[serve,cpu]`) fails with the fix, not a traceback.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

# module -> the extra that installs it
EXTRA_OF: dict[str, str] = {
    "torch": "train", "matplotlib": "train", "yaml": "train",
    "onnx": "export", "onnxscript": "export",
    "onnxruntime": "cpu",          # or gpu: see install_hint
    "bentoml": "serve", "httpx": "client", "ray": "ray",
    "tensorboard": "tensorboard", "tensorrt": "tensorrt",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip command that adds it."""


def install_hint(extra: str) -> str:
    """The pip command installing an extra (ONNX Runtime: the CPU or the CUDA build)."""
    if extra in ("cpu", "gpu"):
        return "pip install 'dimml[cpu]' (or 'dimml[gpu]' for the CUDA build)"
    return f"pip install 'dimml[{extra}]'"


def missing(*modules: str) -> list[str]:
    """Which of the top-level modules cannot be found (without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]


def check(*modules: str, what: str, extra: str | None = None) -> None:
    """Raise MissingExtra naming the extra (given, else each module's) that installs what is missing."""
    gone = missing(*modules)
    if gone:
        extras = [extra] if extra else list(dict.fromkeys(EXTRA_OF.get(m.split(".")[0], m) for m in gone))
        hint = install_hint(extras[0]) if len(extras) == 1 else f"pip install 'dimml[{','.join(extras)}]'"
        raise MissingExtra(f"{what} needs {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} "
                           f"not installed: {hint}")


def require(module: str, extra: str | None = None, *, what: str | None = None) -> ModuleType:
    """Import a module of an optional dependency, or raise MissingExtra with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name not in (module, top):   # installed, but broken inside: not a missing extra
            raise
        extra = extra or EXTRA_OF.get(top, top)
        raise MissingExtra(f"{what or 'this'} needs {top}, which is not installed: {install_hint(extra)}") from None


def onnxruntime_conflict() -> str:
    """'' normally; a warning when both ONNX Runtime wheels are installed (they overwrite each other's
    files, and the CUDA provider can vanish: a GPU box then silently serves on the CPU)."""
    have = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            have.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(have) < 2:
        return ""
    return ("both onnxruntime and onnxruntime-gpu are installed and overwrite each other; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'dimml[gpu]' (or 'dimml[cpu]')")


__all__ = ["MissingExtra", "require", "check", "missing", "install_hint", "onnxruntime_conflict", "EXTRA_OF"]

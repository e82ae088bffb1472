"""Training methods behind one registry: `get_method(name)` -> a Method subclass.

Every module of this package is imported here and registers its methods with
`@register`, so adding a method is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from training.methods.base import REGISTRY, Batch, Context, HParams, Method, StepResult, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "get_method", "Method", "HParams", "Batch", "StepResult", "Context", "register"]

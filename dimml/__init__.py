"""dimml: Detached and Interactive Multimodal Learning, from media files to a served model.

The `dimml` package holds what training, export, serving and scoring share: the
preprocessing config, media decoding, certainty-aware weighting and the bundle format.
"""
__version__ = "0.1.0"

# The Python API, imported on first use so that `import dimml` stays light (no numpy, ONNX Runtime
# or PyAV until a Predictor is asked for).
_LAZY = {"Predictor": "dimml.predict", "Prediction": "dimml.prediction", "BranchResult": "dimml.prediction",
         "load_bundle": "dimml.bundle"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """`dimml.Predictor`, `dimml.Prediction`, ... from their modules, on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dimml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

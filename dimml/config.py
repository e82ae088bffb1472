"""The preprocessing config lives with the modality specs (dimml.modalities); this name stays for imports."""
from dimml.modalities import PreprocessConfig, preprocess_for

__all__ = ["PreprocessConfig", "preprocess_for"]

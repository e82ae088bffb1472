"""dimml: Detached and Interactive Multimodal Learning, from media files to a served model.

The `dimml` package holds what training, export, serving and scoring share: the
preprocessing config, media decoding, certainty-aware weighting and the bundle format.
"""
__version__ = "0.1.0"

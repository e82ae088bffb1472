"""Typed prediction results: `Prediction` lives in the core (dimml.prediction), so the HTTP client
and the local `dimml.Predictor` return the same type; this module keeps the old import path."""
from dimml.prediction import FUSION, BranchResult, Prediction, branch_names

__all__ = ["BranchResult", "Prediction", "FUSION", "branch_names"]

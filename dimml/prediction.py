"""Typed prediction results: what `dimml.Predictor.predict` and the HTTP client (`clients.Client`) return.

Parsed from the JSON that `dimml.predict.Predictor` and the server produce (no third-party imports).

The wire format (one dict per sample):
    {"label": str, "probabilities": {class: p},
     "branches": {<modality> | "fusion": {"probabilities": {class: p}, "certainty": c, "weight": w}},
     "modalities_used": [<modality>, ...], "model": {"name": str, "version": str, "precision": str},
     "backend": str, "final_output": {"rule": str, "reason": str}, "warnings": ["<file>: <what is wrong>", ...]}
The branches are the model's modalities (e.g. audio, visual; front, rear) plus its fusion head.
A sample missing a modality is answered by the branches it has (no fusion), so `branches` may
hold fewer entries. `final_output` names the rule that answered (the bundle's final output: the
paper's weighting "paper-lw", the "fitted" weighting, the "fusion" head or a modality's head) and
why. `warnings` names damage the decoder found in the sample's files (frames it
flagged as damaged, a stream far shorter than its file declares): the answer is given, but from
damaged input; it is empty for a clean file (and absent from answers of older servers).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The vocabulary of answers, defined here once: the fusion head is "fusion" (its branch in answers,
# its module in bundles and runs, its row in reports); the final output (what answers: the rule the
# run chose) is "final" in reports.
FUSION = "fusion"
FINAL = "final"


def branch_names(modalities) -> tuple[str, ...]:
    """The branches of a model with these modalities, in answer order: the modalities, then fusion."""
    return (*modalities, FUSION)


@dataclass(frozen=True)
class BranchResult:
    """One branch's view of a clip: its class probabilities, certainty (max p) and fusion weight."""

    probabilities: dict[str, float]
    certainty: float
    weight: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BranchResult:
        return cls({str(k): float(v) for k, v in d["probabilities"].items()},
                   float(d["certainty"]), float(d["weight"]))


@dataclass(frozen=True)
class Prediction:
    """A model's answer for one sample."""

    label: str
    probabilities: dict[str, float]
    branches: dict[str, BranchResult]
    modalities_used: tuple[str, ...]
    model_name: str = ""
    model_version: str = ""
    model_precision: str = ""        # the graphs that answered: fp32 | int8 | TensorRT's (older servers: "")
    backend: str = ""
    warnings: tuple[str, ...] = ()   # damage found while decoding the sample's files; () when clean
    final_output: str = ""           # the rule that answered (older servers: "")
    final_output_reason: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def confidence(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label]

    def weight(self, branch: str) -> float | None:
        """The branch's fusion weight, None when the branch did not take part."""
        b = self.branches.get(branch)
        return None if b is None else b.weight

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Prediction:
        """Parse the wire format; a malformed answer raises ValueError saying what is wrong."""
        try:
            model = d.get("model") or {}
            pred = cls(label=str(d["label"]),
                       probabilities={str(k): float(v) for k, v in d["probabilities"].items()},
                       branches={str(k): BranchResult.from_dict(v) for k, v in (d.get("branches") or {}).items()},
                       modalities_used=tuple(str(m) for m in d.get("modalities_used") or ()),
                       model_name=str(model.get("name", "")), model_version=str(model.get("version", "")),
                       model_precision=str(model.get("precision", "")), backend=str(d.get("backend", "")),
                       warnings=tuple(str(w) for w in d.get("warnings") or ()),
                       final_output=str((d.get("final_output") or {}).get("rule", "")),
                       final_output_reason=str((d.get("final_output") or {}).get("reason", "")), raw=dict(d))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"malformed prediction ({type(e).__name__}: {e}): {str(dict(d))[:300]}") from None
        if pred.label not in pred.probabilities:
            raise ValueError(f"malformed prediction: label {pred.label!r} has no probability")
        return pred

    def to_dict(self) -> dict[str, Any]:
        """Back to the wire format."""
        return {"label": self.label, "probabilities": dict(self.probabilities),
                "branches": {k: {"probabilities": dict(b.probabilities), "certainty": b.certainty,
                                 "weight": b.weight} for k, b in self.branches.items()},
                "modalities_used": list(self.modalities_used),
                "model": {"name": self.model_name, "version": self.model_version,
                          **({"precision": self.model_precision} if self.model_precision else {})},
                "backend": self.backend,
                "final_output": {"rule": self.final_output, "reason": self.final_output_reason},
                "warnings": list(self.warnings)}


__all__ = ["BranchResult", "Prediction", "FUSION", "FINAL", "branch_names"]

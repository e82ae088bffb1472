"""The service's answers as pydantic models, so BentoML's /docs.json documents every field.

The JSON is the one dimml.predict.Predictor.format writes (and dimml.prediction.Prediction
reads); these models only describe it: validating an answer dict and dumping it gives the
same keys, in the same order, with the same values.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Statuses a refused upload gets, with when (the `cause` codes are serving/README.md's table).
ERROR_STATUSES: dict[int, str] = {
    400: "Bad request: no file, a file field sent as text (`not_a_file`), a file in an unknown field "
         "(`unknown_field`), or a malformed multipart body (`bad_request`).",
    413: "Too large: the body exceeds DIMML_MAX_UPLOAD_MB (`too_large`), or a field holds more files "
         "than it takes (`too_many_files`).",
    415: "Unsupported media type: the request is not multipart/form-data (`unsupported_media_type`).",
    422: "Unprocessable media: the file cannot be decoded into the model's inputs (`empty`, `not_media`, "
         "`undecodable`, `no_audio`, `no_video`, `too_long`, `too_large`).",
    503: "Unavailable, retry after the Retry-After header's seconds: the model process is restarting, or "
         "the model cannot take the clip within DIMML_MAX_LATENCY_MS (`unavailable`). Nothing was answered: "
         "sending the request again is safe.",
}


class BranchAnswer(BaseModel):
    """One branch (a modality's head, or the fusion head) on one sample."""

    probabilities: dict[str, float] = Field(description="the branch's softmax over the classes, by class name")
    certainty: float = Field(description="the branch's certainty (DI-MML Eq. 8): the largest probability")
    weight: float = Field(description="the branch's weight in the answer's combined logits "
                                      "(the bundle's output rule); the weights sum to 1")


class ModelInfo(BaseModel):
    """Which model answered."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="the bundle's name")
    version: str = Field(description="the bundle's version (a content hash)")
    precision: str | None = Field(default=None, description="the precision of the graphs that answered: fp32, "
                                  "int8 (a quantized bundle on onnxruntime-cpu) or a TensorRT engine's fp16")


class FinalOutput(BaseModel):
    """Which rule made the answer's probabilities, and why."""

    rule: str = Field(description="paper-lw (DI-MML's certainty-aware weighting, Eq. 8-9), fitted (the weighting "
                                  "with fitted per-branch priors), fusion (the fusion head) or a modality's head")
    reason: str = Field(description="why: the validation choice made when the run was trained, or that a head "
                                    "rule's head needed a missing modality (then the weighting answers)")


class Answer(BaseModel):
    """A prediction for one sample."""

    label: str = Field(description="the predicted class: the most probable one")
    probabilities: dict[str, float] = Field(
        description="softmax of the weighted logits sum_i w_i z_i over the branches, by class name")
    branches: dict[str, BranchAnswer] = Field(
        description="each branch that took part, by name: the modalities present, then 'fusion' "
                    "(only when every modality is present)")
    modalities_used: list[str] = Field(description="the modalities found in the upload, in the model's order")
    model: ModelInfo = Field(description="the bundle that answered")
    backend: str = Field(description="the inference backend, e.g. onnxruntime-cpu, onnxruntime-cuda, tensorrt")
    final_output: FinalOutput = Field(description="the rule that answered: the bundle's final output, chosen "
                                                  "on validation when the run was trained")
    warnings: list[str] = Field(default_factory=list, description=(
        "damage the decoder found in the uploaded files, one '<file>: <what>' each (frames it flagged as "
        "damaged, a stream far shorter than the file declares): the answer comes from damaged input. "
        "Empty for a clean file"))


class ErrorBody(BaseModel):
    """A refused request (4xx), or a file of a batch that could not be answered."""

    error: str = Field(description="what is wrong, naming the file (e.g. \"videos[2] 'c.webm'\") and the cause")
    cause: str = Field(description="a machine-readable cause code, e.g. not_media, too_long, too_large")


class ItemError(ErrorBody):
    """/predict_batch: the slot of a file that could not be answered (the others hold answers)."""

    status: int = Field(description="the HTTP status this file alone would have got from /predict (4xx)")


BatchItem = Answer | ItemError


__all__ = ["Answer", "FinalOutput", "BranchAnswer", "ModelInfo", "ErrorBody", "ItemError", "BatchItem", "ERROR_STATUSES"]

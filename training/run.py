"""A finished run on disk: what training writes and export/evaluation read back.

RUN/
  config.json   resolved configuration (method, preset, preprocess with the modality specs, model, classes,
                hyper-parameters)
  model.pt      final weights of the exported modules {<modality>: branch, ..., "fusion": head}
  report.json   test metrics, every candidate output and the final output chosen (written by evaluation;
                older reports are read in today's vocabulary by upgrade_report)
Runs written before modalities were declared (a flat audio+visual preprocess dict, a model config
without modalities, fusion parameters named for audio/visual) load as audio+visual.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dimml.config import PreprocessConfig
from dimml.fileio import atomic_path, atomic_write_json
from dimml.prediction import FINAL
from dimml.weighting import OutputRule
from training.models import FUSION, FUSION_HEADS, ModelConfig, MultiModel, build_model

CONFIG, WEIGHTS, REPORT = "config.json", "model.pt", "report.json"


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save through a temp file + os.replace (a kill mid-write leaves the old file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Run:
    """A loaded run: configuration plus its modules in eval mode on the CPU."""

    path: Path
    config: dict[str, Any]
    model: MultiModel
    model_cfg: ModelConfig
    preprocess: PreprocessConfig
    classes: list[str]
    report: dict[str, Any] | None

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def lw_temperature(self) -> float:
        """Certainty-weighting temperature: the report's (fitted or configured), else the configured."""
        t = (self.report or {}).get("final_output", {}).get("lw_temperature")
        return float(t if t is not None else self.config.get("lw_temperature") or 1.0)

    @property
    def final_output(self) -> OutputRule:
        """The final output chosen at evaluation; a run without a report: the paper's weighting."""
        if self.report:
            return OutputRule.from_dict(self.report["final_output"]["rule"])
        return OutputRule.paper(self.lw_temperature)


def upgrade_report(report: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A report in today's vocabulary: older ones keyed the fusion head "fused", the final output
    "weighted" (when it was not the fusion head), and kept the choice in "primary" / "output" /
    "output_rule" (or, the oldest, only "primary" or the config's "inference")."""
    if "final_output" in report:
        return report
    r = dict(report)
    metrics = dict(r.get("metrics") or {})
    if "fused" in metrics:
        metrics[FUSION] = metrics.pop("fused")
    weighted = metrics.pop("weighted", None)
    primary = r.pop("primary", (config or {}).get("inference", "weighted"))
    t = r.pop("lw_temperature", None)
    facts = dict(r.pop("output", None) or {})
    rule = r.pop("output_rule", None) or OutputRule.legacy(primary, float(t or (config or {}).get("lw_temperature")
                                                                             or 1.0)).to_dict()
    metrics[FINAL] = weighted if weighted is not None else metrics.get(FUSION)
    facts.setdefault("chosen", rule["name"])
    facts.setdefault("reason", "")
    facts.update(rule=rule, lw_temperature=facts.get("lw_temperature", t),
                 lw_temperature_source=facts.get("lw_temperature_source", r.pop("lw_temperature_source", None)))
    r.pop("lw_temperature_source", None)
    return {**r, "metrics": metrics, "final_output": facts}


def save_run_model(run_dir: Path, config: dict[str, Any], model: MultiModel) -> None:
    """Write config.json and model.pt (config first: weights without a config are useless)."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG, config)
    atomic_torch_save(run_dir / WEIGHTS, {k: m.state_dict() for k, m in model.modules().items()})


def run_config_fields(preprocess: PreprocessConfig, model_cfg: ModelConfig, classes: list[str]) -> dict[str, Any]:
    """The config.json entries every run must have for export and evaluation to rebuild it."""
    return {"preprocess": preprocess.to_dict(), "model": asdict(model_cfg), "classes": list(classes)}


def legacy_fusion_state(fusion: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fusion head's state saved before heads took M inputs, under today's parameter names."""
    renames = FUSION_HEADS[fusion].legacy_keys
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def load_run(run_dir: str | Path) -> Run:
    """Rebuild a run's modules from RUN/config.json and RUN/model.pt."""
    run_dir = Path(run_dir)
    for name in (CONFIG, WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir}: not a finished run ({name} missing)")
    config = json.loads((run_dir / CONFIG).read_text())
    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    legacy = not config["model"].get("modalities")
    model_cfg = ModelConfig.from_dict(config["model"], preprocess)
    model = build_model(model_cfg, preprocess)
    state = torch.load(run_dir / WEIGHTS, map_location="cpu", weights_only=True)
    missing = set(model.modules()) - set(state)
    if missing:
        raise ValueError(f"{run_dir / WEIGHTS}: no weights for {sorted(missing)} (it holds {sorted(state)})")
    for key, module in model.modules().items():
        weights = state[key]
        if legacy and key == FUSION:
            weights = legacy_fusion_state(model_cfg.fusion, weights)
        module.load_state_dict(weights)
    report = read_report(run_dir, config)
    return Run(run_dir, config, model.eval(), model_cfg, preprocess, list(config["classes"]), report)


def read_report(run_dir: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """RUN/report.json in today's vocabulary (upgrade_report), or None when the run has none yet."""
    path = Path(run_dir) / REPORT
    return upgrade_report(json.loads(path.read_text()), config) if path.is_file() else None

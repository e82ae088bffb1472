"""A finished run on disk: what training writes and export/evaluation read back.

RUN/
  config.json   resolved configuration (method, preset, preprocess, model, classes, hyper-parameters)
  model.pt      final weights of the three exported modules {"audio", "visual", "fusion"}
  report.json   test metrics and the certainty-weighting temperature (written by evaluation)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dimml.config import PreprocessConfig
from dimml.fileio import atomic_path, atomic_write_json
from training.models import AVModel, ModelConfig, build_av_model

CONFIG, WEIGHTS, REPORT = "config.json", "model.pt", "report.json"


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save through a temp file + os.replace (a kill mid-write leaves the old file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Run:
    """A loaded run: configuration plus the three modules in eval mode on the CPU."""

    path: Path
    config: dict[str, Any]
    model: AVModel
    model_cfg: ModelConfig
    preprocess: PreprocessConfig
    classes: list[str]
    report: dict[str, Any] | None

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def lw_temperature(self) -> float:
        """Certainty-weighting temperature: the fitted one from the report, else the configured."""
        if self.report and self.report.get("lw_temperature") is not None:
            return float(self.report["lw_temperature"])
        return float(self.config.get("lw_temperature") or 1.0)


def save_run_model(run_dir: Path, config: dict[str, Any], model: AVModel) -> None:
    """Write config.json and model.pt (config first: weights without a config are useless)."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG, config)
    atomic_torch_save(run_dir / WEIGHTS, {k: m.state_dict() for k, m in model.modules().items()})


def run_config_fields(preprocess: PreprocessConfig, model_cfg: ModelConfig, classes: list[str]) -> dict[str, Any]:
    """The config.json entries every run must have for export and evaluation to rebuild it."""
    return {"preprocess": preprocess.to_dict(), "model": asdict(model_cfg), "classes": list(classes)}


def load_run(run_dir: str | Path) -> Run:
    """Rebuild a run's modules from RUN/config.json and RUN/model.pt."""
    run_dir = Path(run_dir)
    for name in (CONFIG, WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir}: not a finished run ({name} missing)")
    config = json.loads((run_dir / CONFIG).read_text())
    m = dict(config["model"])
    m["widths"], m["blocks"] = tuple(m["widths"]), tuple(m["blocks"])
    model_cfg = ModelConfig(**m)
    model = build_av_model(model_cfg)
    state = torch.load(run_dir / WEIGHTS, map_location="cpu", weights_only=True)
    for key, module in model.modules().items():
        module.load_state_dict(state[key])
    report = json.loads((run_dir / REPORT).read_text()) if (run_dir / REPORT).is_file() else None
    return Run(run_dir, config, model.eval(), model_cfg,
               PreprocessConfig.from_dict(config["preprocess"]), list(config["classes"]), report)

"""`dimml train --config FILE`: a TrainConfig from a YAML or JSON file, checked field by field.

The file holds TrainConfig fields (`method: dimml`, `epochs: 30`, `hparams: {lambda_d: 0.5}`,
`preprocess: {visual.num_frames: 3}` or nested `preprocess: {visual: {num_frames: 3}}`), or is a
run's RUN/config.json as it is (the resolved TrainConfig under "train"; the rest is ignored).
Relative paths in it are relative to the working directory, as on the command line. Command-line
flags override the file. An unknown key or a value of the wrong type raises ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

DICT_FIELDS = ("hparams", "preprocess")


def read_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml or .json file (JSON is YAML too: either parser reads either)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    else:
        from dimml.extras import require
        yaml = require("yaml", "train", what="a YAML --config")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
    return data


def _flatten(prefix: str, d: dict) -> dict[str, Any]:
    """{"visual": {"num_frames": 3}} -> {"visual.num_frames": 3}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(key + ".", v))
        else:
            out[key] = v
    return out


def _allowed(annotation) -> tuple[type, ...]:
    """The Python types a TrainConfig annotation accepts ('int | None' -> (int, NoneType))."""
    hint = eval(annotation, {}) if isinstance(annotation, str) else annotation   # noqa: S307 (our own annotations)
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return tuple(type(None) if a is None else a for a in args)


def check_value(name: str, value: Any, annotation) -> Any:
    """The value if it fits the field's type (an int is a valid float); else ValueError naming the field."""
    allowed = _allowed(annotation)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):   # bool is an int in Python: accept it only where a bool is meant
        if bool in allowed:
            return value
    elif float in allowed and isinstance(value, (int, float)):
        return value if int in allowed else float(value)
    elif any(t not in (bool, type(None)) and isinstance(value, t) for t in allowed):
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"{name} must be {names}, got {value!r}")




def config_values(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A file's mapping -> TrainConfig keyword arguments, each key and value checked."""
    from training.config import RENAMED, TrainConfig

    if isinstance(data.get("train"), dict):   # a RUN/config.json: the resolved TrainConfig is under "train"
        data = data["train"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = RENAMED.get(key, key)
        f = fields.get(key)
        if f is None:
            close = [n for n in fields if n.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else f" (TrainConfig fields: {', '.join(fields)})"
            raise ValueError(f"{source}: unknown key {key!r}{hint}")
        if key in DICT_FIELDS:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be a mapping, got {value!r}")
            out[key] = _flatten("", value) if key == "preprocess" else dict(value)
        else:
            try:
                out[key] = check_value(key, value, f.type)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
    return out


def merge(file_values: dict[str, Any], flags: dict[str, Any], hparams: dict, preprocess: dict) -> dict[str, Any]:
    """TrainConfig keyword arguments: the file's, then the flags given (not None), then --set items."""
    out = dict(file_values)
    out.update({k: v for k, v in flags.items() if v is not None})
    out["hparams"] = {**file_values.get("hparams", {}), **hparams}
    out["preprocess"] = {**file_values.get("preprocess", {}), **preprocess}
    return out


def dump(values: dict[str, Any]) -> str:
    """A resolved TrainConfig as the text --print-config shows (JSON: readable back by --config)."""
    return json.dumps(values, indent=2)

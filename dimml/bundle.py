"""The exported-model bundle: one folder that serving and scoring load, checked on every load.

BUNDLE/ (schema 2; one branch per modality of the run, in its order)
  manifest.json      schema version, classes, preprocessing (the modality specs), modalities,
                     source fields, the output rule (`output`: dimml.weighting.OutputRule.to_dict(),
                     the answer serving and scoring give), model facts, versions, sha256 of every file
  <name>.onnx        one per modality: `<kind's onnx input>` [B, *spec.shape] (spec.dtype; uint8
                     kinds are cast inside the graph) -> features [B, D], logits [B, K]
  fusion.onnx        <name>_features [B, D] per modality, in order -> logits [B, K]
  torch/             <module>.pt2: the same modules as `torch.export` programs (dynamic batch),
                     the PyTorch fallback and the reference `python -m export verify` compares
                     against; the run's config.json (+ report.json) for provenance
  tensorrt/          optional engines, one per module, named by TensorRT version and GPU
  int8/              optional: <module>.onnx quantized by ONNX Runtime (static QDQ, per-channel int8
                     weights) for the CPU, beside the fp32 graphs; the manifest's `int8` entry records
                     the calibration set and the accuracy check against fp32 (export/quantize.py)

`module_io(preprocess)` is the one place the graphs' input and output names are derived.
Schema-1 bundles (audio.onnx, visual.onnx, fusion.onnx with a flat audio+visual preprocessing
dict) still load: their names are exactly what module_io gives for audio,visual. They hold no
torch programs, so they run on ONNX Runtime or TensorRT only.

A bundle is either this folder or a model in the BentoML model store (`register_bundle`),
named by its tag "name:version"; `load_bundle` takes either. Light on imports (json, hashlib):
serving imports it before deciding which inference backend to load.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dimml.config import PreprocessConfig
from dimml.fileio import atomic_write_json
from dimml.prediction import FUSION

if TYPE_CHECKING:
    from dimml.weighting import OutputRule

MANIFEST = "manifest.json"
FORMAT = "dimml-bundle"
SCHEMA_VERSION = 2   # bump on any change a loader of the old version would misread
READABLE_SCHEMAS = (1, 2)
BRANCH_OUTPUTS = ("features", "logits")
FUSION_OUTPUTS = ("logits",)
FP32, INT8 = "fp32", "int8"   # the ONNX graphs' precisions: the fp32 ones always, int8 optional
REQUIRED = {
    1: ("schema_version", "format", "name", "version", "classes", "modalities", "preprocess",
        "feature_dim", "num_frames", "fusion", "lw_temperature", "onnx", "files"),
    2: ("schema_version", "format", "name", "version", "classes", "modalities", "fields", "preprocess",
        "feature_dim", "fusion", "lw_temperature", "onnx", "files"),
}
# BentoML model names: lowercase letters, digits, and . _ - inside
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class BundleError(ValueError):
    """A bundle that cannot be used: missing, tampered, incomplete or of another schema version."""


IO = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


def module_io(preprocess: PreprocessConfig) -> IO:
    """module -> (input names, output names): the contract between export and every engine.

    One branch per modality (input: its kind's onnx_input; outputs features, logits) and the
    fusion head (inputs `<name>_features` in model order; output logits).
    """
    io: IO = {s.name: ((s.onnx_input,), BRANCH_OUTPUTS) for s in preprocess.modalities}
    io[FUSION] = (tuple(f"{n}_features" for n in preprocess.names), FUSION_OUTPUTS)
    return io


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_name(text: str) -> str:
    """A valid BentoML model name from free text (a run folder name): lowercase, '-' for others."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:63].strip("-._")
    return name or "dimml-model"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise BundleError(f"invalid model name {name!r}: use lowercase letters, digits and . _ - "
                          "(starting and ending with a letter or digit, at most 63 characters)")
    return name


def _safe_relpath(bundle: Path, rel: str) -> Path:
    """A manifest path, refused if it could point outside the bundle folder."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
        raise BundleError(f"{bundle / MANIFEST}: file entry {rel!r} points outside the bundle")
    return bundle / p


def list_files(folder: Path) -> list[str]:
    """Every file under folder except the manifest, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, _, filenames in os.walk(folder):
        for n in filenames:
            rel = Path(dirpath, n).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str | os.PathLike, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in folder, add schema/version fields, write manifest.json atomically.

    `version` is a short digest of the checksums, so two bundles with the same files have
    the same version and any change to a file gives a new one.
    """
    folder = Path(folder)
    files = {rel: {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
             for rel in list_files(folder)}
    digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()},
                                       sort_keys=True).encode()).hexdigest()
    manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT, **fields,
                "version": digest[:12], "files": files}
    manifest["name"] = check_name(manifest.get("name") or "dimml-model")
    missing = [k for k in REQUIRED[manifest["schema_version"]] if k not in manifest]
    if missing:
        raise BundleError(f"{folder}: manifest lacks {missing}")
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


@dataclass
class Bundle:
    """A loaded, verified bundle: its folder, manifest, and (from the model store) its tag."""

    path: Path
    manifest: dict[str, Any]
    tag: str | None = None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def schema(self) -> int:
        return int(self.manifest["schema_version"])

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in model order."""
        return tuple(self.manifest["modalities"])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest["preprocess"])

    @property
    def fields(self) -> tuple[str, ...]:
        """Source fields a sample may have ("video" and/or own-file modality names)."""
        return self.preprocess.fields

    @property
    def io(self) -> IO:
        """module -> (input names, output names), derived from the specs (module_io)."""
        return module_io(self.preprocess)

    @property
    def modules(self) -> tuple[str, ...]:
        """Every exported module: the branches in model order, then fusion."""
        return (*self.modalities, FUSION)

    @property
    def temperature(self) -> float:
        """Certainty-weighting temperature T (DI-MML Eq. 9)."""
        return float(self.manifest["lw_temperature"])

    @property
    def final_output(self) -> OutputRule:
        """The final output: how the answer is made from the branch logits (the manifest's
        `final_output`, OutputRule.to_dict(): the rule the run chose on validation, and why).
        Older manifests: `output` (a rule dict; or "weighted" / none: the paper's weighting at
        `lw_temperature`, "fused": the fusion head) or an interim `output_rule` entry."""
        from dimml.weighting import OutputRule

        for key in ("final_output", "output", "output_rule"):
            if isinstance(self.manifest.get(key), dict):
                return OutputRule.from_dict(self.manifest[key])
        return OutputRule.legacy(self.manifest.get("output") or "weighted", self.temperature)

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def engines(self) -> list[dict[str, Any]]:
        """TensorRT engine entries (module, file, tensorrt_version, compute_capability, ...)."""
        return list((self.manifest.get("tensorrt") or {}).get("engines", []))

    @property
    def int8(self) -> dict[str, Any] | None:
        """The manifest's `int8` entry (quantized graphs, calibration, accuracy check), or None."""
        return self.manifest.get(INT8) or None

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions of the ONNX graphs the bundle holds: fp32, and int8 when quantized."""
        return (FP32, INT8) if self.int8 else (FP32,)

    def onnx_path(self, module: str, precision: str = FP32) -> Path:
        """A module's ONNX graph in one of the bundle's precisions."""
        if precision == FP32:
            entry = self.manifest["onnx"]
        elif precision == INT8 and self.int8:
            entry = self.int8
        else:
            raise BundleError(f"{self.path}: no {precision} graphs (this bundle holds {', '.join(self.precisions)}"
                              + ("; export with --quantize int8" if precision == INT8 else "") + ")")
        return _safe_relpath(self.path, entry["modules"][module]["file"])

    def file(self, rel: str) -> Path:
        """A file listed in the manifest (KeyError-free: BundleError if not listed)."""
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.path}: {rel} is not part of this bundle")
        return _safe_relpath(self.path, rel)

    @property
    def torch_dir(self) -> Path:
        return self.path / "torch"

    def torch_program(self, module: str) -> Path:
        """The module's `torch.export` program (schema 2); BundleError where the bundle has none."""
        programs = (self.manifest.get("torch") or {}).get("programs") or {}
        if module not in programs:
            raise BundleError(f"{self.path}: no torch program for {module!r} (schema-{self.schema} "
                              "bundles before schema 2 hold none; re-export the run for the PyTorch backend)")
        return self.file(programs[module])

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


def int8_check_summary(check: dict[str, Any]) -> str:
    """One line of a manifest's int8 accuracy check (export/quantize.py writes it; engines and verify print it)."""
    if not check or "clips" not in check:
        return "no accuracy check recorded"
    return (f"top-1 agreement {check['top1_agreement']:.1%} (at least {check['min_top1_agreement']:.0%}), "
            f"accuracy {check['int8_accuracy']:.1%} vs fp32 {check['fp32_accuracy']:.1%} "
            f"({0.0 - check['accuracy_drop']:+.1f} points, at most {check['max_accuracy_drop']:g} lost) "
            f"on {check['clips']} {check.get('split', '')} clips".replace("  ", " "))


def _referenced_files(m: dict[str, Any]) -> list[str]:
    """Files the manifest tells a loader to open: each must also be checksummed."""
    refs = [e["file"] for e in m["onnx"]["modules"].values()]
    refs += [e["file"] for e in (m.get(INT8) or {}).get("modules", {}).values()]
    torch_entry = dict(m.get("torch") or {})
    refs += list((torch_entry.pop("programs", None) or {}).values()) + list(torch_entry.values())
    refs += [e["file"] for e in (m.get("tensorrt") or {}).get("engines", [])]
    return refs


def check_bundle(path: str | os.PathLike, *, checksums: bool = True) -> dict[str, Any]:
    """Read and validate BUNDLE/manifest.json and every file's sha256; returns the manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle ({MANIFEST} missing)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    try:
        return _check_manifest(path, mpath, m, checksums)
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None


def _check_manifest(path: Path, mpath: Path, m: Any, checksums: bool) -> dict[str, Any]:
    """check_bundle past the JSON parse: format, schema, required fields, file checksums."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a dimml bundle manifest (format is not {FORMAT!r})")
    sv = m.get("schema_version")
    if sv not in READABLE_SCHEMAS:
        raise BundleError(f"{mpath}: bundle schema version {sv!r} is not supported by this dimml "
                          f"(reads versions {', '.join(map(str, READABLE_SCHEMAS))}); re-export the run "
                          "with this dimml or use the dimml version that wrote it")
    missing = [k for k in REQUIRED[sv] if k not in m]
    if missing:
        raise BundleError(f"{mpath}: incomplete manifest, missing {missing}")
    try:
        cfg = PreprocessConfig.from_dict(m["preprocess"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: preprocessing config not readable ({e})") from None
    if list(m["modalities"]) != list(cfg.names):
        raise BundleError(f"{mpath}: modalities {m['modalities']} differ from the preprocessing's {list(cfg.names)}")
    if sv >= 2 and list(m["fields"]) != list(cfg.fields):
        raise BundleError(f"{mpath}: fields {m['fields']} differ from the preprocessing's {list(cfg.fields)}")
    io = module_io(cfg)
    if set(m["onnx"].get("modules", {})) != set(io):
        raise BundleError(f"{mpath}: onnx modules must be {sorted(io)}")
    if m.get(INT8) and set(m[INT8].get("modules", {})) != set(io):
        raise BundleError(f"{mpath}: int8 modules must be {sorted(io)}")
    files: dict[str, Any] = m["files"]
    unlisted = [r for r in _referenced_files(m) if r not in files]
    if unlisted:
        raise BundleError(f"{mpath}: files {unlisted} are used but have no checksum")
    for rel, entry in files.items():
        p = _safe_relpath(path, rel)
        if not p.is_file():
            raise BundleError(f"{p}: file of the bundle is missing")
        if not checksums:
            continue
        if p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
            raise BundleError(f"{p}: checksum mismatch; the bundle was modified after export "
                              "(re-export it, do not edit bundle files)")
    return m


# ---------------------------------------------------------------------------------------
# BentoML model store

def _is_tag(source: str) -> bool:
    """'name' or 'name:version' (no path separators): a candidate model-store tag."""
    name, _, version = source.partition(":")
    return bool(_NAME_RE.match(name)) and "/" not in source and "\\" not in source and \
        (not version or re.match(r"^[A-Za-z0-9._-]+$", version) is not None)


def is_model_tag(source: str | os.PathLike) -> bool:
    """Whether load_bundle reads `source` from the BentoML model store (not an existing folder)."""
    return not Path(source).exists() and _is_tag(str(source))


def load_bundle(source: str | os.PathLike | Bundle, *, checksums: bool = True) -> Bundle:
    """A bundle folder, or a BentoML model-store tag ("name" = latest, or "name:version").

    Checks the schema version and every file's checksum; raises BundleError naming the
    file and the cause on anything missing, modified or incompatible.
    """
    if isinstance(source, Bundle):
        return source
    if not is_model_tag(source):
        path = Path(source)
        return Bundle(path, check_bundle(path, checksums=checksums))
    import bentoml
    from bentoml.exceptions import NotFound
    try:
        model = bentoml.models.get(str(source))
    except NotFound:
        raise BundleError(f"{source}: neither a bundle folder nor a model in the BentoML model "
                          f"store (BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')})") from None
    return Bundle(Path(model.path), check_bundle(model.path, checksums=checksums), str(model.tag))


def register_bundle(source: str | os.PathLike, name: str | None = None,
                    labels: dict[str, str] | None = None) -> str:
    """Copy a verified bundle into the BentoML model store (so `bentoml build` packs it); returns the tag."""
    import bentoml

    bundle = load_bundle(source)
    name = check_name(name or bundle.name)
    m = bundle.manifest
    metadata = {"format": FORMAT, "schema_version": m["schema_version"], "bundle_version": m["version"],
                "classes": list(m["classes"]), "modalities": list(m["modalities"]),
                "fields": list(bundle.fields),
                "fusion": m["fusion"], "lw_temperature": m["lw_temperature"], "precisions": list(bundle.precisions)}
    all_labels = {"framework": "dimml", "bundle-version": m["version"], **(labels or {})}
    with bentoml.models.create(name, labels=all_labels, metadata=metadata) as model:
        for rel in [MANIFEST, *m["files"]]:
            dst = Path(model.path) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / rel, dst)
    return str(model.tag)


__all__ = ["Bundle", "BundleError", "load_bundle", "int8_check_summary", "is_model_tag", "check_bundle", "register_bundle",
           "write_manifest", "sha256_file", "model_name", "check_name", "list_files",
           "module_io", "FUSION", "FP32", "INT8", "SCHEMA_VERSION", "READABLE_SCHEMAS", "MANIFEST"]

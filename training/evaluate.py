"""Evaluation of a trained MultiModel: metrics per output, certainty weighting, linear probes, report.json.

On the test split: accuracy, macro-F1 and ECE of the fused output, of the certainty-weighted
output (methods whose final output it is: the M unimodal heads plus fusion weighed, T_lw fitted
on the validation split unless given) and of each modality's head; plus the linear-probe
accuracy of each frozen encoder (a linear classifier fitted on its train features, scored on
test: the modality-competition measure). Report metrics are keyed "fused", "weighted", each
modality's name, and "probe" ({modality: accuracy}).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from dimml.weighting import fit_temperature, weigh
from training.losses import expected_calibration_error
from training.models import FUSION_KEY, MultiModel

OUTPUT_KEYS = ("fused", "weighted", "probe")   # report metrics keys besides the modalities'


def check_output_names(names: Iterable[str]) -> None:
    """ValueError when a modality name would clash with a report output key."""
    clash = set(names) & set(OUTPUT_KEYS)
    if clash:
        raise ValueError(f"modality name(s) {sorted(clash)} clash with the report's outputs {OUTPUT_KEYS}; rename them")


@dataclass
class Outputs:
    """Everything the model says about one split, on the CPU."""

    labels: torch.Tensor                 # int64 [N]
    features: dict[str, torch.Tensor]    # modality -> float32 [N, D]
    logits: dict[str, torch.Tensor]      # modality / "fusion" -> float32 [N, K]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to dtype on the device, or nothing (fp32) when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def collect(model: MultiModel, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
            desc: str | None = None) -> Outputs:
    """Run every module (eval mode) over a loader of ({modality: batch}, label) batches.

    Puts the modules in eval mode; the caller restores train mode where it needs it.
    """
    model.eval()
    feats: dict[str, list] = {n: [] for n in model.names}
    logits: dict[str, list] = {n: [] for n in (*model.names, FUSION_KEY)}
    labels = []
    for inputs, label in tqdm(loader, desc=desc, leave=False, disable=desc is None, unit="batch"):
        inputs = {n: inputs[n].to(device, non_blocking=True) for n in model.names}
        with autocast(device, amp_dtype):
            h, z = model(inputs)
        for n, v in h.items():
            feats[n].append(v.float().cpu())
        for n, v in z.items():
            logits[n].append(v.float().cpu())
        labels.append(torch.as_tensor(label).cpu())
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)
    return Outputs(cat(labels).long(), {k: cat(v) for k, v in feats.items()}, {k: cat(v) for k, v in logits.items()})


# ---------------------------------------------------------------------------------------
# metrics

def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean()) if labels.numel() else float("nan")


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts: row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in labels or predictions (scikit-learn's default)."""
    cm = confusion_matrix(pred, labels, num_classes).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    return float(f1[present].mean()) if present.any() else float("nan")


def branch_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and ECE (15 bins) of one output."""
    pred = logits.argmax(1)
    return {"accuracy": accuracy(pred, labels), "macro_f1": macro_f1(pred, labels, num_classes),
            "ece": expected_calibration_error(logits.double().softmax(1), labels)}


# ---------------------------------------------------------------------------------------
# linear probe

def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-2,
              max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression on frozen features (L-BFGS, float64, deterministic).

    Features are standardised for conditioning; the standardisation is folded back into the
    returned layer, which therefore takes raw features. Objective: mean CE + l2/2 |W|^2.
    """
    x = features.double()
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z, y = (x - mu) / sd, labels.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    layer = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        w_raw = (w / sd[:, None]).detach()
        layer.weight.copy_(w_raw.T.float())
        layer.bias.copy_((b - mu @ w_raw).detach().float())
    return layer


def probe_accuracy(train: Outputs, test: Outputs, side: str, num_classes: int) -> float:
    layer = fit_probe(train.features[side], train.labels, num_classes)
    with torch.no_grad():
        return accuracy(layer(test.features[side]).argmax(1), test.labels)


# ---------------------------------------------------------------------------------------
# the report

def evaluate(model: MultiModel, loaders: dict[str, Iterable], *, method: str, num_classes: int,
             classes: list[str], weighting: bool, lw_temperature: float | None, device: torch.device,
             amp_dtype: torch.dtype | None = None, unimodal_heads: str = "trained",
             sizes: dict[str, int] | None = None, progress: bool = True) -> dict:
    """Score a model on loaders {"train", "val", "test"}; returns the report dict (see module doc).

    With no test samples the validation split is scored instead (said in "eval_split").
    """
    check_output_names(model.names)
    outs = {split: collect(model, loader, device, amp_dtype, desc=f"evaluate {split}" if progress else None)
            for split, loader in loaders.items()}
    eval_split = "test" if outs["test"].labels.numel() else "val"
    test, k = outs[eval_split], num_classes
    metrics = {"fused": branch_metrics(test.logits[FUSION_KEY], test.labels, k),
               **{n: branch_metrics(test.logits[n], test.labels, k) for n in model.names}}
    final = test.logits[FUSION_KEY]
    t_source = None
    if weighting:
        names = [*model.names, FUSION_KEY]
        if lw_temperature is not None:
            t, t_source = float(lw_temperature), "config"
        elif outs["val"].labels.numel():
            t = fit_temperature([outs["val"].logits[n].numpy() for n in names], outs["val"].labels.numpy())
            t_source = "val"
        else:
            t, t_source = 1.0, "default"
        z, _, _ = weigh([test.logits[n].numpy() for n in names], t)
        final = torch.from_numpy(z)
        metrics["weighted"] = branch_metrics(final, test.labels, k)
    else:
        t = None
    metrics["probe"] = {n: probe_accuracy(outs["train"], test, n, k) for n in model.names}
    return {
        "method": method,
        "primary": "weighted" if weighting else "fused",
        "metrics": metrics,
        "lw_temperature": t,
        "lw_temperature_source": t_source,
        "unimodal_heads": unimodal_heads,
        "eval_split": eval_split,
        "sizes": sizes or {s: int(o.labels.numel()) for s, o in outs.items()},
        "classes": list(classes),
        "confusion": confusion_matrix(final.argmax(1), test.labels, k).tolist(),
    }


def format_table(report: dict) -> str:
    """The report as a small text table."""
    m = report["metrics"]
    t = report.get("lw_temperature")
    modalities = list(m["probe"])
    head = f"method {report['method']}  (final output: {report['primary']}"
    head += f", T_lw={t:.3g} from {report['lw_temperature_source']})" if t is not None else ")"
    width = max(10, *(len(n) + 2 for n in modalities))
    lines = [head, f"{report['eval_split']} split, n={report['sizes'].get(report['eval_split'])}",
             f"{'output':<{width}}{'accuracy':>10}{'macro_f1':>10}{'ece':>8}"]
    for name in ("fused", "weighted", *modalities):
        if name in m:
            r = m[name]
            note = "  (probe head)" if name in modalities and report["unimodal_heads"] == "probe" else ""
            lines.append(f"{name:<{width}}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['ece']:>8.4f}{note}")
    p = m["probe"]
    lines.append(f"{'probe':<{width}}" + "  ".join(f"{n} {p[n]:.4f}" for n in modalities)
                 + "  (linear probe accuracy)")
    return "\n".join(lines)

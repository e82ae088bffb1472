"""Evaluation of a trained MultiModel: metrics per output, the final output, linear probes, report.json.

One vocabulary (dimml.prediction): the fusion head is "fusion", the final output (what answers) is
"final". On the test split: accuracy, macro-F1 and ECE (dimml.metrics) of the fusion head, of each
modality's head and of the final output. The final output is chosen on the validation split by
dimml.weighting.select_output among the paper's weighting (Eq. 8-9, T fixed by lw_temperature or
fitted), the fitted prior weighting, the fusion head and each unimodal head (the method's own
heads, the fusion head's slices or linear probes: `unimodal_heads`), ties going to the weighting;
a validation split under MIN_VAL_PER_CLASS clips per class answers with the paper's weighting, with
a warning. Methods that do not choose (`Method.chooses_output` False: the Table 3 ablations)
answer with their fusion head; `final_output` forces a rule ("paper-lw" with a fixed
lw_temperature is exactly the paper).

report.json: "metrics" {"final", "fusion", <modality>..., "probe": {modality: linear-probe accuracy
of the frozen encoder, fitted on train features: the modality-competition measure}} and
"final_output" {"chosen", "rule" (the OutputRule), "reason", "fallback", "forced", "candidates"
(every rule's test metrics and cross-validation scores), "lw_temperature", ...}. Reports written
before this vocabulary ("fused", "weighted", "primary", "output", "output_rule") are read through
training.run.upgrade_report.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from dimml import metrics as M
from dimml.prediction import FINAL
from dimml.weighting import MIN_VAL_PER_CLASS, OutputRule, fit_prior_weighting, fit_temperature, select_output, softmax
from training.models import FUSION, MultiModel

AUTO = "auto"                                 # choose the final output on validation
WEIGHTINGS = ("paper-lw", "fitted")           # output rules besides the heads (FUSION, each modality)


def output_choices(names: Iterable[str]) -> tuple[str, ...]:
    """Values of TrainConfig.final_output for a run with these modalities."""
    return (AUTO, FUSION, *names, *WEIGHTINGS)


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
    logits: dict[str, list] = {n: [] for n in (*model.names, FUSION)}
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

def branch_metrics(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                   num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and ECE (15 bins) of one output (dimml.metrics)."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    pred = z.argmax(1)
    return {"accuracy": M.accuracy(pred, y), "macro_f1": M.macro_f1(pred, y, num_classes),
            "ece": M.expected_calibration_error(softmax(z), y) if y.size else float("nan")}


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
        return M.accuracy(layer(test.features[side]).argmax(1).numpy(), test.labels.numpy())


# ---------------------------------------------------------------------------------------
# the final output

def _np(logits: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: v.numpy().astype(np.float64) for n, v in logits.items()}


def paper_temperature(val_logits: Mapping[str, np.ndarray], val_labels: np.ndarray,
                      lw_temperature: float | None) -> tuple[float, str]:
    """T of the paper's weighting: the configured one, else fitted on validation, else 1."""
    if lw_temperature is not None:
        return float(lw_temperature), "config"
    if len(val_labels):
        return fit_temperature(list(val_logits.values()), val_labels), "val"
    return 1.0, "default"


def choose_output(val_logits: Mapping[str, np.ndarray], val_labels: np.ndarray, *, chooses: bool,
                  final_output: str = AUTO, lw_temperature: float | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[OutputRule, dict[str, Any], dict[str, OutputRule]]:
    """The final output from validation logits {modality..., "fusion": [N, K]}.

    Returns (rule, selection facts for the report, every candidate rule by name). `final_output`:
    "auto" (select_output when the method chooses, else the fusion head) or a candidate's name
    (forced). A "branch" rule carries the paper's T, used when its branch is missing at serving.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    names = [n for n in val_logits if n != FUSION]
    if final_output not in output_choices(names):
        raise ValueError(f"final_output must be one of {output_choices(names)}, got {final_output!r}")
    labels = np.asarray(val_labels, dtype=np.int64)
    t, t_source = paper_temperature(val_logits, labels, lw_temperature)
    rules: dict[str, OutputRule] = {"paper-lw": OutputRule.paper(t)}
    if len(np.unique(labels)) >= 2:   # something to fit (on a tiny split only reported, never chosen by auto)
        rules["fitted"] = fit_prior_weighting(val_logits, labels)
    rules.update({n: OutputRule.head(n, t) for n in (FUSION, *names)})
    facts: dict[str, Any] = {"lw_temperature": t, "lw_temperature_source": t_source, "forced": final_output != AUTO}
    if final_output != AUTO:
        if final_output not in rules:
            raise ValueError(f"final output {final_output!r} cannot be fitted: the validation split has "
                             f"{len(labels)} clip(s) of {len(np.unique(labels))} class(es)")
        reason = f"forced by the configuration (final_output={final_output})"
        rule = rules[final_output].because(reason)
        facts.update(chosen=final_output, fallback=False, reason=reason)
    elif not chooses:
        reason = "the method's final output is its fusion head (an ablation without the weighting)"
        rule = rules[FUSION].because(reason)
        facts.update(chosen=FUSION, fallback=False, reason=reason)
    else:
        rule, sel = select_output(val_logits, labels, temperature=lw_temperature)
        facts.update(chosen=sel["chosen"], fallback=sel["fallback"], reason=sel["reason"])
        if "folds" in sel:
            facts["folds"] = sel["folds"]
        facts["cv"] = sel["candidates"]
        if rule.rule == "branch":
            rule = rules[rule.name].because(sel["reason"])   # with the paper's T, for a missing modality
        rules[sel["chosen"]] = rule
        if sel["fallback"]:
            log(f"warning: {sel['reason']} (min {MIN_VAL_PER_CLASS} per class; add validation clips, "
                "or force a rule with --final-output)")
    facts["rule"] = rule.to_dict()
    log(f"final output: {facts['chosen']} ({facts['reason']})")
    return rule, facts, rules


# ---------------------------------------------------------------------------------------
# the report

def evaluate(model: MultiModel, loaders: dict[str, Iterable], *, method: str, num_classes: int,
             classes: list[str], chooses: bool, lw_temperature: float | None, device: torch.device,
             amp_dtype: torch.dtype | None = None, unimodal_heads: str = "trained",
             sizes: dict[str, int] | None = None, progress: bool = True, final_output: str = AUTO,
             log: Callable[[str], None] | None = None) -> dict:
    """Score a model on loaders {"train", "val", "test"}; returns the report dict (see module doc).

    With no test samples the validation split is scored instead (said in "eval_split").
    """
    outs = {split: collect(model, loader, device, amp_dtype, desc=f"evaluate {split}" if progress else None)
            for split, loader in loaders.items()}
    eval_split = "test" if outs["test"].labels.numel() else "val"
    test, k = outs[eval_split], num_classes
    order = (*model.names, FUSION)
    val_z, test_z = ({n: z[n] for n in order} for z in (_np(outs["val"].logits), _np(test.logits)))
    y = test.labels.numpy()
    rule, facts, rules = choose_output(val_z, outs["val"].labels.numpy(), chooses=chooses, final_output=final_output,
                                       lw_temperature=lw_temperature, log=log)
    candidates = {}
    for name, r in rules.items():
        row = branch_metrics(r.apply(test_z)[0], y, k)
        row.update((key, v) for key, v in (facts.get("cv") or {}).get(name, {}).items())
        if r.rule == "weighted":
            row["temperature"] = r.temperature
            if r.prior:
                row["prior"] = dict(r.prior)
        candidates[name] = row
    facts["candidates"] = candidates
    final = rule.apply(test_z)[0]
    metrics = {FINAL: branch_metrics(final, y, k), FUSION: branch_metrics(test_z[FUSION], y, k),
               **{n: branch_metrics(test_z[n], y, k) for n in model.names}}
    metrics["probe"] = {n: probe_accuracy(outs["train"], test, n, k) for n in model.names}
    return {
        "method": method,
        "metrics": metrics,
        "final_output": facts,
        "unimodal_heads": unimodal_heads,
        "eval_split": eval_split,
        "sizes": sizes or {s: int(o.labels.numel()) for s, o in outs.items()},
        "classes": list(classes),
        "confusion": M.confusion(final.argmax(1), y, k).tolist(),
    }


def confusion_title(report: dict) -> str:
    """The confusion plot's title: which final output it shows, on which split."""
    return f"{report['method']}: final output {report['final_output']['chosen']}, {report['eval_split']} split"


def format_table(report: dict) -> str:
    """The report as a small text table: the final output, the heads, every candidate, the probes."""
    m = report["metrics"]
    out = report["final_output"]
    modalities = list(m["probe"])
    head = f"method {report['method']}  (final output: {out['chosen']}"
    t = out.get("lw_temperature")
    head += f"; paper T_lw={t:.3g} from {out['lw_temperature_source']})" if t is not None else ")"
    width = max(12, *(len(n) + 2 for n in modalities))
    lines = [head, f"{report['eval_split']} split, n={report['sizes'].get(report['eval_split'])}",
             f"{'output':<{width}}{'accuracy':>10}{'macro_f1':>10}{'ece':>8}"]
    for name in (FINAL, FUSION, *modalities):
        r = m[name]
        note = "  (probe head)" if name in modalities and report["unimodal_heads"] == "probe" else ""
        note = f"  ({out['chosen']})" if name == FINAL else note
        lines.append(f"{name:<{width}}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['ece']:>8.4f}{note}")
    p = m["probe"]
    lines.append(f"{'probe':<{width}}" + "  ".join(f"{n} {p[n]:.4f}" for n in modalities)
                 + "  (linear probe accuracy)")
    cands = out.get("candidates") or {}
    if len(cands) > 1:
        lines.append(f"candidate outputs ({report['eval_split']} metrics; cv_acc on validation):")
        lines.append(f"  {'candidate':<{width}}{'accuracy':>10}{'macro_f1':>10}{'ece':>8}{'cv_acc':>8}  T")
        for name, r in cands.items():
            cv = f"{r['cv_accuracy']:>8.4f}" if "cv_accuracy" in r else f"{'-':>8}"
            temp = f"  {r['temperature']:.3g}" if "temperature" in r else ""
            mark = "  <- chosen" if name == out.get("chosen") else ""
            lines.append(f"  {name:<{width}}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['ece']:>8.4f}{cv}{temp}{mark}")
    lines.append(("WARNING: " if out.get("fallback") else "") + f"chose {out['chosen']}: {out['reason']}")
    return "\n".join(lines)

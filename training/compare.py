"""`python -m training compare`: every method under one budget, tabled like the DI-MML paper.

Table 2 layout: per method, each modality's and the multimodal test accuracy (mean +- std over
seeds); the columns are the runs' modalities (`--modalities`, default audio,visual).
Unimodal accuracy is the method's own head for detached methods (their encoders never saw the
other modality's objective) and the linear probe of the frozen encoder for the others (joint,
MLB, DGL), as the papers measure modality competition. Multimodal accuracy is the method's
final output (chosen on validation: training.evaluate), beside its fusion head's and the rules
chosen over the seeds.

Table 3 (ablation) reuses runs: TS = `mmclf`, + S-Clf = `dimml-sclf`, + DUC = `dimml`'s fusion
head, + LW = `dimml`'s paper weighting (the last two differ only at inference).
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from dimml.fileio import atomic_write_bytes, atomic_write_json
from dimml.prediction import FINAL, FUSION
from dimml.presets import PRESETS  # (light import: no torch for --help)

ABLATION = [  # (row, TS, S-Clf, DUC, LW, method run, output: the report's candidate rule)
    ("Joint", "", "", "", "", "joint", FUSION),
    ("TS (MM Clf)", "x", "", "", "", "mmclf", FUSION),
    ("TS + S-Clf", "x", "x", "", "", "dimml-sclf", FUSION),
    ("TS + S-Clf + DUC", "x", "x", "x", "", "dimml", FUSION),
    ("TS + S-Clf + DUC + LW", "x", "x", "x", "x", "dimml", "paper-lw"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several methods on one corpus and table the results")
    p.add_argument("--data", required=True, help="dataset folder or manifest")
    p.add_argument("--methods", default="unimodal,joint,mlb,dgl,dimml",
                   help="comma-separated registered methods (default: %(default)s)")
    p.add_argument("--ablation", action="store_true",
                   help="also train mmclf and dimml-sclf for the Table 3 ablation")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..n-1 per method (default 1)")
    p.add_argument("--out", required=True, help="output folder: runs/, compare.{md,json,png}")
    p.add_argument("--preset", default="resnet18", choices=list(PRESETS))
    p.add_argument("--modalities", help="the runs' modalities (default: audio,visual), e.g. front:image,rear:image")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, help="stage-1 epochs for every method (same budget)")
    p.add_argument("--stage2-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def method_list(args: argparse.Namespace) -> list[str]:
    from training.methods import get_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.ablation:
        methods += [m for m in ("joint", "mmclf", "dimml-sclf", "dimml") if m not in methods]
    for m in methods:
        get_method(m)   # unknown names fail before any training
    return methods


def is_detached(method: str) -> bool:
    """Encoders trained without a shared multimodal objective (DI-MML family, unimodal)."""
    from training.methods import get_method

    return "joint" not in get_method(method).stages


def modalities_of(report: dict[str, Any]) -> list[str]:
    """The modalities a run's report scores, in model order."""
    return list(report["metrics"]["probe"])


def row_of(method: str, report: dict[str, Any]) -> dict[str, float]:
    """Each modality's and the multimodal (final output) accuracy of one run (Table 2 style), its
    fusion head's ("fusion"), plus the probes ("probe_<name>")."""
    m = report["metrics"]
    names = modalities_of(report)
    uni = {n: m[n]["accuracy"] if is_detached(method) else m["probe"][n] for n in names}
    return {**uni, "multi": m[FINAL]["accuracy"], "fusion": m[FUSION]["accuracy"],
            **{f"probe_{n}": m["probe"][n] for n in names}}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float]) -> str:
    m, s = mean_std([100 * x for x in xs])
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f}"


def train_all(args: argparse.Namespace, methods: list[str]) -> dict[str, list[dict]]:
    """Fit (or resume, or reuse) every (method, seed) run; return their reports."""
    from training.run import read_report
    from training.trainer import TrainConfig, fit

    reports: dict[str, list[dict]] = {m: [] for m in methods}
    base = TrainConfig(data=args.data, out="", preset=args.preset, device=args.device)
    for field in ("modalities", "epochs", "stage2_epochs", "batch_size", "lr", "workers"):
        if getattr(args, field) is not None:
            base = replace(base, **{field: getattr(args, field)})
    from training.methods import get_method

    def trained(method: str, seed: int, hparams: dict) -> Path:
        """The finished run of (method, seed), trained here unless it already is."""
        run_dir = Path(args.out) / "runs" / f"{method}-seed{seed}"
        if not (run_dir / "report.json").is_file():
            print(f"== {method}, seed {seed} -> {run_dir}", flush=True)
            fit(replace(base, out=str(run_dir), method=method, seed=seed, hparams=hparams), progress=not args.quiet)
        return run_dir

    for method in methods:
        teachers = get_method(method).teachers_from
        for seed in range(args.seeds):
            # a method with teachers (UMT) gets the seed's run of their method, trained once and
            # shared with that method's own row when the list has it
            hparams = {"teachers": str(trained(teachers, seed, {}))} if teachers else {}
            run_dir = trained(method, seed, hparams)
            reports[method].append(read_report(run_dir))
    return reports


def tables(reports: dict[str, list[dict]], seeds: int) -> tuple[str, dict]:
    """Markdown (Table 2 + Table 3 where available) and the JSON summary."""
    summary: dict[str, Any] = {"seeds": seeds, "methods": {}, "ablation": []}
    names = modalities_of(next(r for runs in reports.values() for r in runs))
    summary["modalities"] = names
    title = lambda n: n[:1].upper() + n[1:]
    lines = ["## Method comparison (test accuracy, %)", "",
             "| Method | " + " | ".join(title(n) for n in names) + " | Multimodal (final output) | Fusion head | "
             "Final output chosen | " + " | ".join(f"probe {title(n)}" for n in names) + " |",
             "| --- " * (4 + 2 * len(names)) + "|"]
    for method, runs in reports.items():
        rows = [row_of(method, r) for r in runs]
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        chosen = [r["final_output"]["chosen"] for r in runs]
        summary["methods"][method] = {k: dict(zip(("mean", "std"), mean_std(v))) | {"values": v}
                                      for k, v in cols.items()} | {"chosen": chosen}
        tag = "" if is_detached(method) else " (probe)"
        picks = ", ".join(f"{c} x{chosen.count(c)}" if chosen.count(c) > 1 else c for c in dict.fromkeys(chosen))
        lines.append(f"| {method}{tag} | " + " | ".join(fmt(cols[n]) for n in names) + f" | {fmt(cols['multi'])} | "
                     f"{fmt(cols['fusion'])} | {picks} | " + " | ".join(fmt(cols[f"probe_{n}"]) for n in names) + " |")
    ablation = [a for a in ABLATION if a[5] in reports]
    if len(ablation) > 1:
        lines += ["", "## Ablation (DI-MML Table 3 layout; multimodal test accuracy, %)", "",
                  "| Row | TS | S-Clf | DUC | LW | " + " | ".join(title(n) for n in names) + " | Multimodal |",
                  "| --- " * (6 + len(names)) + "|"]
        for name, ts, s, d, lw, method, output in ablation:
            runs = reports[method]
            multi = [r["final_output"]["candidates"][output]["accuracy"] for r in runs
                     if output in (r["final_output"].get("candidates") or {})]
            if not multi:
                continue
            uni = {n: [row_of(method, r)[n] for r in runs] for n in names}
            summary["ablation"].append({"row": name, "method": method, "output": output,
                                        "multi": dict(zip(("mean", "std"), mean_std(multi)))})
            lines.append(f"| {name} | {ts} | {s} | {d} | {lw} | " + " | ".join(fmt(uni[n]) for n in names)
                         + f" | {fmt(multi)} |")
    if seeds > 1:
        lines += ["", f"mean ± sample standard deviation over {seeds} seeds."]
    return "\n".join(lines) + "\n", summary


def bar_chart(summary: dict, path: Path) -> None:
    """Grouped bars: each modality's and the multimodal accuracy per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(summary["methods"])
    keys = [(n, n) for n in summary["modalities"]] + [("multi", "multimodal")]
    x = np.arange(len(methods))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(keys) * len(methods)), 4))
    for i, (k, label) in enumerate(keys):
        means = [100 * summary["methods"][m][k]["mean"] for m in methods]
        stds = [100 * summary["methods"][m][k]["std"] for m in methods]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(x, methods)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    methods = method_list(args)
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = train_all(args, methods)
    md, summary = tables(reports, args.seeds)
    summary["config"] = {k: v for k, v in vars(args).items() if k != "func"}
    atomic_write_bytes(out / "compare.md", md.encode())
    atomic_write_json(out / "compare.json", summary)
    bar_chart(summary, out / "compare.png")
    print(md)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0

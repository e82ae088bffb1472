"""PNG plots of a run: loss and accuracy curves per output (RUN/curves.png), confusion matrix (RUN/confusion.png)."""
from __future__ import annotations

import io
from pathlib import Path

from dimml.fileio import atomic_write_bytes
from dimml.prediction import FUSION

FUSED_COLOUR = "tab:green"   # the fusion head's curves; modalities take the other colours in order


def _figure():
    import matplotlib
    matplotlib.use("Agg")   # no display: files only
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _colours(keys: list[str]) -> dict[str, str]:
    """A colour per output named in loss_/train_acc_/val_acc_ keys: fusion green, modalities the rest in order."""
    names = dict.fromkeys(k.split("_acc_")[-1] if "_acc_" in k else k[5:] for k in keys
                          if k.startswith(("loss_", "train_acc_", "val_acc_")))
    others = iter(f"tab:{c}" for c in ("blue", "orange", "red", "purple", "brown", "pink", "olive", "cyan", "gray"))
    return {n: FUSED_COLOUR if n in (FUSION, "fused") else next(others, None) for n in names}   # ("fused": older runs)


def plot_curves(history: list[dict], path: Path) -> None:
    """Per-epoch training losses (left) and train/val accuracy (right), epochs of all stages in a row."""
    plt = _figure()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(1, len(history) + 1))
    keys = list(dict.fromkeys(k for row in history for k in row))
    colour = _colours(keys)
    for key in keys:
        ys = [row.get(key) for row in history]
        pts = [(xi, y) for xi, y in zip(x, ys) if y not in (None, "")]
        if not pts:
            continue
        xs, vs = zip(*pts)
        if key.startswith("loss_"):
            name = key[5:]
            ax_l.plot(xs, vs, label=name, color=colour.get(name))
        elif key.startswith(("train_acc_", "val_acc_")):
            split, name = key.split("_acc_")
            ax_a.plot(xs, vs, label=f"{split} {name}", color=colour.get(name),
                      linestyle="-" if split == "train" else "--")
    # stage boundaries
    for i in range(1, len(history)):
        if history[i]["stage"] != history[i - 1]["stage"]:
            for ax in (ax_l, ax_a):
                ax.axvline(i + 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax_l.set(title="training loss", xlabel="epoch", yscale="log")
    ax_a.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_l, ax_a):
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """Confusion matrix (rows true, columns predicted) with counts in the cells."""
    import numpy as np
    plt = _figure()
    cm = np.asarray(matrix)
    k = len(classes)
    size = min(2 + 0.5 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)
    plt.close(fig)

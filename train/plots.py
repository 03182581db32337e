"""Matplotlib figures written by training (curves, confusion matrices) and the label-fraction experiment."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers, CI or Jetsons
import matplotlib.pyplot as plt  # noqa: E402

from deploy.fileio import atomic_write  # noqa: E402
from train.metrics import fraction_scale  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically as PNG and close the figure."""
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss terms (left) and validation metrics (right) per epoch."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for r in history for k in r if k.startswith("train/")}):
        ax_loss.plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=key[6:])
    for key in sorted({k for r in history for k in r if k.startswith("val/")}):
        values = [r.get(key, float("nan")) for r in history]
        if all(isinstance(v, (int, float)) for v in values):
            scale = fraction_scale(key)  # BLEU shares the 0-1 axis of the accuracies
            ax_val.plot(epochs, [v / scale for v in values], marker="o",
                        label=key[4:] + (f" /{scale:g}" if scale != 1 else ""))
    ax_loss.set(title=f"{title} training loss", xlabel="epoch")
    ax_val.set(title=f"{title} validation", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_fractions(rows: list[dict], metrics: list[tuple[str, str]], path: str | Path) -> Path:
    """Metric vs label fraction for each model kind (the paper's headline experiment).

    rows: {"fraction": f, "model": name, <metric key>: value}; metrics: [(key, axis label)].
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    models = sorted({r["model"] for r in rows})
    for ax, (key, label) in zip(axes[0], metrics):
        for model in models:
            pts = sorted((r["fraction"], r[key]) for r in rows if r["model"] == model and key in r)
            if pts:
                ax.plot([100 * f for f, _ in pts], [v for _, v in pts], marker="o", label=model)
        ax.set(xlabel="labelled training patients (%)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], title: str, path: str | Path) -> Path:
    """Counts with rows = true class, columns = predicted class; each cell labelled."""
    n = len(classes)
    side = max(4.4, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 0.6, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    top = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)

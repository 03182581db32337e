"""Matplotlib figures written by training (curves, confusion matrices) and the label-fraction experiment."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers, CI or Jetsons
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from deploy.fileio import atomic_write  # noqa: E402
from train.history import kept_record  # noqa: E402
from train.metrics import LOWER_IS_BETTER, to_points  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically as PNG and close the figure."""
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


@dataclass
class Panel:
    """One subplot of curves.png: its series by label (values per recorded epoch) and what was left out."""

    title: str
    ylabel: str
    series: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# Preferred first when two series are identical (accuracy == top1 always): the first name is kept.
_METRIC_ORDER = ("balanced_accuracy", "kappa", "accuracy", "macro_f1", "top1", "top5", "bleu", "exact_match",
                 "joint_accuracy")


def _column(history: list[dict], key: str) -> list[float]:
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in history]


def _same(a: list[float], b: list[float]) -> bool:
    """Equal series (a missing value, NaN, matching only a missing value)."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def _loss_panel(history: list[dict], tasks: list[str]) -> Panel:
    """The optimised loss, and each task's share of it. `total` (the sum of the task losses) is drawn
    only where it differs from `loss` (the student adds the sequence-KD term outside the task sum)."""
    panel = Panel("training loss (epoch mean)", "loss")
    panel.series["loss (optimised)"] = _column(history, "train/loss")
    total = _column(history, "train/total")
    if any(not math.isnan(t) for t in total) and not _same(total, panel.series["loss (optimised)"]):
        panel.series["total of task losses"] = total
        panel.notes.append("loss = total of task losses + sequence KD")
    for task in tasks:
        values = _column(history, f"train/{task}")
        if any(not math.isnan(v) for v in values):
            panel.series[f"{task} loss"] = values
    return panel


def _task_panel(history: list[dict], task: str) -> Panel:
    """A task's validation metrics in report units (percent; BLEU 0-100), without duplicates or
    constant lines (top-5 at 100 % says nothing), which are named in the notes instead."""
    keys = {k.split("/", 2)[2] for r in history for k in r if k.startswith(f"val/{task}/")}
    panel = Panel(f"{task} (validation)", "BLEU (0-100) and %" if "bleu" in keys else "%")
    order = sorted(keys, key=lambda m: (_METRIC_ORDER.index(m) if m in _METRIC_ORDER else len(_METRIC_ORDER), m))
    for metric in order:
        if metric.endswith(LOWER_IS_BETTER):
            panel.notes.append(f"{metric}: see metrics.csv")
            continue
        values = [to_points(metric, v) for v in _column(history, f"val/{task}/{metric}")]
        same = next((label for label, other in panel.series.items() if _same(other, values)), None)
        finite = [v for v in values if not math.isnan(v)]
        if same is not None:
            panel.notes.append(f"{metric} = {same}")
        elif len(finite) > 1 and max(finite) == min(finite):
            panel.notes.append(f"{metric} constant {finite[0]:.1f}")
        elif finite:
            panel.series[metric] = values
    return panel


def curve_panels(history: list[dict]) -> list[Panel]:
    """The panels of curves.png: the training loss, then one per task (in the order the history names them)."""
    tasks: list[str] = []
    for record in history:
        for key in record:
            parts = key.split("/")
            if parts[0] == "val" and len(parts) == 3 and parts[1] not in tasks:
                tasks.append(parts[1])
    return [_loss_panel(history, tasks), *(_task_panel(history, t) for t in tasks)]


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss and each task's validation metrics per epoch, one panel each; the kept epoch dotted."""
    epochs = [r["epoch"] for r in history]
    panels = curve_panels(history)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    best = kept_record(history).get("epoch")
    for ax, panel in zip(axes[0], panels):
        colours = plt.get_cmap("tab10" if len(panel.series) <= 10 else "tab20").colors
        for colour, (label, values) in zip(colours, panel.series.items()):
            ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=label)
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"kept (epoch {best})")
        ax.set(title=panel.title, xlabel="epoch", ylabel=panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_title(panel.title + ("\n" + "; ".join(panel.notes) if panel.notes else ""), fontsize=9)
        # below the axes, so it never covers a curve
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_fractions(rows: list[dict], metrics: list[tuple[str, str]], path: str | Path) -> Path:
    """Metric vs label fraction for each model kind (the paper's headline experiment).

    rows: {"fraction": f, "model": name, <metric key>: value}; metrics: [(key, axis label)].
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    models = sorted({r["model"] for r in rows})
    # One colour per model in every panel, also where a model has no value (the probe has no BLEU).
    colours = {model: plt.get_cmap("tab10")(i % 10) for i, model in enumerate(models)}
    for ax, (key, label) in zip(axes[0], metrics):
        for model in models:
            pts = sorted((r["fraction"], r[key]) for r in rows if r["model"] == model and key in r)
            if pts:
                ax.plot([100 * f for f, _ in pts], [v for _, v in pts], marker="o", label=model,
                        color=colours[model])
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

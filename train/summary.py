"""The experiment's test-split summary: every teacher, the ensemble, the student, the baseline and the
linear probe (train.probe), with a flag per column where the KD student is below a floor.

Writes runs/<name>/summary.json and summary.md; the ensemble is evaluated here with the same metric code.
"""

from __future__ import annotations

import json
import time

import torch

from deploy.contract import TaskSpec
from deploy.fileio import atomic_write_text
from train.calibrate import teacher_ensemble
from train.evaluate import collect_outputs, score_outputs
from train.experiment import ExperimentConfig, role_preprocessing, teacher_specs
from train.layout import FINAL
from train.metrics import headline, to_points
from train.plots import plot_confusion_matrix
from train.probe import linear_probe
from train.stage import Splits, image_set, write_final
from train.summary_rules import (  # noqa: F401 (re-exported)
    FLOOR_ROWS,
    PROBE_ROW,
    below_floors,
    ensemble_behind_teachers,
    summary_columns,
)


def _fmt(key: str, value) -> str:
    return "—" if value is None else f"{to_points(key, value):.1f}"


def markdown_table(rows: dict[str, dict], tasks: list[TaskSpec], joint: list[tuple[str, ...]] | tuple = ()) -> str:
    cols = summary_columns(tasks, joint)
    lines = ["| model | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, heads in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(k, heads.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_ensemble(cfg: ExperimentConfig, splits: Splits, device) -> dict:
    tasks = splits.data.spec.tasks
    ensemble, _ = teacher_ensemble(cfg, splits, device)  # the combination the student learned from
    data = image_set(splits, splits.test, tasks, role_preprocessing(cfg, "teachers"))
    outputs = collect_outputs(ensemble, data, device, cfg.teachers.train.eval_batch_size)
    return score_outputs(outputs, data, tasks, splits.data.vocabulary)


def write_summary(cfg: ExperimentConfig, splits: Splits, results: dict[str, dict], device) -> dict:
    """Collect every model's headline test numbers into summary.json / summary.md."""
    tasks = splits.data.spec.tasks
    rows: dict[str, dict] = {}
    for spec in teacher_specs(cfg, splits.data.spec.task_names):
        final = cfg.layout.teacher_dir(spec.name) / FINAL
        if final.exists():
            rows[spec.name] = json.loads(final.read_text())["headline"]
    ensemble_metrics = evaluate_ensemble(cfg, splits, device)
    write_final(cfg.layout.model_dir("ensemble"), "ensemble", ensemble_metrics, tasks)
    rows["ensemble"] = headline(ensemble_metrics, tasks)
    for role, metrics in results.items():
        rows[role] = headline(metrics, tasks)
    rows[PROBE_ROW] = headline(linear_probe(cfg, splits, device), tasks)
    joint = splits.data.spec.joint
    deltas = {}
    if "student" in rows:
        for key, _ in summary_columns(tasks, joint):
            s, e, b = rows["student"].get(key), rows["ensemble"].get(key), rows.get("baseline", {}).get(key)
            deltas[key] = {"student_minus_ensemble": None if s is None or e is None else to_points(key, s - e),
                           "student_minus_baseline": None if s is None or b is None else to_points(key, s - b)}
    below = below_floors(rows, tasks, joint)
    teachers = [spec.name for spec in teacher_specs(cfg, splits.data.spec.task_names) if spec.name in rows]
    behind = ensemble_behind_teachers(rows, teachers, tasks, joint)
    # tasks and joint groups make the file self-describing: benchmarks/readme_results rebuilds the table from it
    summary = {"experiment": cfg.name, "label_fraction": cfg.data.label_fraction or 1.0,
               "test_images": len(splits.test), "tasks": [t.to_dict() for t in tasks],
               "joint": [list(g) for g in joint], "rows": rows, "deltas_points": deltas, "below_floor": below,
               "ensemble_behind_teacher": behind,
               "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(cfg.layout.summary("json"), json.dumps(summary, indent=1))
    md = [f"# {cfg.name}: test split ({len(splits.test)} images), label fraction "
          f"{summary['label_fraction']:.0%}", "", "Accuracies in %, BLEU 0-100.", "",
          markdown_table(rows, tasks, joint), "", *comparison_lines(summary)]
    deployed = "student" if "student" in results else next(iter(results), None)
    if deployed:
        md += ["", *per_class_section(deployed, results[deployed], tasks, cfg.run_dir)]
    atomic_write_text(cfg.layout.summary("md"), "\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return summary


def comparison_lines(summary: dict) -> list[str]:
    """Markdown lines of summary.json's comparisons: student minus ensemble / baseline per column, the
    floors the KD student is below, the columns where a single teacher beats the ensemble."""
    md = ["Student minus ensemble / minus baseline (points):", ""]
    for key, d in summary["deltas_points"].items():
        md.append(f"- {key}: {_pts(d['student_minus_ensemble'])} / {_pts(d['student_minus_baseline'])}")
    md += ["", "Floors (models that need no teacher: the labels-only baseline and the linear probe):", ""]
    md += [f"- BELOW FLOOR {key}: KD student {_pts(gap)} points vs the {floor}"
           for key, floors in summary["below_floor"].items() for floor, gap in floors.items()] or \
          ["- the KD student is at or above every floor on every column"]
    md += ["", "Ensemble against its best single teacher (a combination worth distilling beats each member):", ""]
    md += [f"- ENSEMBLE BEHIND {teacher} on {key}: {_pts(gap)} points"
           for key, (teacher, gap) in summary["ensemble_behind_teacher"].items()] or \
          ["- the ensemble is at or above its best teacher on every column"]
    return md


def _pts(v) -> str:
    return "—" if v is None else f"{v:+.1f}"


def per_class_section(model: str, metrics: dict, tasks: list[TaskSpec], run_dir) -> list[str]:
    """Markdown lines: per-class recall (with support) of every classification task of `model`, and a
    confusion-matrix PNG per task next to summary.md (a skewed set hides its rare classes in accuracy)."""
    lines = [f"Per-class recall of the {model} on test (support in brackets):", ""]
    for t in tasks:
        m = metrics.get(t.name)
        if t.kind != "classification" or not m or not m.get("n"):
            continue
        cells = [f"{c} {_recall(m['per_class_recall'][c])} ({m['support'][c]})" for c in t.classes]
        png = f"confusion_{model}_{t.name}.png"
        plot_confusion_matrix(m["confusion_matrix"], list(t.classes), f"{model}: {t.name} (test)", run_dir / png)
        lines.append(f"- {t.name}: " + ", ".join(cells) + f" — [{png}]({png})")
    return lines


def _recall(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"

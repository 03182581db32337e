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
from train.metrics import headline, joint_key, present_ks, primary_metric, to_points
from train.plots import plot_confusion_matrix
from train.probe import linear_probe
from train.stage import Splits, image_set, write_final

PROBE_ROW = "linear probe"
FLOOR_ROWS = ("baseline", PROBE_ROW)  # rows that need no teacher: the KD student must not fall below them


def summary_columns(tasks: list[TaskSpec], joint: list[tuple[str, ...]] | tuple = ()) -> list[tuple[str, str]]:
    """(headline key, column title) per task, only metrics that can fail on it: accuracy and the primary
    metric (balanced accuracy, or kappa for ordinal tasks) of every classification task, top-5 where it
    has more than 5 classes, macro-F1 of the first; BLEU of a text task; joint accuracy of task groups."""
    cols: list[tuple[str, str]] = []
    first = True
    for t in tasks:
        if t.kind == "text":
            cols.append((f"{t.name}/bleu", f"{t.name} BLEU"))
            continue
        cols.append((f"{t.name}/accuracy", f"{t.name} acc"))
        cols.append((primary_metric(t), f"{t.name} {'kappa' if t.ordinal else 'bal. acc'}"))
        if first:
            cols.append((f"{t.name}/macro_f1", f"{t.name} macro-F1"))
        if 5 in present_ks(t.num_classes):
            cols.append((f"{t.name}/top5", f"{t.name} top-5"))
        first = False
    cols += [(f"{joint_key(g)}/joint_accuracy", f"{' + '.join(g)} joint acc") for g in joint]
    return cols


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


def below_floors(rows: dict[str, dict], tasks: list[TaskSpec],
                 joint: list[tuple[str, ...]] | tuple = ()) -> dict[str, dict[str, float]]:
    """Column -> {floor row: student minus floor (points)} where the KD student is below a floor row
    (baseline, linear probe) that has the column. Empty when the student is at or above every floor."""
    below: dict[str, dict[str, float]] = {}
    student = rows.get("student", {})
    for key, _ in summary_columns(tasks, joint):
        for floor in FLOOR_ROWS:
            s, f = student.get(key), rows.get(floor, {}).get(key)
            if s is not None and f is not None and s < f:
                below.setdefault(key, {})[floor] = to_points(key, s - f)
    return below


def ensemble_behind_teachers(rows: dict[str, dict], teachers: list[str], tasks: list[TaskSpec],
                             joint: list[tuple[str, ...]] | tuple = ()) -> dict[str, tuple[str, float]]:
    """Column -> (best teacher, ensemble minus it in points) where a single teacher beats the ensemble."""
    behind: dict[str, tuple[str, float]] = {}
    ensemble = rows.get("ensemble", {})
    for key, _ in summary_columns(tasks, joint):
        scored = [(rows[t][key], t) for t in teachers if rows[t].get(key) is not None]
        e = ensemble.get(key)
        if scored and e is not None and max(scored)[0] > e:
            best, name = max(scored)
            behind[key] = (name, to_points(key, e - best))
    return behind


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

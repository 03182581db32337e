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
from train.experiment import ExperimentConfig, teacher_specs
from train.metrics import headline
from train.probe import linear_probe
from train.stage import Splits, image_set, preprocess_spec, write_final
from train.teachers import teacher_dir

PROBE_ROW = "linear probe"
FLOOR_ROWS = ("baseline", PROBE_ROW)  # rows that need no teacher: the KD student must not fall below them


def paper_columns(tasks: list[TaskSpec]) -> list[tuple[str, str]]:
    """(headline key, column title): T1 accuracy + macro-F1, T2 top-1 + top-5, T3 BLEU."""
    cols: list[tuple[str, str]] = []
    first = True
    for t in tasks:
        if t.kind == "classification":
            if first:
                cols += [(f"{t.name}/accuracy", f"{t.name} acc"), (f"{t.name}/macro_f1", f"{t.name} macro-F1")]
            else:
                cols += [(f"{t.name}/top1", f"{t.name} top-1"), (f"{t.name}/top5", f"{t.name} top-5")]
            first = False
        else:
            cols.append((f"{t.name}/bleu", f"{t.name} BLEU"))
    return cols


def _fmt(key: str, value) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if key.endswith("bleu") else f"{100 * value:.1f}"


def markdown_table(rows: dict[str, dict], tasks: list[TaskSpec]) -> str:
    cols = paper_columns(tasks)
    lines = ["| model | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, heads in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(k, heads.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_ensemble(cfg: ExperimentConfig, splits: Splits, device) -> dict:
    tasks = splits.data.spec.tasks
    ensemble, _ = teacher_ensemble(cfg, splits, device)  # the combination the student learned from
    data = image_set(splits, splits.test, tasks, preprocess_spec(cfg, cfg.teachers.image_size))
    outputs = collect_outputs(ensemble, data, device, cfg.teachers.train.eval_batch_size)
    return score_outputs(outputs, data, tasks, splits.data.vocabulary)


def write_summary(cfg: ExperimentConfig, splits: Splits, results: dict[str, dict], device) -> dict:
    """Collect every model's headline test numbers into summary.json / summary.md."""
    tasks = splits.data.spec.tasks
    rows: dict[str, dict] = {}
    for spec in teacher_specs(cfg, splits.data.spec.task_names):
        final = teacher_dir(cfg, spec.name) / "final.json"
        if final.exists():
            rows[spec.name] = json.loads(final.read_text())["headline"]
    ensemble_metrics = evaluate_ensemble(cfg, splits, device)
    write_final(cfg.run_dir / "ensemble", "ensemble", ensemble_metrics, tasks)
    rows["ensemble"] = headline(ensemble_metrics, tasks)
    for role, metrics in results.items():
        rows[role] = headline(metrics, tasks)
    rows[PROBE_ROW] = headline(linear_probe(cfg, splits, device), tasks)
    deltas = {}
    if "student" in rows:
        for key, _ in paper_columns(tasks):
            s, e, b = rows["student"].get(key), rows["ensemble"].get(key), rows.get("baseline", {}).get(key)
            scale = 1.0 if key.endswith("bleu") else 100.0
            deltas[key] = {"student_minus_ensemble": None if s is None or e is None else scale * (s - e),
                           "student_minus_baseline": None if s is None or b is None else scale * (s - b)}
    below = below_floors(rows, tasks)
    summary = {"experiment": cfg.name, "label_fraction": cfg.data.label_fraction or 1.0,
               "test_images": len(splits.test), "rows": rows, "deltas_points": deltas, "below_floor": below,
               "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(cfg.run_dir / "summary.json", json.dumps(summary, indent=1))
    md = [f"# {cfg.name}: test split ({len(splits.test)} images), label fraction "
          f"{summary['label_fraction']:.0%}", "", "Accuracies in %, BLEU 0-100.", "",
          markdown_table(rows, tasks), "", "Student minus ensemble / minus baseline (points):", ""]
    for key, d in deltas.items():
        md.append(f"- {key}: {_pts(d['student_minus_ensemble'])} / {_pts(d['student_minus_baseline'])}")
    md += ["", "Floors (models that need no teacher: the labels-only baseline and the linear probe):", ""]
    md += [f"- BELOW FLOOR {key}: KD student {_pts(gap)} points vs the {floor}"
           for key, floors in below.items() for floor, gap in floors.items()] or \
          ["- the KD student is at or above every floor on every column"]
    atomic_write_text(cfg.run_dir / "summary.md", "\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return summary


def below_floors(rows: dict[str, dict], tasks: list[TaskSpec]) -> dict[str, dict[str, float]]:
    """Column -> {floor row: student minus floor (points)} where the KD student is below a floor row
    (baseline, linear probe) that has the column. Empty when the student is at or above every floor."""
    below: dict[str, dict[str, float]] = {}
    student = rows.get("student", {})
    for key, _ in paper_columns(tasks):
        scale = 1.0 if key.endswith("bleu") else 100.0
        for floor in FLOOR_ROWS:
            s, f = student.get(key), rows.get(floor, {}).get(key)
            if s is not None and f is not None and s < f:
                below.setdefault(key, {})[floor] = scale * (s - f)
    return below


def _pts(v) -> str:
    return "—" if v is None else f"{v:+.1f}"

"""The experiment's test-split summary: every teacher, the ensemble, the student, the baseline and the
linear probe (train.probe), with a flag per column where the KD student is below a floor or the
ensemble behind a teacher; a gap within one paired standard error on test is listed as level instead.
The ensemble is compared with the best teacher on test (chosen after seeing test, which favours it),
with the teacher validation picks (the one a user without the ensemble would deploy), and with every
teacher in test NLL, which scores the probabilities the student learns from and not only their argmax.

Writes runs/<name>/summary.json and summary.md; the ensemble is evaluated here with the same metric code.
From the kept per-image outputs it adds 95 % patient-bootstrap intervals of the headline columns
(`ci95`, points) for the ensemble, student and baseline, and a `clinical` section: per-class
sensitivity / specificity of the student, and any-disease-vs-normal numbers where dataset.yaml declares
a task's `normal` class (train/clinical.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from deploy.contract import TaskSpec
from deploy.fileio import atomic_write_text
from deploy.markdown import table_head, table_lines, table_row
from train.calibrate import held_out_nll, teacher_ensemble
from train.clinical import ClinicalError, any_disease, one_vs_rest
from train.datasets import FundusImages
from train.evaluate import (
    collect_outputs,
    headline_intervals,
    model_predict,
    paired_standard_errors,
    patient_ids,
    score_outputs,
)
from train.experiment import ExperimentConfig, role_preprocessing, teacher_specs
from train.history import kept_validation
from train.layout import FINAL, LAST_CHECKPOINT, meta_sidecar
from train.metrics import headline, to_points
from train.models.saved import load_model
from train.plots import plot_confusion_matrix
from train.probe import linear_probe
from train.stage import Splits, image_set, write_final
from train.summary_rules import (  # noqa: F401 (re-exported)
    FLOOR_ROWS,
    PROBE_ROW,
    behind_only,
    below_floors,
    ensemble_behind_teachers,
    ensemble_versus,
    split_ties,
    summary_columns,
    validation_picks,
)


def _fmt(key: str, value) -> str:
    return "—" if value is None else f"{to_points(key, value):.1f}"


def markdown_table(rows: dict[str, dict], tasks: list[TaskSpec], joint: list[tuple[str, ...]] | tuple = ()) -> str:
    cols = summary_columns(tasks, joint)
    body = ([name, *(_fmt(k, heads.get(k)) for k, _ in cols)] for name, heads in rows.items())
    return "\n".join(table_lines(["model", *(c for _, c in cols)], body))


CI_ROWS = ("ensemble", "student", "baseline")  # rows whose per-image outputs the summary keeps


@dataclass
class SplitOutputs:
    """A model's per-image outputs on test (and on validation, where an operating point is chosen)."""

    test: dict[str, np.ndarray]
    val: dict[str, np.ndarray] | None = None


def declares_normal(tasks: list[TaskSpec]) -> bool:
    """Some classification task names its normal class, so validation outputs are needed too."""
    return any(t.normal is not None for t in tasks)


@torch.no_grad()
def evaluate_ensemble(cfg: ExperimentConfig, splits: Splits, device) -> tuple[dict, SplitOutputs, dict]:
    """(test metrics, per-image outputs, test NLL of the ensemble and of each teacher: `held_out_nll`)."""
    tasks = splits.data.spec.tasks
    ensemble, combination = teacher_ensemble(cfg, splits, device)  # the combination the student learned from
    spec, batch = role_preprocessing(cfg, "teachers"), cfg.teachers.train.eval_batch_size
    data = image_set(splits, splits.test, tasks, spec)
    outputs = collect_outputs(ensemble, data, device, batch)
    val = (collect_outputs(ensemble, image_set(splits, splits.val, tasks, spec), device, batch)
           if declares_normal(tasks) else None)
    return (score_outputs(outputs, data, tasks, splits.data.vocabulary), SplitOutputs(outputs, val),
            held_out_nll(ensemble, combination, data, device, batch))


def write_summary(cfg: ExperimentConfig, splits: Splits, results: dict[str, dict], device,
                  outputs: dict[str, SplitOutputs] | None = None) -> dict:
    """Collect every model's headline test numbers into summary.json / summary.md; `outputs` (per role)
    add the 95 % intervals and the clinical numbers."""
    tasks = splits.data.spec.tasks
    outputs = dict(outputs or {})
    rows: dict[str, dict] = {}
    for spec in teacher_specs(cfg, splits.data.spec.task_names):
        final = cfg.layout.teacher_dir(spec.name) / FINAL
        if final.exists():
            rows[spec.name] = json.loads(final.read_text())["headline"]
    ensemble_metrics, outputs["ensemble"], test_nll = evaluate_ensemble(cfg, splits, device)
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
    teachers = [spec.name for spec in teacher_specs(cfg, splits.data.spec.task_names) if spec.name in rows]
    keys = [k for k, _ in summary_columns(tasks, joint)]
    spec = role_preprocessing(cfg, "student")  # only the labels and patients are read, never the pixels
    test, val = image_set(splits, splits.test, tasks, spec), image_set(splits, splits.val, tasks, spec)
    versus_teachers = ensemble_comparisons(cfg, splits, rows, teachers, outputs["ensemble"].test, test, device)
    ci95 = {row: headline_intervals(outputs[row].test, test, tasks, keys, cfg.clinical.bootstrap_resamples, cfg.seed)
            for row in CI_ROWS if row in outputs}
    paired_se = {floor: paired_standard_errors(outputs["student"].test, outputs[floor].test, test, tasks, keys,
                                               cfg.clinical.bootstrap_resamples, cfg.seed)
                 for floor in FLOOR_ROWS if floor in outputs and "student" in outputs}
    below, ties = split_ties(below_floors(rows, tasks, joint), paired_se)
    deployed = "student" if "student" in results else next(iter(results), None)
    clinical = clinical_numbers(cfg, tasks, deployed, results, outputs, test, val)
    # tasks and joint groups make the file self-describing: benchmarks/readme_results rebuilds the table from it
    summary = {"experiment": cfg.name, "label_fraction": cfg.data.label_fraction or 1.0,
               "test_images": len(splits.test), "tasks": [t.to_dict() for t in tasks],
               "joint": [list(g) for g in joint], "rows": rows, "deltas_points": deltas, "below_floor": below,
               "level_with_floor": ties, "paired_se_points": paired_se,
               **versus_teachers, "ensemble_test_nll": test_nll, "ci95": ci95, "clinical": clinical,
               "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(cfg.layout.summary("json"), json.dumps(summary, indent=1))
    md = [f"# {cfg.name}: test split ({len(splits.test)} images), label fraction "
          f"{summary['label_fraction']:.0%}", "", "Accuracies in %, BLEU 0-100.", "",
          markdown_table(rows, tasks, joint), "", *comparison_lines(summary)]
    md += ["", *interval_lines(ci95, tasks, joint, cfg.clinical.bootstrap_resamples)]
    if deployed:
        md += ["", *per_class_section(deployed, results[deployed], tasks, cfg.run_dir)]
    md += any_disease_lines(clinical.get("any_disease", {}))
    atomic_write_text(cfg.layout.summary("md"), "\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return summary


def ensemble_comparisons(cfg: ExperimentConfig, splits: Splits, rows: dict[str, dict], teachers: list[str],
                         ensemble_test: dict[str, np.ndarray], test: FundusImages, device) -> dict:
    """summary.json's comparisons of the ensemble with single teachers, each negative gap split into
    behind / level (`ensemble_gaps`): with the best teacher on test per column, and with the teacher
    validation picks (`versus_validation_picks`)."""
    tasks, joint = splits.data.spec.tasks, splits.data.spec.joint
    cache: dict[str, dict[str, np.ndarray]] = {}
    behind, level = ensemble_gaps(cfg, splits, ensemble_behind_teachers(rows, teachers, tasks, joint),
                                  ensemble_test, test, device, cache)
    versus, unrecorded = versus_validation_picks(cfg, rows, teachers, tasks, joint)
    gaps = behind_only({key: (p["versus"], p["ensemble_minus"]) for key, p in versus.items()})
    pick_behind, pick_level = ensemble_gaps(cfg, splits, gaps, ensemble_test, test, device, cache)
    return {"ensemble_behind_teacher": behind, "ensemble_level_with_teacher": level,
            "ensemble_vs_validation_pick": versus, "ensemble_behind_validation_pick": pick_behind,
            "ensemble_level_with_validation_pick": pick_level, "teachers_without_validation_record": unrecorded}


def versus_validation_picks(cfg: ExperimentConfig, rows: dict[str, dict], teachers: list[str],
                            tasks: list[TaskSpec], joint) -> tuple[dict[str, dict], list[str]]:
    """(column -> the teachers that validation picks for it (`validation_picks`, from each teacher's kept
    checkpoint's validation record), their validation value (points), the one of them best on test
    (`versus`) and the ensemble minus it on test (points); the teachers without a validation record,
    left out of the picks)."""
    validation = {name: kept_validation(cfg.layout.teacher_dir(name)) for name in teachers}
    picks = validation_picks(validation, teachers, tasks, joint)
    out = {}
    for key, (name, gap) in ensemble_versus(rows, picks).items():
        out[key] = {"teachers": picks[key], "validation": to_points(key, validation[name][key]),
                    "versus": name, "ensemble_minus": gap}
    return out, [name for name in teachers if not validation[name]]


@torch.no_grad()
def ensemble_gaps(cfg: ExperimentConfig, splits: Splits, behind: dict[str, tuple[str, float]],
                  ensemble_test: dict[str, np.ndarray], test: FundusImages, device,
                  cache: dict[str, dict[str, np.ndarray]] | None = None
                  ) -> tuple[dict[str, tuple[str, float]], dict[str, dict[str, list[float]]]]:
    """(real gaps, ties) of the columns where the ensemble is behind a teacher ({column: (teacher, gap)}),
    by the floors' rule (`split_ties`): the teachers named are run on test for their per-image outputs,
    kept in `cache` so that a second comparison does not run them again."""
    tasks = splits.data.spec.tasks
    pixels, batch = role_preprocessing(cfg, "teachers"), cfg.teachers.train.eval_batch_size
    images = image_set(splits, splits.test, tasks, pixels)
    cache = {} if cache is None else cache
    errors = {}
    for name in sorted({teacher for teacher, _ in behind.values()}):
        if name not in cache:
            model, _ = load_model(cfg.layout.teacher_checkpoint(name))
            cache[name] = collect_outputs(model_predict(model.to(device).eval()), images, device, batch)
        errors[name] = paired_standard_errors(ensemble_test, cache[name], test, tasks, list(behind),
                                              cfg.clinical.bootstrap_resamples, cfg.seed)
    gaps, ties = split_ties({key: {teacher: gap} for key, (teacher, gap) in behind.items()}, errors)
    return {key: next(iter(d.items())) for key, d in gaps.items()}, ties


def comparison_lines(summary: dict) -> list[str]:
    """Markdown lines of summary.json's comparisons: student minus ensemble / baseline per column, the
    floors the KD student is below, the columns where the best teacher on test beats the ensemble, and
    the ensemble against the teacher validation picks."""
    md = ["Student minus ensemble / minus baseline (points):", ""]
    for key, d in summary["deltas_points"].items():
        md.append(f"- {key}: {_pts(d['student_minus_ensemble'])} / {_pts(d['student_minus_baseline'])}")
    md += ["", "Floors (models that need no teacher: the labels-only baseline and the linear probe; a gap within "
           "one standard error of the paired difference on test is level, not below):", ""]
    md += [f"- BELOW FLOOR {key}: KD student {_pts(gap)} points vs the {floor}"
           for key, floors in summary["below_floor"].items() for floor, gap in floors.items()] or \
          ["- the KD student is at or above every floor on every column, or level with it"]
    md += [f"- level with the {floor} on {key}: KD student {_pts(gap)} points, within one standard error "
           f"({se:.1f}) of the paired difference on test"
           for key, floors in summary.get("level_with_floor", {}).items() for floor, (gap, se) in floors.items()]
    md += ["", "Ensemble against its best single teacher (a combination worth distilling beats each member):", ""]
    md += [f"- ENSEMBLE BEHIND {teacher} on {key}: {_pts(gap)} points"
           for key, (teacher, gap) in summary["ensemble_behind_teacher"].items()] or \
          ["- the ensemble is at or above its best teacher on every column, or level with it"]
    md += [f"- level with {teacher} on {key}: ensemble {_pts(gap)} points, within one standard error ({se:.1f}) "
           "of the paired difference on test"
           for key, teachers in summary.get("ensemble_level_with_teacher", {}).items()
           for teacher, (gap, se) in teachers.items()]
    return md + validation_pick_lines(summary) + nll_lines(summary)


def nll_lines(summary: dict) -> list[str]:
    """Markdown: per task, the ensemble's test NLL against its teachers' (summary.json's `ensemble_test_nll`;
    absent from summaries written before it). Accuracy sees only the argmax; the student learns the
    probabilities, and NLL scores them."""
    by_task = summary.get("ensemble_test_nll")
    if not by_task:
        return []
    md = ["", "Ensemble against its teachers in test NLL (the probabilities the student learns from, each "
          "teacher at its fitted temperature; lower is better):", ""]
    for task, d in by_task.items():
        best = min(d["teachers"], key=d["teachers"].get)
        better = sorted(name for name, v in d["teachers"].items() if v < d["ensemble"])
        line = (f"{task} ({d['rows']} {d['unit']}): ensemble {d['ensemble']:.4f}, best teacher {best} "
                f"{d['teachers'][best]:.4f}")
        md.append(f"- ENSEMBLE NLL ABOVE {', '.join(better)} on {line}" if better else f"- {line}")
    return md


def validation_pick_lines(summary: dict) -> list[str]:
    """Markdown: per column, the ensemble against the teacher that validation picks (summary.json's
    `ensemble_vs_validation_pick`; absent from summaries written before it)."""
    picks = summary.get("ensemble_vs_validation_pick")
    unrecorded = summary.get("teachers_without_validation_record") or []
    if not picks and not unrecorded:
        return []
    behind = summary.get("ensemble_behind_validation_pick", {})
    level = summary.get("ensemble_level_with_validation_pick", {})
    md = ["", "Ensemble against the teacher validation picks per column (the one a user without the ensemble "
          "would deploy; the best teacher on test, above, is chosen after seeing test, which favours it):", ""]
    for key, p in (picks or {}).items():
        tied = (f" ({' / '.join(p['teachers'])} tie on validation; the better on test)"
                if len(p["teachers"]) > 1 else "")
        line = f"{key}: {p['versus']}{tied}, validation {p['validation']:.1f}: ensemble {_pts(p['ensemble_minus'])} points"
        if key in behind:
            line = "ENSEMBLE BEHIND on " + line
        elif key in level:
            line += f", level: within one standard error ({level[key][p['versus']][1]:.1f}) of the paired difference"
        md.append("- " + line)
    if unrecorded:
        sidecar = meta_sidecar(LAST_CHECKPOINT).name
        md.append(f"- left out of the picks, no validation record ({sidecar}) in their folder: {', '.join(unrecorded)}")
    return md


def _pts(v) -> str:
    return "—" if v is None else f"{v:+.1f}"


def interval_lines(ci95: dict[str, dict], tasks: list[TaskSpec], joint, resamples: int) -> list[str]:
    """Markdown: each row's 95 % interval per column."""
    if not ci95:
        return []
    cols = summary_columns(tasks, joint)
    lines = [f"95 % confidence intervals on test (patient bootstrap, {resamples} resamples: patients drawn with "
             "replacement, all their images with them):", "",
             *table_lines(["model", *(c for _, c in cols)],
                          ([row, *(_interval(cis.get(k)) for k, _ in cols)] for row, cis in ci95.items()))]
    return lines


def _interval(ci) -> str:
    return "—" if ci is None else f"{ci[0]:.1f}–{ci[1]:.1f}"


def clinical_numbers(cfg: ExperimentConfig, tasks: list[TaskSpec], deployed: str | None, results: dict[str, dict],
                     outputs: dict[str, SplitOutputs], test: FundusImages, val: FundusImages) -> dict:
    """summary.json's `clinical`: per-class sensitivity / specificity of the deployed model (points) and,
    per task with a declared normal class, any-disease-vs-normal numbers of each kept row."""
    out: dict = {"model": deployed, "per_class": {}, "any_disease": {}}
    for t in tasks:
        m = results.get(deployed, {}).get(t.name) if deployed else None
        if t.kind == "classification" and m and m.get("n"):
            out["per_class"][t.name] = one_vs_rest(m["confusion_matrix"], t.classes)
    cc = cfg.clinical
    for t in (t for t in tasks if t.normal is not None):
        entry: dict = {"normal": t.normal, "operating_point": cc.operating_point,
                       "target_sensitivity": 100.0 * cc.target_sensitivity if cc.operating_point == "sensitivity"
                       else None, "rows": {}}
        for row in CI_ROWS:
            kept = outputs.get(row)
            if kept is None or kept.val is None or t.name not in kept.test:
                continue
            try:
                entry["rows"][row] = any_disease(kept.val[t.name], val.targets[t.name], kept.test[t.name],
                                                 test.targets[t.name], patient_ids(test), t.classes.index(t.normal),
                                                 cc.operating_point, cc.target_sensitivity, cc.bootstrap_resamples,
                                                 cfg.seed)
            except ClinicalError as exc:  # e.g. no normal image in validation: say so, keep the summary
                entry["rows"][row] = {"error": str(exc)}
        out["any_disease"][t.name] = entry
    return out


def any_disease_lines(any_disease_by_task: dict) -> list[str]:
    """Markdown: any-disease-vs-normal per task, one row per model, 95 % intervals in brackets."""
    lines: list[str] = []
    for task, entry in any_disease_by_task.items():
        rule = (f"the most specific threshold with validation sensitivity >= {entry['target_sensitivity']:g} %"
                if entry["operating_point"] == "sensitivity" else "Youden's J on validation")
        lines += ["", f"Any disease vs `{entry['normal']}` ({task}; score 1 - p({entry['normal']}); refer at score >= "
                      f"threshold, chosen as {rule}, then applied to test; %, 95 % interval in brackets):", "",
                  *table_head(["model", "threshold", "sensitivity", "specificity", "AUROC", "val. sens. / spec."])]
        for row, r in entry["rows"].items():
            if "error" in r:
                lines.append(table_row([row, r["error"], "", "", "", ""]))
                continue
            cells = [f"{_num(r[k])} [{_interval(r['ci95'].get(k))}]" for k in ("sensitivity", "specificity", "auroc")]
            val = f"{_num(r['validation']['sensitivity'])} / {_num(r['validation']['specificity'])}"
            lines.append(table_row([row, f"{r['threshold']:.3f}", *cells, val]))
    return lines


def _num(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def per_class_section(model: str, metrics: dict, tasks: list[TaskSpec], run_dir) -> list[str]:
    """Markdown lines: per-class sensitivity / specificity (one class vs the rest, with support) of every
    classification task of `model`, and a confusion-matrix PNG per task next to summary.md (a skewed set
    hides its rare classes in accuracy)."""
    lines = [f"Per-class sensitivity / specificity of the {model} on test (one class vs the rest, support in "
             "brackets):", ""]
    for t in tasks:
        m = metrics.get(t.name)
        if t.kind != "classification" or not m or not m.get("n"):
            continue
        rates = one_vs_rest(m["confusion_matrix"], t.classes)
        cells = [f"{c} {_pct(rates[c]['sensitivity'])} / {_pct(rates[c]['specificity'])} ({rates[c]['support']})"
                 for c in t.classes]
        png = f"confusion_{model}_{t.name}.png"
        plot_confusion_matrix(m["confusion_matrix"], list(t.classes), f"{model}: {t.name} (test)", run_dir / png)
        lines.append(f"- {t.name}: " + ", ".join(cells) + f" — [{png}]({png})")
    return lines


def _pct(value) -> str:
    return "—" if value is None else f"{value:.0f}%"

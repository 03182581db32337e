"""The verdict's targets, judged from what the stages wrote (benchmarks.verdict renders them).

Reads summary.json (train.student), the compress report's guard decisions (compress.quantize) and the
bench report (benchmarks.bench); nothing is re-measured. Each target is a `Check`: PASS / FAIL / n/a
with its numbers and, when it fails, the short reason the verdict line names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.report import RAN, latency_ratio
from compress.drops import format_drops, within
from deploy.contract import TaskSpec
from deploy.errors import MissingInput
from train.data.manifest import load_spec
from train.experiment import ExperimentConfig
from train.floors import floor_violations, parse_floor, unmatched_floors
from train.layout import INT8_FLAVOURS, RunLayout
from train.metrics import fraction_scale, to_points
from train.stage_times import read_stage_times
from train.summary_rules import PROBE_ROW, below_floors

STUDENT = "student"
ENSEMBLE_ONNX = "ensemble.fp32"  # timed in ONNX Runtime like the INT8 student, so the ratio is one runtime's
MIN_SPEEDUP = 1.0  # the deployed student must at least be faster than the ensemble it replaces


@dataclass
class Inputs:
    """What the stages wrote, read once."""

    layout: RunLayout
    summary: dict
    compress: dict
    report: dict
    stages: dict
    tasks: list[TaskSpec]
    joint: list[tuple[str, ...]]


@dataclass
class Check:
    """One target: passed (True / False / None = could not be judged), its line, and a short reason."""

    target: str
    passed: bool | None
    detail: str
    reason: str = ""

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]
        return f"- **{mark}** {self.target}: {self.detail}"


@dataclass
class Deployed:
    """The student artifact the verdict judges: its bench record (None when not benchmarked)."""

    name: str
    flavour: str
    record: dict | None
    guard: dict = field(default_factory=dict)  # the compress report's entry of this flavour


# --- inputs ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise MissingInput(f"{path}: not valid JSON ({exc}); run its stage again") from None


def load_inputs(cfg: ExperimentConfig) -> Inputs:
    """Read every file the verdict needs; MissingInput naming each missing file and the stage that writes it."""
    layout = cfg.layout
    needed = [(layout.summary("json"), "make student"), (layout.compress_report("json"), "make compress"),
              (layout.bench_report("json"), "make bench")]
    found = {path: _read_json(path) for path, _ in needed}
    missing = [f"{path} (run `{stage}`)" for path, stage in needed if found[path] is None]
    if missing:
        first = next(stage for path, stage in needed if found[path] is None)
        raise MissingInput(f"the verdict needs {'; '.join(missing)}; run `{first}` and the stages after it "
                           f"(or `make all`), then `make verdict`")
    spec = load_spec(cfg.data.root)
    return Inputs(layout, found[layout.summary("json")], found[layout.compress_report("json")],
                  found[layout.bench_report("json")], read_stage_times(layout), list(spec.tasks),
                  [tuple(g) for g in spec.joint])


def bench_record(report: dict, name: str) -> dict | None:
    return next((r for r in report.get("artifacts", []) if r["name"] == name and r["status"] in RAN), None)


def deployed_student(inputs: Inputs) -> Deployed:
    """The INT8 student that goes to the device: the first INT8 flavour (int8-cpu, then int8-tensorrt) that
    passed the guard and was benchmarked; else one the guard passed (numbers n/a until `make bench`);
    else the first INT8 flavour benchmarked (its guard check fails)."""
    flavours = inputs.compress.get(STUDENT, {}).get("flavours", {})
    passed = [f for f in INT8_FLAVOURS if flavours.get(f, {}).get("status") == "passed"]
    measured = [f for f in INT8_FLAVOURS if bench_record(inputs.report, f"{STUDENT}.{f}")]
    flavour = next((f for f in passed if f in measured), None) or next(iter(passed + measured), INT8_FLAVOURS[0])
    name = f"{STUDENT}.{flavour}"
    return Deployed(name, flavour, bench_record(inputs.report, name), flavours.get(flavour, {}))


# --- numbers and intervals ------------------------------------------------------------------------
def ci_of(source: dict, row: str, key: str) -> tuple[float, float] | None:
    """The 95 % CI of `row`'s `key` from a report's `ci95` block, on the scale of the metric values
    (fractions; BLEU 0-100). A CI given in report points (a bound above 1 on a fraction metric) is
    scaled back, so either convention reads right."""
    ci = ((source.get("ci95") or {}).get(row) or {}).get(key)
    if not ci or len(ci) != 2 or any(v is None for v in ci):
        return None
    lo, hi = float(ci[0]), float(ci[1])
    if fraction_scale(key) == 1.0 and not key.endswith("/mae") and max(abs(lo), abs(hi)) > 1.0:
        lo, hi = lo / 100.0, hi / 100.0
    return lo, hi


@dataclass
class Row:
    label: str
    values: dict
    source: dict  # the report holding its ci95 block
    ci_name: str  # its name in that block

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    def ci(self, key: str) -> tuple[float, float] | None:
        return ci_of(self.source, self.ci_name, key)


def comparison_rows(inputs: Inputs, deployed: Deployed) -> dict[str, Row]:
    """The rows of table (a), keyed by their role: deployed INT8 (bench), its FP32 ONNX (bench, same
    images), the PyTorch student, ensemble, baseline and probe (summary.json, the whole test split)."""
    rows_in = inputs.summary.get("rows", {})
    rows = {"int8": Row(f"{deployed.name} (deployed, bench)", (deployed.record or {}).get("metrics", {}),
                        inputs.report, deployed.name)}
    fp32 = bench_record(inputs.report, f"{STUDENT}.fp32")
    if fp32:
        rows["fp32"] = Row(f"{STUDENT}.fp32 (ONNX, bench)", fp32["metrics"], inputs.report, fp32["name"])
    for role, label in ((STUDENT, "student (PyTorch FP32)"), ("ensemble", "teacher ensemble"),
                        ("baseline", "labels-only baseline"), (PROBE_ROW, "linear probe (floor)")):
        if role in rows_in:
            rows[role] = Row(label, rows_in[role], inputs.summary, role)
    return rows


# --- the targets ----------------------------------------------------------------------------------
def _pts(key: str, value: float) -> str:
    return f"{to_points(key, value):.1f}"


def check_probe_floor(rows: dict[str, Row], inputs: Inputs, columns: list[tuple[str, str]]) -> Check:
    """The summary's floor rule (train.summary_rules.below_floors) applied to the INT8 student."""
    target = "INT8 student at or above the linear-probe floor on every column"
    int8, probe = rows["int8"], rows.get(PROBE_ROW)
    shared = [(k, t) for k, t in columns if probe and int8.get(k) is not None and probe.get(k) is not None]
    if not shared:
        return Check(target, None, "no column with both numbers (is the probe in summary.json?)")
    below = below_floors({"student": int8.values, PROBE_ROW: probe.values}, inputs.tasks, inputs.joint)
    titles = dict(columns)
    if below:
        return Check(target, False, "below on " + "; ".join(
            f"{titles[k]} {_pts(k, int8.get(k))} < {_pts(k, probe.get(k))}" for k in below), "below the linear-probe floor")
    key, title = min(shared, key=lambda c: to_points(c[0], int8.get(c[0]) - probe.get(c[0])))
    return Check(target, True, f"{len(shared)} columns; smallest margin {title} "
                               f"{to_points(key, int8.get(key) - probe.get(key)):+.1f} points")


def versus(a: Row, b: Row, key: str) -> str:
    """'better' / 'worse' than b, or 'within CI' when either point lies inside the other's 95 % CI (no CI:
    'same' only on a tie)."""
    va, vb = a.get(key), b.get(key)
    ca, cb = a.ci(key), b.ci(key)
    if (ca and ca[0] <= vb <= ca[1]) or (cb and cb[0] <= va <= cb[1]):
        return "within CI"
    return "better" if va > vb else "worse" if va < vb else "same"


def check_baseline(rows: dict[str, Row], columns: list[tuple[str, str]]) -> Check:
    target = "INT8 student not worse than the labels-only baseline (outside the 95 % CI) on any column"
    int8, base = rows["int8"], rows.get("baseline")
    shared = [(k, t) for k, t in columns if base and int8.get(k) is not None and base.get(k) is not None]
    if not shared:
        return Check(target, None, "no column with both numbers")
    parts = [(t, versus(int8, base, k), f"{_pts(k, int8.get(k))} vs {_pts(k, base.get(k))}") for k, t in shared]
    outcomes = ("worse", "within CI", "same", "better")
    detail = "; ".join(f"{v}: " + ", ".join(f"{t} {nums}" for t, w, nums in parts if w == v)
                       for v in outcomes if any(w == v for _, w, _ in parts))
    if not any(rows[r].ci(k) for r in ("int8", "baseline") for k, _ in shared):
        detail += " (no CIs in the reports: compared as points)"
    worse = [t for t, v, _ in parts if v == "worse"]
    return Check(target, not worse, detail, f"worse than the baseline on {', '.join(worse)}" if worse else "")


def check_guard(deployed: Deployed) -> Check:
    target = f"{deployed.name} within the INT8 accuracy guard of the FP32 student (validation split)"
    entry = deployed.guard
    if not entry:
        return Check(target, False, "no guard entry for the student in the compress report (run `make compress`)",
                     "INT8 guard not run")
    kept = entry.get("kept") or {}
    drops, limits = kept.get("drops") or {}, entry.get("limits") or {}
    if entry.get("status") != "passed":
        return Check(target, False, f"{entry.get('status')}: {entry.get('error', '')}".strip(": "),
                     f"{deployed.flavour} failed the guard")
    intervals = kept.get("intervals") or {}  # a drop over its limit but within noise passes up to the cap
    ok = within(drops, limits, intervals, entry.get("noise_caps", entry.get("noise_cap_points", 0.0)))
    how = f"kept {kept.get('step')} ({kept.get('method')}, {kept.get('images')} images)" if kept else ""
    return Check(target, ok, f"{format_drops(drops, limits, intervals) or 'no guarded metric'}; {how}".strip("; "),
                 "" if ok else "INT8 drop over the guard")


def check_bench_floors(inputs: Inputs, cfg_floors: Sequence[str]) -> Check:
    target = "configured bench floors"
    texts = (inputs.report.get("settings") or {}).get("floors")
    texts = list(cfg_floors if texts is None else texts)
    if not texts:
        return Check(target, None, "none configured (bench.floors or --min-metric)")
    floors = [parse_floor(t) for t in texts]
    measured = [r for r in inputs.report.get("artifacts", []) if r["status"] in RAN]
    missed = [f"{r['name']}: {v}" for r in measured for v in floor_violations(floors, r["name"], r["metrics"])]
    missed += [f"floor {f} matched no measured artifact" for f in unmatched_floors(floors, [r["name"] for r in measured])]
    if missed:
        return Check(target, False, "; ".join(missed), "a bench floor missed")
    return Check(target, True, f"{len(floors)} floor(s) met: " + ", ".join(texts))


def check_ensemble(inputs: Inputs, columns: list[tuple[str, str]]) -> Check:
    """The ensemble against the teacher validation picks per column (the one a user without the ensemble
    would deploy); the best teacher on test, chosen after seeing test, is named beside it, and judges the
    columns validation picks no teacher for (an older summary.json, teachers without a validation record)."""
    target = "teacher ensemble not behind the teacher validation picks"
    summary, titles = inputs.summary, dict(columns)
    after_test = summary.get("ensemble_behind_teacher")
    if after_test is None:
        return Check(target, None, "summary.json has no ensemble comparison (written by an older train.student: "
                     "rerun `make student`, which keeps the trained models)")
    picked = summary.get("ensemble_vs_validation_pick") or {}
    unpicked = {k: v for k, v in after_test.items() if k not in picked}  # judged by the stricter comparison
    behind = {**unpicked, **(summary.get("ensemble_behind_validation_pick") or {})}
    also = {k: v for k, v in after_test.items() if k in picked}
    notes = (f"; behind the best teacher on test (chosen after seeing test): {_gaps(also, titles)}" if also else "")
    if unpicked:
        names = ", ".join(titles.get(k, k) for k in unpicked)
        notes += f"; no validation pick for {names}: judged against the best teacher on test"
    if behind:
        return Check(target, False, _gaps(behind, titles) + notes, "the ensemble is behind a teacher")
    level = [f"{titles.get(k, k)} {gap:+.1f} vs {teacher} (standard error {se:.1f})"
             for k, teachers in (summary.get("ensemble_level_with_validation_pick") or {}).items()
             for teacher, (gap, se) in teachers.items()]
    return Check(target, True, "at or above them on every column" +
                 (f", or level within one paired standard error on test: {'; '.join(level)}" if level else "") + notes)


def _gaps(behind: dict, titles: dict[str, str]) -> str:
    """'fine top-5: -1.5 points vs teacher_a; ...' of a {column: (teacher, gap)} mapping."""
    return "; ".join(f"{titles.get(k, k)}: {gap:+.1f} points vs {teacher}" for k, (teacher, gap) in behind.items())


def check_latency(inputs: Inputs, deployed: Deployed) -> Check:
    target = f"{deployed.name} faster than the teacher ensemble ({ENSEMBLE_ONNX}), batch 1"
    ratio = latency_ratio(bench_record(inputs.report, ENSEMBLE_ONNX), deployed.record)
    if ratio is None:
        return Check(target, None, f"not measured (needs {ENSEMBLE_ONNX} and {deployed.name} in the bench report)")
    ms = [((r or {}).get("latency", {}).get("1") or {}).get("per_image_ms")
          for r in (bench_record(inputs.report, ENSEMBLE_ONNX), deployed.record)]
    spread = f", min {ratio['min']:.1f}x, max {ratio['max']:.1f}x over {ratio['rounds']} rounds" if ratio["rounds"] > 1 else ""
    detail = f"{ratio['median']:.1f}x ({ms[0]:.2f} vs {ms[1]:.2f} ms/image{spread})"
    ok = ratio["median"] > MIN_SPEEDUP
    return Check(target, ok, detail, "" if ok else "the student is not faster than the ensemble")


def checks(inputs: Inputs, deployed: Deployed, rows: dict[str, Row], columns: list[tuple[str, str]],
           cfg_floors: Sequence[str]) -> list[Check]:
    if deployed.record is None:  # nothing measured: every accuracy target says so instead of n/a
        missing = Check("INT8 student benchmarked", False, f"{deployed.name} is not in the bench report with "
                        "numbers (run `make bench`)", "INT8 student not benchmarked")
        return [missing, check_guard(deployed), check_bench_floors(inputs, cfg_floors),
                check_ensemble(inputs, columns)]
    return [check_probe_floor(rows, inputs, columns), check_baseline(rows, columns), check_guard(deployed),
            check_bench_floors(inputs, cfg_floors), check_ensemble(inputs, columns), check_latency(inputs, deployed)]


def overall(results: list[Check]) -> str:
    failed = [c.reason or c.target for c in results if c.passed is False]
    return f"NOT READY: {'; '.join(failed)}" if failed else "READY TO DEPLOY"

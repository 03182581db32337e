"""The verdict at the end of `make all`: is the deployed student good enough, and what goes on the device.

    python -m benchmarks.verdict --config configs/default.yaml [key=value ...] [--strict]

Reads what the stages wrote (nothing is re-measured): summary.json (train.student), the compress
report's guard decisions (compress.quantize), the bench report (benchmarks.bench) and
stage_times.json (train.stage_times). Prints and writes runs/<name>/README.md (atomically) with

(a) the deployed student (its INT8 artifact as the benchmark measured it) against the teacher ensemble,
    the labels-only baseline and the linear-probe floor on every headline column, with 95 % CIs where
    the reports carry them (`"ci95": {row_or_artifact: {key: [lo, hi]}}`);
(b) each target PASS / FAIL / n/a with its numbers, and one line: READY TO DEPLOY or NOT READY: <reasons>;
(c) the file to copy to the device and the commands that run it there (ONNX Runtime and TensorRT);
(d) the stage-time table; (e) an index of the run folder.

Exit code 0 whatever the verdict (it is a report; --strict: 1 when NOT READY), 2 when an input is
missing (the message names the stage to run).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.report import RAN, latency_ratio
from compress.drops import format_drops, within
from deploy.build_engine import default_engine_path
from deploy.contract import TaskSpec, sidecar_path
from deploy.errors import EXIT_FAILED, EXIT_OK, MissingInput, cli
from deploy.fileio import atomic_write_text
from train.data.manifest import load_spec
from train.experiment import ExperimentConfig, add_config_args, config_overrides, load_experiment
from train.floors import floor_violations, parse_floor, unmatched_floors
from train.layout import INT8_FLAVOURS, RUN_FOLDER_INDEX, RunLayout
from train.metrics import fraction_scale, to_points
from train.stage_times import read_stage_times, stage_table_markdown
from train.summary_rules import PROBE_ROW, below_floors, summary_columns

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


def _record(report: dict, name: str) -> dict | None:
    return next((r for r in report.get("artifacts", []) if r["name"] == name and r["status"] in RAN), None)


def deployed_student(inputs: Inputs) -> Deployed:
    """The INT8 student that goes to the device: the first INT8 flavour (int8-cpu, then int8-tensorrt) that
    passed the guard and was benchmarked; else one the guard passed (numbers n/a until `make bench`);
    else the first INT8 flavour benchmarked (its guard check fails)."""
    flavours = inputs.compress.get(STUDENT, {}).get("flavours", {})
    passed = [f for f in INT8_FLAVOURS if flavours.get(f, {}).get("status") == "passed"]
    measured = [f for f in INT8_FLAVOURS if _record(inputs.report, f"{STUDENT}.{f}")]
    flavour = next((f for f in passed if f in measured), None) or next(iter(passed + measured), INT8_FLAVOURS[0])
    name = f"{STUDENT}.{flavour}"
    return Deployed(name, flavour, _record(inputs.report, name), flavours.get(flavour, {}))


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


def cell(key: str, value: float | None, ci: tuple[float, float] | None) -> str:
    """'82.3 [79.0, 85.1]' in report units (percent, BLEU 0-100); '—' when absent."""
    if value is None:
        return "—"
    text = f"{to_points(key, value):.1f}"
    return text + (f" [{to_points(key, ci[0]):.1f}, {to_points(key, ci[1]):.1f}]" if ci else "")


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
    fp32 = _record(inputs.report, f"{STUDENT}.fp32")
    if fp32:
        rows["fp32"] = Row(f"{STUDENT}.fp32 (ONNX, bench)", fp32["metrics"], inputs.report, fp32["name"])
    for role, label in ((STUDENT, "student (PyTorch FP32)"), ("ensemble", "teacher ensemble"),
                        ("baseline", "labels-only baseline"), (PROBE_ROW, "linear probe (floor)")):
        if role in rows_in:
            rows[role] = Row(label, rows_in[role], inputs.summary, role)
    return rows


def comparison_table(rows: dict[str, Row], columns: list[tuple[str, str]]) -> str:
    lines = ["| model | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows.values():
        lines.append(f"| {row.label} | " + " | ".join(cell(k, row.get(k), row.ci(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


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
    target = "teacher ensemble not behind its best single teacher"
    behind = inputs.summary.get("ensemble_behind_teacher")
    if behind is None:
        return Check(target, None, "summary.json has no ensemble_behind_teacher (written by an older train.student)")
    titles = dict(columns)
    if behind:
        detail = "; ".join(f"{titles.get(k, k)}: {gap:+.1f} points vs {teacher}" for k, (teacher, gap) in behind.items())
        return Check(target, False, detail, "the ensemble is behind a teacher")
    level = [f"{titles.get(k, k)} {gap:+.1f} vs {teacher} (standard error {se:.1f})"
             for k, teachers in (inputs.summary.get("ensemble_level_with_teacher") or {}).items()
             for teacher, (gap, se) in teachers.items()]
    return Check(target, True, "at or above its best teacher on every column" +
                 (f", or level within one paired standard error on test: {'; '.join(level)}" if level else ""))


def check_latency(inputs: Inputs, deployed: Deployed) -> Check:
    target = f"{deployed.name} faster than the teacher ensemble ({ENSEMBLE_ONNX}), batch 1"
    ratio = latency_ratio(_record(inputs.report, ENSEMBLE_ONNX), deployed.record)
    if ratio is None:
        return Check(target, None, f"not measured (needs {ENSEMBLE_ONNX} and {deployed.name} in the bench report)")
    ms = [((r or {}).get("latency", {}).get("1") or {}).get("per_image_ms")
          for r in (_record(inputs.report, ENSEMBLE_ONNX), deployed.record)]
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


# --- the device, the stage times, the index -------------------------------------------------------
def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "missing"


def device_section(inputs: Inputs, deployed: Deployed) -> list[str]:
    """The files to copy (with sizes) and the commands that run them on the device (deploy/README.md)."""
    layout = inputs.layout
    model = layout.onnx(STUDENT, deployed.flavour)
    trt_onnx = layout.onnx(STUDENT, "int8-tensorrt")
    engine = default_engine_path(trt_onnx)
    q = shlex.quote
    lines = ["Copy to the device (each model with its contract sidecar, which the runtime reads):", "",
             f"- `{model}` ({_size(model)}) + `{sidecar_path(model)}`: ONNX Runtime on the device's CPU"]
    if trt_onnx != model and trt_onnx.is_file():
        lines.append(f"- `{trt_onnx}` ({_size(trt_onnx)}) + `{sidecar_path(trt_onnx)}`: the TensorRT flavour "
                     "(symmetric Q/DQ), built into an engine on the device")
    lines += ["", "On the device, with the deploy interpreter (deploy/README.md: `.deploy/bin/python` on a "
              "Jetson, no torch), keeping the run's relative paths (`rsync -a --relative "
              f"{layout.onnx_dir}/ device:~/fundus/`):", "", "```bash",
              f"python -m deploy.predict {q(str(model))} photos/",
              f"python -m deploy.build_engine {q(str(trt_onnx))} --precision int8",
              f"python -m deploy.predict {q(str(engine))} photos/",
              "```", "", "or with make (deploy/README.md): `make engine DEPLOY_PY=.deploy/bin/python RUN="
              + q(str(layout.root)) + "` (also builds the FP16 engine from student.fp16.onnx, which the rsync "
              f"copies), then `make predict DEPLOY_PY=.deploy/bin/python MODEL={q(str(engine))} IMAGES=photos/`."]
    return lines


def run_index(layout: RunLayout) -> list[str]:
    """One line per top-level entry of the run folder: what it is (train.layout.RUN_FOLDER_INDEX)."""
    if not layout.root.is_dir():
        return []
    lines = []
    for entry in sorted(layout.root.iterdir()):
        if entry.name.startswith("."):
            continue
        name = entry.name + ("/" if entry.is_dir() else "")
        what = next((text for pattern, text in RUN_FOLDER_INDEX.items() if fnmatch.fnmatchcase(name, pattern)), "—")
        lines.append(f"- `{name}`: {what}")
    return lines


# --- the page -------------------------------------------------------------------------------------
def render(inputs: Inputs, cfg_floors: Sequence[str] = ()) -> tuple[str, bool]:
    """(README.md text, ready?)."""
    deployed = deployed_student(inputs)
    columns = summary_columns(inputs.tasks, inputs.joint)
    rows = comparison_rows(inputs, deployed)
    results = checks(inputs, deployed, rows, columns, cfg_floors)
    verdict = overall(results)
    settings = inputs.report.get("settings") or {}
    name = inputs.summary.get("experiment") or inputs.layout.root.name
    out = [f"# {name}: {verdict}", "",
           f"The verdict of `make verdict` on this run folder (`{inputs.layout.root}`), read from summary.json, "
           "onnx/compress_report.json, bench/report.json and stage_times.json.", "",
           "## Targets", "", *[c.line() for c in results], "", f"**{verdict}**", "",
           "## The deployed student against the ensemble, the baseline and the floor", "",
           "Test split; accuracies in %, BLEU 0-100; [95 % CI] where the reports carry one.", "",
           comparison_table(rows, columns), ""]
    images, total = settings.get("images"), settings.get("test_split_images")
    if images and total and images < total:
        out += [f"The bench rows score {images} of the {total} test images (a seeded sample); the summary "
                "rows score all of them.", ""]
    out += ["## Deploy", "", *device_section(inputs, deployed), "",
            "## Stage times", "", stage_table_markdown(inputs.stages), "",
            "## This folder", "", *run_index(inputs.layout), ""]
    return "\n".join(out), not any(c.passed is False for c in results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verdict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the verdict is NOT READY")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_experiment(args.config, config_overrides(args))
    text, ready = render(load_inputs(cfg), cfg.bench.floors)
    atomic_write_text(cfg.layout.verdict(), text)
    print(text, flush=True)
    print(f"[verdict] wrote {cfg.layout.verdict()}", flush=True)
    return EXIT_FAILED if args.strict and not ready else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli(main))

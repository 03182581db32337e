"""The verdict at the end of `make all`: is the deployed student good enough, and what goes on the device.

    python -m benchmarks.verdict --config configs/default.yaml [key=value ...] [--strict]

Reads what the stages wrote (nothing is re-measured; the targets are judged in
benchmarks.verdict_checks) and stage_times.json (train.stage_times). Prints and writes runs/<name>/README.md (atomically) with

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
import shlex
from collections.abc import Sequence
from pathlib import Path

from benchmarks.verdict_checks import (
    STUDENT,
    Deployed,
    Inputs,
    Row,
    checks,
    comparison_rows,
    deployed_student,
    load_inputs,
    overall,
)
from deploy.build_engine import default_engine_path
from deploy.contract import sidecar_path
from deploy.errors import EXIT_FAILED, EXIT_OK, cli
from deploy.fileio import atomic_write_text
from deploy.markdown import table_lines
from train.experiment import add_config_args, config_overrides, load_experiment
from train.layout import RUN_FOLDER_INDEX, RunLayout
from train.metrics import to_points
from train.stage_times import stage_table_markdown
from train.summary_rules import summary_columns


# --- the comparison table -------------------------------------------------------------------------
def cell(key: str, value: float | None, ci: tuple[float, float] | None) -> str:
    """'82.3 [79.0, 85.1]' in report units (percent, BLEU 0-100); '—' when absent."""
    if value is None:
        return "—"
    text = f"{to_points(key, value):.1f}"
    return text + (f" [{to_points(key, ci[0]):.1f}, {to_points(key, ci[1]):.1f}]" if ci else "")


def comparison_table(rows: dict[str, Row], columns: list[tuple[str, str]]) -> str:
    body = ([row.label, *(cell(k, row.get(k), row.ci(k)) for k, _ in columns)] for row in rows.values())
    return "\n".join(table_lines(["model", *(title for _, title in columns)], body))


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

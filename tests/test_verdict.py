"""The verdict (benchmarks/verdict.py, its targets in benchmarks/verdict_checks.py) and the stage times
(train/stage_times.py), on crafted run files: no training. One passing run; then each target broken on its
own; missing inputs; the stage table."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re

import pytest

from benchmarks import verdict as V
from deploy.contract import TaskSpec
from deploy.errors import cli
from train import stage_times as ST
from train.data.manifest import DatasetSpec, save_spec
from train.experiment import load_experiment
from train.layout import RunLayout

TASKS = [TaskSpec("coarse", "classification", ("red", "green", "blue")),
         TaskSpec("fine", "classification", tuple(f"f{i}" for i in range(6))),
         TaskSpec("diagnosis", "text")]
KEYS = ("coarse/accuracy", "coarse/balanced_accuracy", "coarse/macro_f1", "fine/accuracy",
        "fine/balanced_accuracy", "fine/top5", "diagnosis/bleu")


def heads(level: float) -> dict[str, float]:
    """Headline numbers (fractions; BLEU 0-100) all at `level` (BLEU at 100 x level)."""
    return {k: (100 * level if k.endswith("bleu") else level) for k in KEYS}


def record(name: str, level: float | None, ms: float, status: str = "passed") -> dict:
    precision = name.split(".", 1)[1]
    return {"name": name, "model": name.split(".")[0], "role": name.split(".")[0], "format": "onnx",
            "precision": precision, "status": status, "paths": [], "metrics": heads(level) if level else {},
            "latency": {"1": {"per_image_ms": ms, "rounds_ms": [ms * 0.98, ms, ms * 1.02]}}}


PICK = {"teachers": ["teacher_a"], "validation": 90.0, "versus": "teacher_a", "ensemble_minus": 0.5}


def files() -> dict:
    """A run that passes every target."""
    summary = {"experiment": "t", "rows": {"teacher_a": heads(0.80), "ensemble": heads(0.85),
                                           "student": heads(0.80), "baseline": heads(0.70),
                                           "linear probe": heads(0.50)},
               "ensemble_behind_teacher": {}, "ensemble_vs_validation_pick": {"fine/top5": PICK},
               "ensemble_behind_validation_pick": {}}
    guard = {"path": "x", "status": "passed", "limits": {"coarse/balanced_accuracy": 2.0, "fine/top5": 2.0},
             "kept": {"step": "default", "method": "minmax", "images": 64,
                      "drops": {"coarse/balanced_accuracy": 0.5, "fine/top5": -0.3}}}
    compress = {"student": {"flavours": {"int8-cpu": guard, "int8-tensorrt": copy.deepcopy(guard)}}}
    report = {"settings": {"floors": ["student.int8-cpu:coarse/accuracy=70"], "images": 40, "test_split_images": 40},
              "artifacts": [record("ensemble.fp32", 0.85, 20.0), record("student.fp32", 0.80, 3.0),
                            record("student.int8-cpu", 0.79, 2.0), record("student.int8-tensorrt", 0.78, 4.0)]}
    return {"summary": summary, "compress": compress, "report": report}


@pytest.fixture
def run(tmp_path):
    """(config args, layout, write(files)): a dataset spec and a run folder under tmp_path."""
    data = tmp_path / "data"
    save_spec(DatasetSpec(name="tiny", tasks=TASKS), data)
    args = ["--config", "configs/default.yaml", f"data.root={data}", f"runs_root={tmp_path / 'runs'}", "name=t"]
    cfg = load_experiment(args[1], args[2:])
    layout = cfg.layout

    def write(content: dict) -> None:
        for key, path in (("summary", layout.summary("json")), ("compress", layout.compress_report("json")),
                          ("report", layout.bench_report("json"))):
            if key in content:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(content[key]))
        layout.onnx_dir.mkdir(parents=True, exist_ok=True)
        for flavour in ("int8-cpu", "int8-tensorrt"):
            layout.onnx("student", flavour).write_bytes(b"\0" * 2_500_000)

    return args, layout, write


def verdict_of(run, content: dict) -> tuple[str, bool]:
    args, layout, write = run
    write(content)
    cfg = load_experiment(args[1], args[2:])
    return V.render(V.load_inputs(cfg), cfg.bench.floors)


def target_line(text: str, words: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("- **") and words in line)


# --- the passing run --------------------------------------------------------------------------------
def test_a_good_run_is_ready_with_every_target_on_its_own_line(run, capsys):
    args, layout, write = run
    write(files())
    assert cli(V.main, args) == 0
    text = layout.verdict().read_text()
    assert text.startswith("# t: READY TO DEPLOY") and "**READY TO DEPLOY**" in text
    for words in ("linear-probe floor", "labels-only baseline", "accuracy guard", "bench floors",
                  "teacher validation picks", "faster than the teacher ensemble"):
        assert target_line(text, words).startswith("- **PASS**"), words
    assert "10.0x (20.00 vs 2.00 ms/image" in target_line(text, "faster than")
    assert "better: coarse acc 79.0 vs 70.0, coarse bal. acc 79.0 vs 70.0" in target_line(text, "baseline")
    # (a) the deployed INT8 row against the ensemble, baseline and probe on every headline column
    assert "| student.int8-cpu (deployed, bench) | 79.0 |" in text and "| linear probe (floor) | 50.0 |" in text
    assert "diagnosis BLEU" in text and "fine top-5" in text
    # (c) the file for the device with its size, and the commands
    assert f"`{layout.onnx('student', 'int8-cpu')}` (2.5 MB)" in text
    assert "python -m deploy.build_engine" in text and "student.int8-tensorrt.trt.engine" in text
    assert "READY TO DEPLOY" in capsys.readouterr().out


def test_cis_are_shown_and_a_gap_inside_them_is_not_worse(run):
    content = files()
    content["report"]["artifacts"][2]["metrics"]["coarse/accuracy"] = 0.65  # below the baseline's 0.70 ...
    content["report"]["ci95"] = {"student.int8-cpu": {"coarse/accuracy": [0.55, 0.75]}}  # ... within its CI
    content["summary"]["ci95"] = {"baseline": {"coarse/accuracy": [62.0, 78.0]}}  # in points: read either way
    content["report"]["settings"]["floors"] = []
    text, ready = verdict_of(run, content)
    assert "65.0 [55.0, 75.0]" in text and "70.0 [62.0, 78.0]" in text
    assert "within CI: coarse acc 65.0 vs 70.0; better: coarse bal. acc" in target_line(text, "baseline")
    assert ready


# --- each target broken on its own ----------------------------------------------------------------------
def _probe_above(c):
    c["summary"]["rows"]["linear probe"]["fine/top5"] = 0.95


def _worse_than_baseline(c):
    c["report"]["artifacts"][2]["metrics"]["coarse/macro_f1"] = 0.60


def _guard_drop(c):
    c["compress"]["student"]["flavours"]["int8-cpu"]["kept"]["drops"]["fine/top5"] = 2.5


def _floor(c):
    c["report"]["settings"]["floors"] = ["student.int8-cpu:coarse/accuracy=90"]


def _unmatched_floor(c):
    c["report"]["settings"]["floors"] = ["studnet.*:coarse/accuracy=10"]


def _ensemble_behind(c):
    c["summary"]["ensemble_vs_validation_pick"]["fine/top5"] = {**PICK, "ensemble_minus": -1.5}
    c["summary"]["ensemble_behind_validation_pick"] = {"fine/top5": ["teacher_a", -1.5]}


def _slower(c):
    c["report"]["artifacts"][0]["latency"]["1"] = {"per_image_ms": 1.0, "rounds_ms": [1.0, 1.0, 1.0]}


@pytest.mark.parametrize("breaks, target, reason", [
    (_probe_above, "linear-probe floor", "below the linear-probe floor"),
    (_worse_than_baseline, "labels-only baseline", "worse than the baseline on coarse macro-F1"),
    (_guard_drop, "accuracy guard", "INT8 drop over the guard"),
    (_floor, "bench floors", "a bench floor missed"),
    (_unmatched_floor, "bench floors", "a bench floor missed"),
    (_ensemble_behind, "teacher validation picks", "the ensemble is behind a teacher"),
    (_slower, "faster than the teacher ensemble", "the student is not faster than the ensemble"),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_each_broken_target_fails_alone_with_its_reason(run, breaks, target, reason):
    content = files()
    breaks(content)
    text, ready = verdict_of(run, content)
    assert not ready
    assert text.startswith(f"# t: NOT READY: {reason}")
    failed = [line for line in text.splitlines() if line.startswith("- **FAIL**")]
    assert len(failed) == 1 and target in failed[0], failed


def test_an_ensemble_level_with_a_teacher_passes_and_says_so(run):
    content = files()
    content["summary"]["ensemble_level_with_validation_pick"] = {"fine/top5": {"teacher_a": [-0.5, 0.6]}}
    text, ready = verdict_of(run, content)
    line = next(ln for ln in text.splitlines() if "validation picks" in ln)
    assert ready and line.startswith("- **PASS**") and "fine top-5 -0.5 vs teacher_a (standard error 0.6)" in line


def test_an_ensemble_behind_only_the_best_teacher_on_test_passes_and_names_it(run):
    """The best teacher on test is chosen after seeing test: named on the line, not judged, where
    validation picked a teacher for the column; on a failing line too."""
    content = files()
    content["summary"]["ensemble_behind_teacher"] = {"fine/top5": ["teacher_b", -1.5]}
    text, ready = verdict_of(run, content)
    line = next(ln for ln in text.splitlines() if "validation picks" in ln)
    named = "behind the best teacher on test (chosen after seeing test): fine top-5: -1.5 points vs teacher_b"
    assert ready and line.startswith("- **PASS**") and named in line
    _ensemble_behind(content)
    text, ready = verdict_of(run, content)
    line = next(ln for ln in text.splitlines() if "validation picks" in ln)
    assert not ready and line.startswith("- **FAIL** ") and "fine top-5: -1.5 points vs teacher_a" in line
    assert named in line


@pytest.mark.parametrize("picks", [None, {}], ids=["older summary", "no validation records"])
def test_a_column_without_a_validation_pick_is_judged_against_the_best_teacher_on_test(run, picks):
    content = files()
    content["summary"]["ensemble_behind_teacher"] = {"fine/top5": ["teacher_b", -1.5]}
    content["summary"]["ensemble_vs_validation_pick"] = picks
    text, ready = verdict_of(run, content)
    line = next(ln for ln in text.splitlines() if "validation picks" in ln)
    assert not ready
    assert line.startswith("- **FAIL** teacher ensemble not behind the teacher validation picks: fine top-5: "
                           "-1.5 points vs teacher_b")
    assert "no validation pick for fine top-5: judged against the best teacher on test" in line


def test_a_summary_without_an_ensemble_comparison_cannot_judge_the_ensemble(run):
    content = files()
    del content["summary"]["ensemble_behind_teacher"]
    text, ready = verdict_of(run, content)
    line = next(ln for ln in text.splitlines() if "validation picks" in ln)
    assert ready and line.startswith("- **n/a**") and "rerun `make student`" in line


def test_the_numbers_of_a_failure_are_on_its_line(run):
    content = files()
    _probe_above(content)
    _floor(content)
    text, _ = verdict_of(run, content)
    assert "fine top-5 79.0 < 95.0" in target_line(text, "linear-probe")
    assert "coarse/accuracy 79 % < 90 %" in target_line(text, "bench floors")


@pytest.mark.parametrize("stale_bench", [False, True], ids=["bench-skipped-it", "stale-bench-record"])
def test_a_flavour_that_failed_the_guard_is_not_deployed(run, stale_bench):
    content = files()
    content["compress"]["student"]["flavours"]["int8-cpu"].update(status="failed: accuracy guard", error="too far")
    if not stale_bench:  # compress deletes a failed flavour, so the bench finds nothing to measure
        content["report"]["artifacts"] = [a for a in content["report"]["artifacts"] if a["name"] != "student.int8-cpu"]
    content["report"]["settings"]["floors"] = ["student.int8-*:coarse/accuracy=70"]
    text, ready = verdict_of(run, content)
    assert ready and "| student.int8-tensorrt (deployed, bench) | 78.0 |" in text
    assert "python -m deploy.predict" in text and "student.int8-tensorrt.onnx" in text


def test_an_int8_student_the_bench_did_not_measure_is_not_ready(run):
    content = files()
    content["report"]["artifacts"] = content["report"]["artifacts"][:2]
    text, ready = verdict_of(run, content)
    assert not ready and "INT8 student not benchmarked" in text.splitlines()[0]


# --- missing inputs ------------------------------------------------------------------------------------
def test_a_missing_input_names_the_stage_to_run_and_exits_2(run, capsys):
    args, layout, write = run
    content = files()
    del content["report"]
    write(content)
    assert cli(V.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the verdict needs") and "run `make bench`" in err and "Traceback" not in err
    assert not layout.verdict().exists()


def test_several_missing_inputs_start_from_the_earliest_stage(run, capsys):
    args, _, write = run
    write({})
    assert cli(V.main, args) == 2
    err = capsys.readouterr().err
    assert "summary.json (run `make student`)" in err and "; run `make student` and the stages after it" in err


# --- the device commands parse as tests/test_docs.py parses the README's -----------------------------------
class _Parsed(Exception):
    pass


def test_the_device_commands_of_the_verdict_parse(run, monkeypatch):
    text, _ = verdict_of(run, files())
    commands = re.findall(r"^(python -m \S+ .*)$", text, flags=re.M)
    assert {c.split()[2] for c in commands} == {"deploy.predict", "deploy.build_engine"}
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    for command in commands:
        with pytest.raises(_Parsed):
            importlib.import_module(command.split()[2]).main(command.split()[3:])


# --- stage times -----------------------------------------------------------------------------------------
def test_stage_table_in_pipeline_order_with_shares_and_total(tmp_path):
    layout = RunLayout(tmp_path)
    for stage, seconds in (("bench", 60), ("teachers", 480), ("check", 6), ("student", 180), ("compress", 54)):
        ST.record_stage(layout, stage, 1000.0, 1000.0 + seconds, 0)
    ST.record_stage(layout, "export", 1000.0, 1120.0, 1)
    table, total = ST.stage_table(ST.read_stage_times(layout))
    assert [row[0] for row in table] == ["check", "teachers", "student", "export", "compress", "bench"]
    assert total == pytest.approx(15.0) and sum(row[2] for row in table) == pytest.approx(1.0)
    md = ST.stage_table_markdown(ST.read_stage_times(layout))
    assert "| teachers | 8.0 | 53% | ok |" in md and "| export | 2.0 | 13% | failed |" in md
    assert "| **total** | **15.0** | 100% | |" in md


def test_a_rerun_replaces_its_stage_entry(tmp_path):
    layout = RunLayout(tmp_path)
    ST.record_stage(layout, "teachers", 0.0, 900.0, 0)
    ST.record_stage(layout, "student", 0.0, 60.0, 0)
    ST.record_stage(layout, "teachers", 0.0, 3.5, 0)  # up to date: a short, honest time
    stages = ST.read_stage_times(layout)
    assert stages["teachers"]["seconds"] == 3.5 and stages["student"]["seconds"] == 60.0


def _stage_main(code: int, layout_args: list[str]):
    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog="python -m fake")
        parser.add_argument("--list", action="store_true")
        parser.parse_args(argv)
        load_experiment(layout_args[1], layout_args[2:])
        return code
    return main


def test_run_stage_records_time_and_status_in_the_run_folder(run, monkeypatch):
    args, layout, _ = run
    monkeypatch.delenv(ST.STAGE_ENV, raising=False)
    assert ST.run_stage(_stage_main(1, args), "compress", []) == 1
    entry = ST.read_stage_times(layout)["compress"]
    assert entry["status"] == "failed" and entry["exit_code"] == 1 and entry["seconds"] >= 0
    assert ST.STAGE_ENV not in os.environ  # restored for the next stage in this process
    with pytest.raises(SystemExit):
        ST.run_stage(_stage_main(0, args), "check", ["--help"])
    assert ST.run_stage(_stage_main(0, args), "check", ["--list"], skip_flags=("--list",)) == 0
    monkeypatch.setenv(ST.STAGE_ENV, "teachers")  # a process started by a timed stage
    assert ST.run_stage(_stage_main(0, args), "student", []) == 0
    assert set(ST.read_stage_times(layout)) == {"compress"}


def test_timed_stage_records_each_block_and_hides_the_stage_from_its_children(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path)
    monkeypatch.delenv(ST.STAGE_ENV, raising=False)
    with ST.timed_stage(layout, "teachers", ["--config", "c.yaml"]):
        assert os.environ[ST.STAGE_ENV] == "teachers"  # parallel teacher processes do not record
    with pytest.raises(RuntimeError), ST.timed_stage(layout, "student"):
        raise RuntimeError("a failed student")
    stages = ST.read_stage_times(layout)
    assert stages["teachers"]["status"] == "ok" and stages["teachers"]["argv"] == ["--config", "c.yaml"]
    assert stages["student"]["status"] == "failed" and ST.STAGE_ENV not in os.environ


def test_the_verdict_shows_the_stage_table(run):
    args, layout, write = run
    ST.record_stage(layout, "teachers", 0.0, 600.0, 0)
    ST.record_stage(layout, "bench", 0.0, 200.0, 0)
    text, _ = verdict_of(run, files())
    assert "| teachers | 10.0 | 75% | ok |" in text and "| **total** | **13.3** |" in text
    assert "- `stage_times.json`: wall time" in text and "- `onnx/`: ONNX exports" in text

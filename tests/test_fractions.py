"""The label-fraction experiment (train.fractions): one table of every finished fraction, timed stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_tiny_dataset, write_tiny_config

import train.fractions as fractions
from train.config import save_config
from train.data.manifest import load_dataset
from train.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.mark.slow
def test_label_fraction_experiment_table_and_plot(tiny_data, tmp_path):
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs", **{
        "teachers.members": [{"name": "t_all", "tasks": ["coarse", "fine", "diagnosis"]},
                             {"name": "t_coarse", "tasks": ["coarse"]}],
        "teachers.train.epochs": 2, "student.train.epochs": 1})
    for fraction in ("0.5", "1.0"):  # two invocations: the table holds every finished fraction
        proc = subprocess.run([sys.executable, "-m", "train.fractions", "--config", str(cfg), "--fractions", fraction,
                               "--jobs", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "tiny" / "fractions"
    rows = json.loads((out / "fractions.json").read_text())
    assert {(r["fraction"], r["model"]) for r in rows} == {(f, m) for f in (0.5, 1.0)
                                                           for m in ("ensemble", "student", "baseline",
                                                                     "linear probe")}
    assert (out / "fractions.png").stat().st_size > 0 and "| 50% | student |" in (out / "fractions.md").read_text()
    # 100 % is the experiment's own run; teachers ran as parallel processes, each with its log.
    assert (out.parent / "summary.json").exists() and not (tmp_path / "runs" / "tiny-frac100").exists()
    assert (tmp_path / "runs" / "tiny-frac050" / "teachers" / "t_coarse" / "train.log").exists()
    for run in ("tiny-frac050", "tiny"):  # each fraction's stages timed as a whole, not per teacher job
        stages = json.loads((tmp_path / "runs" / run / "stage_times.json").read_text())["stages"]
        assert {"teachers", "student"} <= set(stages) and "--only" not in stages["teachers"]["argv"], stages
    half = load_dataset(tiny_data, manifest="manifest.frac050.seed0.csv")
    full = load_dataset(tiny_data)
    kept = {r.patient_id for r in half.split("train")}
    assert 0.4 <= len(kept) / len({r.patient_id for r in full.split("train")}) <= 0.6
    moved = [r for r in half.split("unlabeled") if r.patient_id in {x.patient_id for x in full.split("train")}]
    assert moved and all(not any(r.labels.values()) for r in moved)  # their labels are really gone
    assert half.split("test") == full.split("test")  # evaluation untouched


def _finished_run(runs: Path, name: str, config: Path, fraction: float | None, **changes) -> None:
    """A run folder as the student stage leaves it: summary.json and the student's resolved config."""
    overrides = [f"name={name}", f"data.label_fraction={'null' if fraction is None else fraction}",
                 *(f"{k}={v}" for k, v in changes.items())]
    save_config(load_experiment(config, overrides), runs / name / "student" / "config.yaml")
    rows = {"student": {"coarse/accuracy": 0.5}, "teacher_x": {"coarse/accuracy": 0.9}}
    (runs / name / "summary.json").write_text(json.dumps({"label_fraction": fraction, "rows": rows}))


def test_the_fractions_table_keeps_earlier_fractions_and_leaves_out_other_configs(tiny_data, tmp_path, capsys):
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    runs = tmp_path / "runs"
    _finished_run(runs, "tiny", cfg, None)
    _finished_run(runs, "tiny-frac050", cfg, 0.5, **{"bench.rounds": 7})  # bench settings do not matter
    _finished_run(runs, "tiny-frac030", cfg, 0.3, **{"student.kd.alpha": 0.5})
    _finished_run(runs, "tiny-frac020-copy", cfg, 0.2)  # a copy of a run, not one of the experiment
    (runs / "tiny-frac020").mkdir()  # started, not finished: no summary yet
    _finished_run(runs, "tiny-frac070", cfg, 0.7)
    (runs / "tiny-frac070" / "summary.json").write_text('{"rows": ')  # damaged by hand
    _finished_run(runs, "tiny-frac080", cfg, 0.8)
    (runs / "tiny-frac080" / "student" / "config.yaml").unlink()  # made before configs were saved
    for name, damaged in (("tiny-frac090", "student: ["), ("tiny-frac095", "- not a mapping")):  # by hand
        _finished_run(runs, name, cfg, float(name[-3:]) / 100)
        (runs / name / "student" / "config.yaml").write_text(damaged)
    summaries = fractions.finished_summaries(load_experiment(cfg))
    rows = fractions.fraction_rows(summaries, [("coarse/accuracy", "coarse acc")])
    assert rows == [{"fraction": 0.5, "model": "student", "coarse/accuracy": 0.5},
                    {"fraction": 1.0, "model": "student", "coarse/accuracy": 0.5}]
    assert capsys.readouterr().out.splitlines() == [
        f"{runs / 'tiny-frac030'}: left out of the fractions table: trained with another config "
        "(student.kd.alpha); rerun that fraction to include it",
        f"{runs / 'tiny-frac070'}: left out of the fractions table: summary.json is unreadable; "
        "rerun that fraction to include it",
        f"{runs / 'tiny-frac080'}: left out of the fractions table: it has no saved student config "
        "(config.yaml); rerun that fraction to include it",
        *(f"{runs / name}: left out of the fractions table: its saved student config (config.yaml) is "
          "unreadable; rerun that fraction to include it" for name in ("tiny-frac090", "tiny-frac095"))]

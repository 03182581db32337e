"""Runs that read well: timestamped progress lines instead of bar frames in logs, status.json, the
start-of-run summary, ONNX Runtime kept quiet (train/progress.py, train/loop.py, deploy/runtime.py)."""

from __future__ import annotations

import io
import json
import re
import sys
import threading

import pytest

from train import progress
from train.progress import TrainingProgress, format_eta, read_status, stage

STAMP = r"\d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", patients=15, unlabeled_patients=0)


@pytest.fixture
def log_lines(monkeypatch, capsys):
    """Not a terminal, every step reported: returns a function giving the printed lines."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    return lambda: capsys.readouterr().out.splitlines()


def test_a_log_gets_timestamped_lines_with_stage_epoch_step_loss_and_eta(log_lines, tmp_path):
    with stage("teachers 3/7", tmp_path):
        run = TrainingProgress("teacher_fine", [10, 10, 10, 10, 10], start_epoch=1)
        run.step(1, 4, 10, 0.9123)
        run.epoch_done(1, 0.9, 0.61, True, 12.0)
    step_line, epoch_line = log_lines()
    assert re.fullmatch(STAMP + r" \[teachers 3/7\] teacher_fine epoch 2/5 step 4/10 loss 0\.912 ETA \d+ s",
                        step_line), step_line
    assert re.fullmatch(STAMP + r" \[teachers 3/7\] teacher_fine epoch 2/5 loss 0\.9000 val score 0\.6100 \(best\) "
                        r"12s ETA \d+ s", epoch_line), epoch_line


def test_a_terminal_gets_bars_and_a_log_none(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    items = [1, 2, 3]
    assert progress.bar(items, desc="x") is items  # no tqdm: no frames, no carriage returns in a log
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert progress.bar(items, desc="x") is not items
    assert progress.bar(items, desc="x", disable=True) is items  # other DDP ranks


def test_step_lines_are_rate_limited(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    run = TrainingProgress("student", [100])
    for i in range(100):
        run.step(0, i + 1, 100, 1.0)
    assert capsys.readouterr().out == ""  # 100 fast steps, well inside LINE_EVERY_S: no line


@pytest.mark.parametrize("seconds, text", [(None, "ETA ?"), (42, "ETA 42 s"), (360, "ETA 6 min"),
                                           (9000, "ETA 2.5 h")])
def test_eta_reads_naturally(seconds, text):
    assert format_eta(seconds) == text


def test_status_json_has_every_model_being_trained(log_lines, tmp_path):
    with stage("teachers 1/2", tmp_path):
        first = TrainingProgress("t_coarse", [5, 5])
        first.step(0, 3, 5, 1.25)
    with stage("teachers 2/2", tmp_path):
        second = TrainingProgress("t_fine", [5, 5])
        second.epoch_done(0, 2.0, 0.5, True, 3.0)
        second.finished(tmp_path / "best.safetensors")
    status = json.loads((tmp_path / "status.json").read_text())
    coarse, fine = status["models"]["t_coarse"], status["models"]["t_fine"]
    assert coarse["stage"] == "teachers 1/2" and coarse["state"] == "training"
    assert (coarse["epoch"], coarse["step"], coarse["steps_in_epoch"], coarse["total_steps"]) == (1, 3, 5, 10)
    assert coarse["done_steps"] == 1 and coarse["loss"] == 1.25 and isinstance(coarse["eta_s"], int)
    assert fine["state"] == "done" and fine["eta_s"] == 0 and fine["best"].endswith("best.safetensors")
    assert status["current"]["model"] == "t_fine" and re.fullmatch(r"\d{4}-\d\d-\d\dT" + STAMP, status["updated"])
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_status_updates_from_parallel_writers_are_not_lost(tmp_path):
    def write(name: str) -> None:
        for step in range(20):
            progress.update_status(tmp_path, name, step=step)

    threads = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    models = read_status(tmp_path)["models"]
    assert {k: v["step"] for k, v in models.items()} == {f"t{i}": 19 for i in range(4)}


def test_no_stage_no_status_file(log_lines, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    TrainingProgress("probe", [3]).step(0, 1, 3, 0.5)
    assert "[probe] epoch 1/1 step 1/3" in log_lines()[0]
    assert not list(tmp_path.rglob("status.json"))


def test_a_training_run_prints_its_plan_and_writes_status(tiny_data, tmp_path, capsys, monkeypatch):
    """The real loop: the start-of-run summary, per-epoch lines, no bar frames, status 'done'."""
    from tiny import write_tiny_config

    from train import teachers

    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs",
                            **{"teachers.train.epochs": 2, "teachers.members": [{"name": "t_coarse", "tasks": ["coarse"]}]})
    assert teachers.main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    for expected in (r"\[teachers 1/1\] t_coarse device cpu with \d+ thread\(s\), AMP off \(CPU\)",
                     r"\[teachers 1/1\] t_coarse backbone test_efficientnet, weights: random initialisation",
                     r"\[teachers 1/1\] t_coarse plan 2 epochs, \d+ optimizer steps \(batch 16\)",
                     r"\[teachers 1/1\] t_coarse output .*teachers/t_coarse",
                     r"\[teachers 1/1\] t_coarse epoch 2/2 loss [\d.]+ val score"):
        assert re.search(STAMP + " " + expected, out), (expected, out)
    assert "\r" not in out and "it/s" not in out
    status = read_status(tmp_path / "runs" / "tiny")
    assert status["models"]["t_coarse"]["state"] == "done"


def test_onnxruntime_is_quiet_by_default_and_can_be_made_verbose(monkeypatch):
    from deploy.runtime import ORT_LOG_SEVERITY_ENV, ort_log_severity, quiet_onnxruntime

    monkeypatch.delenv(ORT_LOG_SEVERITY_ENV, raising=False)
    assert ort_log_severity() == 3 and quiet_onnxruntime() == 3  # errors only: no coloured warnings
    monkeypatch.setenv(ORT_LOG_SEVERITY_ENV, "1")
    assert ort_log_severity() == 1
    monkeypatch.setenv(ORT_LOG_SEVERITY_ENV, "loud")
    assert ort_log_severity() == 3


def test_loader_workers_are_capped_by_the_cores(monkeypatch):
    from train import loop

    monkeypatch.setattr(loop, "usable_cores", lambda: 2)
    assert loop.loader_workers(8) == 2 and loop.loader_workers(1) == 1 and loop.loader_workers(0) == 0


def test_on_terminal_follows_stderr(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file: make's log, tee, train.log
    assert not progress.on_terminal()
    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress.on_terminal()

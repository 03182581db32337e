"""Parallel teacher processes: threads split between jobs, one GPU per running job, failures kept apart."""

from __future__ import annotations

import json
import re
import sys

import pytest

import train.parallel as parallel
from train.parallel import Job, auto_jobs, run_parallel, threads_per_job

# A job that records its environment and how long it ran, then exits with the given code.
RECORD = ("import json, os, sys, time; t0 = time.time(); time.sleep(0.3); "
          "print(json.dumps({'omp': os.environ['OMP_NUM_THREADS'], 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES'), "
          "'t0': t0, 't1': time.time()})); sys.exit(int(sys.argv[1]))")


def _jobs(tmp_path, codes: list[int]) -> list[Job]:
    return [Job(f"j{i}", ["-c", RECORD, str(code)], tmp_path / f"j{i}" / "train.log") for i, code in enumerate(codes)]


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 4)


def test_jobs_and_threads_share_the_cores(four_cores, monkeypatch):
    assert auto_jobs(7, gpus=0) == 4 and auto_jobs(3, gpus=0) == 3 and auto_jobs(7, gpus=2) == 2
    assert threads_per_job(2) == 2 and threads_per_job(4) == 1 and threads_per_job(8) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's explicit choice wins
    assert threads_per_job(2) == 3


def test_a_failed_job_does_not_stop_the_others(four_cores, tmp_path, capsys):
    outcomes = run_parallel(_jobs(tmp_path, [0, 3, 0]), workers=2)
    assert [o.returncode for o in outcomes] == [0, 3, 0]
    assert all(json.loads(o.last_line)["omp"] == "2" for o in outcomes)  # 4 cores / 2 jobs
    out = capsys.readouterr().out
    assert "[j1] FAILED (exit 3)" in out and out.count("] done in") == 2


def test_running_jobs_never_share_a_gpu(four_cores, tmp_path):
    outcomes = run_parallel(_jobs(tmp_path, [0] * 6), workers=2, gpus=2)
    runs = [json.loads(o.last_line) for o in outcomes]
    for a in runs:
        for b in runs:
            overlap = a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]
            assert not overlap or a["gpu"] != b["gpu"], (a, b)
    assert {r["gpu"] for r in runs} == {"0", "1"}


def test_teachers_train_in_parallel_processes(tiny_data, tmp_path, capsys):
    """`--jobs 2` trains each teacher in its own process, with its log in the teacher's folder; the
    parent says which teacher of how many starts and ends, and status.json has every teacher."""
    from tiny import write_tiny_config

    from deploy.errors import cli
    from train.teachers import main

    members = [{"name": "t_coarse", "tasks": ["coarse"]}, {"name": "t_fine", "tasks": ["fine"]}]
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs",
                            **{"teachers.members": members, "teachers.train.epochs": 1})
    assert cli(main, ["--config", str(cfg), "--jobs", "2"]) == 0
    for name in ("t_coarse", "t_fine"):
        folder = tmp_path / "runs" / "tiny" / "teachers" / name
        assert (folder / "final.json").exists() and "test:" in (folder / "train.log").read_text()
    out = capsys.readouterr().out
    assert re.search(r"\d\d:\d\d:\d\d \[teachers 2/2\] t_fine started", out), out
    assert re.search(r"\[teachers 1/2\] t_coarse done in [\d.]+ min: .*; \d/2 finished", out), out
    assert "[teachers 2/2] t_fine epoch 1/1" in (folder / "train.log").read_text()
    status = json.loads((tmp_path / "runs" / "tiny" / "status.json").read_text())
    assert {k: v["state"] for k, v in status["models"].items()} == {"t_coarse": "done", "t_fine": "done"}
    assert cli(main, ["--config", str(cfg), "--jobs", "0"]) == 2


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def test_parallel_module_is_torch_free():
    assert "torch" not in sys.modules or parallel.__dict__.get("torch") is None


# A job that waits (up to 20 s) for the parent's thread offer and prints it.
WAIT_FOR_OFFER = ("import os, time, pathlib; p = pathlib.Path(os.environ['FUNDUS_THREAD_SHARE']); t = time.time()\n"
                  "while not p.exists() and time.time() - t < 20: time.sleep(0.05)\n"
                  "print('offer', p.read_text() if p.exists() else None)")


def test_the_last_running_job_is_offered_the_idle_cores(four_cores, tmp_path, capsys):
    short = Job("short", ["-c", "print('done')"], tmp_path / "short" / "train.log")
    last = Job("last", ["-c", WAIT_FOR_OFFER], tmp_path / "last" / "train.log")
    outcomes = run_parallel([last, short], workers=2)
    assert [o.last_line for o in outcomes] == ["offer 4", "done"]  # alone, it may use all 4 cores
    assert "[last] may use 4 thread(s) from the next epoch" in capsys.readouterr().out


def test_no_offer_while_jobs_wait_or_when_the_user_fixed_the_threads(four_cores, tmp_path, monkeypatch, capsys):
    long = Job("long", ["-c", WAIT_FOR_OFFER], tmp_path / "long" / "l")
    short = Job("short", ["-c", "print('done')"], tmp_path / "short" / "l")
    queued = Job("queued", ["-c", "import time; time.sleep(1); print('done')"], tmp_path / "queued" / "l")
    assert run_parallel([long, short, queued], workers=2)[0].last_line == "offer 4"
    out = capsys.readouterr().out
    assert out.count("may use") == 1 and out.index("[queued] started") < out.index("[long] may use 4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    waiting = Job("w", ["-c", WAIT_FOR_OFFER.replace("< 20", "< 1")], tmp_path / "w" / "l")
    assert run_parallel([waiting, short], workers=2)[0].last_line == "offer None"


def test_a_job_takes_the_offered_threads(tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    offer = tmp_path / ".thread_share"
    monkeypatch.setenv(parallel.THREAD_SHARE_ENV, str(offer))
    try:
        parallel.follow_thread_share()  # nothing offered yet: unchanged
        assert torch.get_num_threads() == before
        offer.write_text(str(before + 1))
        parallel.follow_thread_share()
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)

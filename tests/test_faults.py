"""Fault injection: writers killed (SIGKILL) at seeded random points while they save checkpoints, the
metrics log and watch-folder logs; after each kill every file loads or is absent, a checkpoint's
sidecar agrees with its tensors, logs hold only complete records (none lost, none twice), and the
next write leaves no orphaned temporary file."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_deploy import tiny_contract

from deploy.fileio import atomic_write_text
from deploy.predictor import Prediction, TextResult
from deploy.watch import FileKey, RecordLog
from train.checkpoint import load_checkpoint, save_checkpoint

KILLS = 24
LOGS = ("watch.csv", "watch.jsonl")


def _step_of(folder: Path) -> int:
    path = folder / "last.safetensors"
    return load_checkpoint(path)[1]["step"] + 1 if path.exists() else 0


def _writer(folder: Path, die_at_io: int | None) -> None:
    """A training/watching process: resumes, then saves a checkpoint, metrics and log records forever.

    With `die_at_io` it kills itself at that fsync/rename (every gap between and inside the writes),
    otherwise the parent kills it at a random moment (inside a write, most of the time)."""
    torch.set_num_threads(1)  # forked from a process with thread pools: stay single-threaded
    if die_at_io is not None:
        calls = {"n": 0}

        def counting(real):
            def call(*args):
                calls["n"] += 1
                if calls["n"] == die_at_io:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args)
            return call

        os.fsync, os.replace = counting(os.fsync), counting(os.replace)
    contract = tiny_contract()
    logs = [RecordLog(folder / name, contract) for name in LOGS]
    done = [len(log.recover()) for log in logs]
    step = _step_of(folder)
    while True:
        n = 50_000 * (1 + step % 4)  # 0.2 to 0.8 MB: writes take long enough to be hit
        save_checkpoint(folder / "last.safetensors", {"w": torch.from_numpy(np.full(n, step, np.float32))},
                        {"step": step, "numel": n})
        atomic_write_text(folder / "metrics.csv", "epoch,loss\n" + "".join(f"{i},{1 / (i + 1)}\n"
                                                                           for i in range(step + 1)))
        for k, log in enumerate(logs):
            pred = Prediction(path=f"img{done[k]}.jpg", tasks={"diagnosis": TextResult(f"record, \"{done[k]}\"")})
            log.append(FileKey(f"img{done[k]}.jpg", done[k], done[k]), pred)
            done[k] += 1
        step += 1


def _check(folder: Path) -> None:
    ckpt = folder / "last.safetensors"
    if ckpt.exists():
        tensors, meta = load_checkpoint(ckpt)  # loads (a cut file would raise)
        assert tensors["w"].numel() == meta["numel"] and bool((tensors["w"] == meta["step"]).all())
        sidecar = ckpt.with_suffix(".json")
        assert not sidecar.exists() or json.loads(sidecar.read_text()) == meta  # agrees with the tensors
    metrics = folder / "metrics.csv"
    if metrics.exists():
        rows = list(csv.reader(metrics.read_text().splitlines()))
        assert rows[0] == ["epoch", "loss"] and [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    for name in LOGS:
        log = RecordLog(folder / name, tiny_contract())
        keys = log.recover()
        assert sorted(k.size for k in keys) == list(range(len(keys))) and log.skipped_lines == 0
        if (folder / name).exists():  # every record complete and unique: nothing lost, nothing twice
            lines = (folder / name).read_text().splitlines()
            assert len(lines) == len(keys) + (name.endswith(".csv") and bool(lines))


def test_kill_during_writes_never_leaves_a_broken_or_orphaned_file(tmp_path: Path):
    rng = random.Random(11)
    ctx = multiprocessing.get_context("fork")  # forked: no interpreter start-up per kill
    for kill in range(KILLS):
        die_at = rng.randint(1, 40) if kill % 2 == 0 else None
        proc = ctx.Process(target=_writer, args=(tmp_path, die_at), daemon=True)
        proc.start()
        if die_at is None:
            time.sleep(rng.uniform(0.02, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL, f"kill {kill}: writer ended with {proc.exitcode}"
        _check(tmp_path)
    steps = _step_of(tmp_path)
    assert steps > KILLS / 2  # the run made progress through all those crashes
    save_checkpoint(tmp_path / "last.safetensors", {"w": torch.zeros(3)}, {"step": steps, "numel": 3})
    atomic_write_text(tmp_path / "metrics.csv", "epoch,loss\n")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no orphans


@pytest.mark.parametrize("orphan_pid_alive", [True, False])
def test_the_next_write_removes_only_dead_writers_temporary_files(tmp_path: Path, orphan_pid_alive: bool):
    from deploy import fileio

    ctx = multiprocessing.get_context("fork")
    sleeper = ctx.Process(target=time.sleep, args=(30,), daemon=True)
    sleeper.start()
    dead = ctx.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    pid = sleeper.pid if orphan_pid_alive else dead.pid
    orphan = tmp_path / f".best.safetensors.{pid}-{fileio._WRITER_HOST}.abc123.tmp"
    orphan.write_bytes(b"x" * 1000)
    other_file = tmp_path / f".last.safetensors.{dead.pid}-{fileio._WRITER_HOST}.abc123.tmp"
    other_file.write_bytes(b"x")
    save_checkpoint(tmp_path / "best.safetensors", {"w": torch.zeros(2)}, {})
    sleeper.kill()
    sleeper.join()
    assert orphan.exists() == orphan_pid_alive  # a live writer's file is never touched
    assert other_file.exists()  # another target's temporary file is left to that target's next write

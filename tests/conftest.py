"""Shared fixtures. `trained_run`: one tiny teachers + student + baseline run, trained through the real
entry points and exported once per test session, shared by the training, compress and bench tests
(each used to train its own). Tests that write into a run take a private copy (`copy_run`).

Nothing here imports torch, yaml or the training stack at module level: the deploy tests also run in a
venv that holds only the device dependencies (.ci/device_deps.py oldest)."""

from __future__ import annotations

import os

# The tests' models are tiny: one thread each is as fast, and on a machine whose cores are shared (CI,
# several developers) OpenMP's spinning threads made single trainings 10-20x slower. Set before torch
# is imported; subprocesses inherit it. An explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Enough epochs for the tiny models to learn the colours (the compress and bench checks need a real model).
TRAINED = {"teachers.train.epochs": 4, "student.train.epochs": 4}


@dataclass(frozen=True)
class TrainedRun:
    root: Path  # holds data/, runs/ and cfg.yaml
    data: Path
    config: Path
    export_reports: dict

    def copy(self, dest: Path, **extra) -> Path:
        """A private copy of the run folder with its own config over the same (read-only) dataset."""
        from tiny import write_tiny_config

        shutil.copytree(self.root / "runs", dest / "runs")
        return write_tiny_config(dest / "cfg.yaml", self.data, dest / "runs", **TRAINED, **extra)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    from tiny import make_tiny_dataset, write_tiny_config

    from compress.export import export_all

    root = tmp_path_factory.mktemp("trained")
    data = make_tiny_dataset(root / "data", patients=36)
    cfg = write_tiny_config(root / "cfg.yaml", data, root / "runs", **TRAINED)
    for module in ("train.teachers", "train.student"):
        proc = subprocess.run([sys.executable, "-m", module, "--config", str(cfg)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    reports = export_all(str(cfg), ["compress.models=[student,baseline,ensemble]"])
    return TrainedRun(root, data, cfg, reports)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Some code under test sets torch's thread count for its own run (the benchmarks do): restore it,
    so that one test cannot slow down every later one."""
    if importlib.util.find_spec("torch") is None:  # the device-install venv (.ci/device_deps.py oldest)
        yield
        return
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def idrid_data(tmp_path_factory) -> Path:
    """A small dataset made by our IDRiD adapter from the raw release layout (tests/raw_fixtures.py)."""
    from raw_fixtures import write_idrid

    from train.data.adapt import main as adapt_main

    root = tmp_path_factory.mktemp("idrid")
    out = root / "idrid"
    assert adapt_main(["idrid", "--src", str(write_idrid(root / "raw", train=40, test=6)), "--out", str(out)]) == 0
    return out


@pytest.fixture(params=["pycuda", "cuda-python"])
def fake_trt(monkeypatch, request):
    """tensorrt + one CUDA binding (pycuda, or cuda-python with pycuda absent), all stand-ins
    (tests/fake_tensorrt.py), for the test's duration; (trt, gpu)."""
    from fake_tensorrt import install_tensorrt

    return install_tensorrt(request.param, monkeypatch)

"""benchmarks.device_bench (torch-free) and benchmarks.gpu_check's pure parts, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_deploy import write_image, write_tiny_model  # tests/ is on sys.path

from benchmarks import gpu_check
from benchmarks.device_bench import NO_JTOP, energy_mj_per_image
from benchmarks.device_bench import main as bench_main
from deploy.errors import cli


def test_energy_is_mean_power_times_time_per_image():
    assert energy_mj_per_image([5000.0, 7000.0], per_image_ms=2.0) == pytest.approx(12.0)  # 6 W x 2 ms
    assert energy_mj_per_image([0.0, None], 2.0) is None and energy_mj_per_image([5000.0], 0.0) is None


def test_device_bench_without_jtop_reports_why_energy_is_empty(tmp_path: Path):
    model = write_tiny_model(tmp_path / "m")
    image = write_image(tmp_path / "r.jpg")
    assert cli(bench_main, [str(model), "--images", str(image), "--out", str(tmp_path / "out"),
                            "--min-seconds", "0.05"]) == 0
    report = json.loads((tmp_path / "out" / "device_bench.json").read_text())
    (row,) = report["models"]
    assert row["backend"] == "ort" and row["p50_ms"] > 0 and row["energy_mj_per_image"] is None
    assert row["energy_note"] == NO_JTOP and NO_JTOP in (tmp_path / "out" / "device_bench.md").read_text()
    assert cli(bench_main, [str(model), "--images", str(tmp_path / "none.jpg")]) == 2


def test_gpu_check_verdicts():
    assert gpu_check.parity_verdict("fp32", max_abs=5e-5, top1=1.0)[0]
    assert not gpu_check.parity_verdict("fp32", max_abs=2e-4, top1=1.0)[0]
    assert gpu_check.parity_verdict("fp16", max_abs=1e-2, top1=0.99)[0]
    assert not gpu_check.parity_verdict("int8", max_abs=1e-1, top1=0.97)[0]
    assert gpu_check.memory_growth_verdict([100.0] * 10 + [101.0] * 40)[0]
    assert not gpu_check.memory_growth_verdict([100.0 + i for i in range(50)])[0]
    assert gpu_check.int8_not_slower({"int8": 0.9, "fp16": 1.0})[0]
    assert not gpu_check.int8_not_slower({"int8": 1.3, "fp16": 1.0})[0]
    md = gpu_check.to_markdown({"machine": {"gpu": "X"}, "checks": [
        {"name": "a", "ok": True, "detail": "fine"}, {"name": "b", "ok": None, "detail": "skipped: y"}]})
    assert "| a | pass | fine |" in md and "| b | skipped | skipped: y |" in md


def test_gpu_check_without_cuda_is_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_reason", lambda: "no CUDA device (torch.cuda.is_available() is False)")
    assert cli(gpu_check.main, ["--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and not (tmp_path / "o").exists()


def test_int8_layers_from_the_inspector_json():
    info = json.dumps({"Layers": [
        {"Name": "conv1", "Inputs": [{"Format/Datatype": "Channel major INT8 format where... Int8"}], "Outputs": []},
        {"Name": "conv2", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}],
         "Outputs": [{"Format/Datatype": "Row major linear Int8 format"}]},
        {"Name": "softmax", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}], "Outputs": []}]})
    assert gpu_check.int8_layers(info) == (2, 3)
    assert gpu_check.int8_verdict(2, 3)[0]
    names_only = json.dumps({"Layers": ["conv1", "conv2"]})  # built without detailed profiling verbosity
    assert gpu_check.int8_layers(names_only) == (0, 2) and not gpu_check.int8_verdict(0, 2)[0]


def test_amp_verdict_needs_finite_falling_losses_and_every_parameter_updated():
    assert gpu_check.amp_verdict([2.0, 1.5, 1.0], [])[0]
    assert not gpu_check.amp_verdict([2.0, float("nan"), 1.0], [])[0]
    assert not gpu_check.amp_verdict([1.0, 1.2], [])[0]
    ok, detail = gpu_check.amp_verdict([2.0, 1.0], ["heads.coarse.0.weight"])
    assert not ok and "heads.coarse.0.weight" in detail


def test_amp_steps_train_a_saved_model(tmp_path):
    """The same code the GPU check runs, on CPU in bfloat16: the loss falls and every class parameter moves."""
    from tiny import tiny_model

    from deploy.contract import TaskSpec
    from train.experiment import ModelConfig
    from train.models.multitask import MultiTaskNet
    from train.models.saved import save_model

    tasks = [TaskSpec("coarse", "classification", ("a", "b", "c")), TaskSpec("diagnosis", "text")]
    model = MultiTaskNet(ModelConfig(**tiny_model()), tasks, vocab_size=12, max_len=5)
    path = save_model(tmp_path / "best.safetensors", model)
    batch = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    losses, frozen = gpu_check.amp_steps(path, batch, steps=6, device="cpu")
    assert gpu_check.amp_verdict(losses, frozen)[0], (losses, frozen)

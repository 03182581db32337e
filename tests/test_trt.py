"""TensorRT: the pure parts everywhere; engine build + parity only where tensorrt and a GPU exist; the
engine runtime against stand-ins of tensorrt and its CUDA bindings (tests/fake_tensorrt.py). The builder:
tests/test_trt_builder.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import DataType, FakeEngine, HostAlloc, retyped
from test_deploy import REPO, tiny_contract, write_image, write_tiny_model  # tests/ is on sys.path

from deploy.build_engine import build_engine, default_engine_path, trtexec_command
from deploy.build_engine import main as build_main
from deploy.contract import Contract, sidecar_path
from deploy.errors import UserError, cli
from deploy.predictor import Predictor
from deploy.trt_runtime import TensorRTUnavailable, engine_mismatch

HAS_TRT = importlib.util.find_spec("tensorrt") is not None



def test_trtexec_command_per_precision_and_version():
    int8 = trtexec_command("m dir/s.onnx", "s.engine", "int8", 224, 1, 4, 8, 512, "trt.cache", trt_version="10.3.0")
    assert int8 == ("trtexec '--onnx=m dir/s.onnx' --saveEngine=s.engine --minShapes=image:1x3x224x224 "
                    "--optShapes=image:4x3x224x224 --maxShapes=image:8x3x224x224 --memPoolSize=workspace:512M "
                    "--timingCacheFile=trt.cache --stronglyTyped")
    tail = {(v, p): trtexec_command("s.onnx", "s.engine", p, 128, trt_version=v).split("workspace:")[1]
            for v in ("8.5.2", "10.3", "11.0") for p in ("int8", "fp16", "fp32")}
    assert tail == {  # 8.x: weak typing by flags, plain MiB; 10.x: strongly typed; 11.x: always strongly typed
        ("8.5.2", "int8"): "1024 --int8 --fp16", ("8.5.2", "fp16"): "1024 --fp16", ("8.5.2", "fp32"): "1024",
        ("10.3", "int8"): "1024M --stronglyTyped", ("10.3", "fp16"): "1024M --stronglyTyped",
        ("10.3", "fp32"): "1024M --stronglyTyped --noTF32",
        ("11.0", "int8"): "1024M", ("11.0", "fp16"): "1024M", ("11.0", "fp32"): "1024M --noTF32"}
    with pytest.raises(UserError, match="min <= opt <= max"):
        trtexec_command("s.onnx", "s.engine", "fp16", 128, min_batch=4, opt_batch=2)
    with pytest.raises(UserError, match="precision"):
        trtexec_command("s.onnx", "s.engine", "int4", 128)


def test_engine_sidecar_never_overwrites_the_onnx_sidecar(tmp_path: Path):
    onnx_path = write_tiny_model(tmp_path)
    assert sidecar_path(default_engine_path(onnx_path)) != sidecar_path(onnx_path)
    with pytest.raises(UserError, match="would overwrite"):
        build_engine(onnx_path, tmp_path / "tiny.engine")


def test_engine_mismatch_names_version_and_gpu():
    built = {"version": "10.3.0", "gpu": "Orin"}
    assert engine_mismatch(built, "10.3.0", "Orin") is None
    problem = engine_mismatch(built, "8.5.2", "Xavier")
    assert "TensorRT 10.3.0" in problem and "8.5.2" in problem and "'Xavier'" in problem


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where tensorrt is missing")
def test_build_engine_without_tensorrt(tmp_path: Path, capsys):
    onnx_path = write_tiny_model(tmp_path)
    assert cli(build_main, [str(onnx_path), "--precision", "fp16", "--max-batch", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert "python3-libnvinfer" in captured.err and "pypi.nvidia.com" in captured.err
    assert not default_engine_path(onnx_path).exists()
    # The trtexec command is still available without tensorrt, for the version asked for.
    assert cli(build_main, [str(onnx_path), "--precision", "fp16", "--max-batch", "4", "--trtexec-only",
                            "--trt-version", "11.0"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT 11.0" in out and "--maxShapes=image:4x3x32x32 " in out and "--fp16" not in out


@pytest.mark.skipif(HAS_TRT or shutil.which("make") is None, reason="needs make, and tensorrt missing")
def test_make_engine_uses_the_deploy_interpreter_and_fails_in_one_line(tmp_path: Path):
    run = tmp_path / "run"
    write_tiny_model(run / "onnx", "student.int8-tensorrt")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "engine", f"DEPLOY_PY={sys.executable}", f"RUN={run}",
                           "VENV=/nonexistent-training-venv"], env=env, capture_output=True, text=True, timeout=120)
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(ours) == 1 and ours[0].startswith("error: ") and "python3-libnvinfer" in ours[0], proc.stderr
    assert not (REPO / "nonexistent-training-venv").exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where tensorrt is missing")
def test_engine_predictor_without_tensorrt(tmp_path: Path):
    engine = tmp_path / "tiny.trt.engine"
    engine.write_bytes(b"\x00" * 64)
    contract = tiny_contract()
    contract.extra["tensorrt"] = {"version": "10.3.0", "gpu": "Orin"}
    contract.save(sidecar_path(engine))
    with pytest.raises(TensorRTUnavailable, match="python3-libnvinfer"):
        Predictor(engine)


def _need_gpu() -> None:
    """Skip unless tensorrt imports and a CUDA binding reaches a GPU."""
    pytest.importorskip("tensorrt")
    from deploy.cuda_binding import CudaUnavailable, open_cuda

    try:
        open_cuda(0).close()
    except CudaUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture()
def trt_model(tmp_path: Path):
    _need_gpu()
    onnx_path = write_tiny_model(tmp_path)
    return onnx_path, build_engine(onnx_path, precision="fp32", min_batch=1, opt_batch=2, max_batch=4)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_engine_strongly_typed_precisions_agree_with_onnx_runtime(kind: str, tmp_path: Path):
    _need_gpu()
    onnx_path = retyped(write_tiny_model(tmp_path), kind)
    engine = build_engine(onnx_path, precision=kind, max_batch=4)
    images = [write_image(tmp_path / f"{i}.png", (30 * i, 220 - 25 * i, 60)) for i in range(4)]
    with Predictor(onnx_path) as ort_p, Predictor(engine) as trt_p:
        labels = [(a.tasks["coarse"].label, b.tasks["coarse"].label)
                  for a, b in zip(ort_p.predict(images), trt_p.predict(images))]
    assert all(a == b for a, b in labels)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_matches_onnx_runtime(trt_model, tmp_path: Path):
    onnx_path, engine = trt_model
    build = json.loads(sidecar_path(engine).read_text())["extra"]["tensorrt"]
    assert build["precision"] == "fp32" and build["max_batch"] == 4
    images = [write_image(tmp_path / f"{i}.png", (30 * i, 220 - 25 * i, 60)) for i in range(6)]
    with Predictor(onnx_path) as ort_p, Predictor(engine) as trt_p:
        assert trt_p.describe()["backend"] == "tensorrt"
        for a, b in zip(ort_p.predict(images, batch_size=8), trt_p.predict(images, batch_size=8)):
            assert a.tasks["coarse"].label == b.tasks["coarse"].label
            assert a.tasks["diagnosis"].text == b.tasks["diagnosis"].text
            np.testing.assert_allclose(list(a.tasks["fine"].probabilities.values()),
                                       list(b.tasks["fine"].probabilities.values()), atol=1e-4)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_from_another_tensorrt_is_refused(trt_model):
    _, engine = trt_model
    contract = Contract.load(sidecar_path(engine))
    contract.extra["tensorrt"]["version"] = "0.0.1"
    contract.save(sidecar_path(engine))
    with pytest.raises(ValueError, match="not portable"):
        Predictor(engine)




def _fake_engine(tmp_path: Path, version: str = "10.3.0") -> tuple[Path, Path]:
    onnx_path = write_tiny_model(tmp_path)
    engine = tmp_path / "tiny.trt.engine"
    engine.write_bytes(b"FAKE" + str(onnx_path).encode())
    contract = tiny_contract()
    contract.extra["tensorrt"] = {"version": version, "gpu": "Fake GPU"}
    contract.save(sidecar_path(engine))
    return onnx_path, engine


def test_trt_backend_buffers_padding_and_dtypes(fake_trt, tmp_path: Path):
    _, gpu = fake_trt
    onnx_path, engine = _fake_engine(tmp_path)
    images = [write_image(tmp_path / f"{i}.png", (30 * i, 220 - 25 * i, 60)) for i in range(7)]
    with Predictor(onnx_path) as ort_p, Predictor(engine) as trt_p:
        facts = trt_p.describe()
        assert {k: facts[k] for k in ("backend", "tensorrt", "gpu", "min_batch", "max_batch", "cuda_binding")} == {
            "backend": "tensorrt", "tensorrt": "10.3.0", "gpu": "Fake GPU", "min_batch": 2, "max_batch": 4,
            "cuda_binding": gpu.binding}
        assert facts["gpu_memory_mb"] > 0  # the engine's buffers, seen as a drop in free device memory
        expected = ort_p.predict(images, batch_size=8)
        got = trt_p.predict(images, batch_size=8)  # 7 images: batches of 4 and 3 (max batch 4)
        single = trt_p.predict(images[:1])  # one image: padded up to the profile's min batch of 2
        raw = trt_p.predict_arrays(np.zeros((1, 3, 32, 32), np.float32))
    assert raw["diagnosis_tokens"].dtype == np.int64 and raw["fine_probs"].dtype == np.float16
    assert raw["diagnosis_tokens"].shape == (1, 4) and raw["coarse_probs"].shape == (1, 5)
    for a, b in zip(expected, got):
        assert a.tasks["diagnosis"].text == b.tasks["diagnosis"].text
        assert a.tasks["coarse"].probabilities == pytest.approx(b.tasks["coarse"].probabilities, abs=1e-6)
        assert a.tasks["fine"].probabilities == pytest.approx(b.tasks["fine"].probabilities, abs=2e-3)  # FP16
    assert single[0].tasks["coarse"].probabilities == pytest.approx(expected[0].tasks["coarse"].probabilities)


def test_trt_backend_releases_everything_in_its_context_and_runs_on_other_threads(fake_trt, tmp_path: Path):
    _, gpu = fake_trt
    _, engine = _fake_engine(tmp_path)
    predictor = Predictor(engine)
    image = write_image(tmp_path / "r.jpg", (230, 20, 20))
    results = []
    worker = threading.Thread(target=lambda: results.append(predictor.predict([image])[0]))
    worker.start()
    worker.join()
    assert results and results[0].ok, results and results[0].error  # the context is made current there
    if gpu.binding == "pycuda":
        assert not gpu.current()  # pushed and popped around each call: nothing left current in between
    predictor.close()
    assert gpu.memory == {} and gpu.streams == {} and HostAlloc.live == set()
    assert (gpu.destroyed_streams, gpu.leaked_streams) == (1, 0)
    if gpu.binding == "pycuda":
        assert not gpu.current() and gpu.binding_module.detached == 1


def test_trt_backend_refuses_foreign_broken_or_untyped_engines(fake_trt, tmp_path: Path, monkeypatch):
    _, engine = _fake_engine(tmp_path / "a", version="8.5.2")
    with pytest.raises(ValueError, match="built with TensorRT 8.5.2, this device has 10.3.0.*not portable"):
        Predictor(engine)
    _, engine = _fake_engine(tmp_path / "b")
    engine.write_bytes(write_image(tmp_path / "x.jpg").read_bytes())
    with pytest.raises(ValueError, match="could not deserialize.*JPEG image"):
        Predictor(engine)
    _, engine = _fake_engine(tmp_path / "c")
    monkeypatch.setitem(FakeEngine.io_types, "fine_probs", DataType.BF16)
    with pytest.raises(ValueError, match="I/O type BF16"):
        Predictor(engine)
    assert fake_trt[1].memory == {} and fake_trt[1].leaked_streams == 0  # a failed open releases what it took

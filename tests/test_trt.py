"""TensorRT: the pure parts everywhere; engine build + parity only where tensorrt and a GPU exist."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_deploy import tiny_contract, write_image, write_tiny_model  # tests/ is on sys.path

from deploy.build_engine import build_engine, default_engine_path, trtexec_command
from deploy.build_engine import main as build_main
from deploy.contract import Contract, sidecar_path
from deploy.fileio import sha256_file
from deploy.predictor import Predictor
from deploy.trt_runtime import TensorRTUnavailable, engine_mismatch

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_trtexec_command_per_precision():
    int8 = trtexec_command("m dir/s.onnx", "s.engine", "int8", 224, 1, 4, 8, 512, "trt.cache")
    assert int8 == ("trtexec '--onnx=m dir/s.onnx' --saveEngine=s.engine --minShapes=image:1x3x224x224 "
                    "--optShapes=image:4x3x224x224 --maxShapes=image:8x3x224x224 --memPoolSize=workspace:512M "
                    "--timingCacheFile=trt.cache --stronglyTyped")
    fp16 = trtexec_command("s.onnx", "s.engine", "fp16", 128)
    assert fp16.endswith("--memPoolSize=workspace:1024M --fp16") and "timingCache" not in fp16
    assert "--fp16" not in trtexec_command("s.onnx", "s.engine", "fp32", 128)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trtexec_command("s.onnx", "s.engine", "fp16", 128, min_batch=4, opt_batch=2)
    with pytest.raises(ValueError, match="precision"):
        trtexec_command("s.onnx", "s.engine", "int4", 128)


def test_engine_sidecar_never_overwrites_the_onnx_sidecar(tmp_path: Path):
    onnx_path = write_tiny_model(tmp_path)
    assert sidecar_path(default_engine_path(onnx_path)) != sidecar_path(onnx_path)
    with pytest.raises(ValueError, match="would overwrite"):
        build_engine(onnx_path, tmp_path / "tiny.engine")


def test_engine_mismatch_names_version_and_gpu():
    built = {"version": "10.3.0", "gpu": "Orin"}
    assert engine_mismatch(built, "10.3.0", "Orin") is None
    problem = engine_mismatch(built, "8.5.2", "Xavier")
    assert "TensorRT 10.3.0" in problem and "8.5.2" in problem and "'Xavier'" in problem


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where tensorrt is missing")
def test_build_engine_without_tensorrt(tmp_path: Path, capsys):
    onnx_path = write_tiny_model(tmp_path)
    assert build_main([str(onnx_path), "--precision", "fp16", "--max-batch", "4"]) == 2
    captured = capsys.readouterr()
    assert "trtexec --onnx=" in captured.out and "--maxShapes=image:4x3x32x32 " in captured.out
    assert captured.out.rstrip().endswith("--fp16")
    assert "python3-libnvinfer" in captured.err and "pypi.nvidia.com" in captured.err
    assert not default_engine_path(onnx_path).exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where tensorrt is missing")
def test_engine_predictor_without_tensorrt(tmp_path: Path):
    engine = tmp_path / "tiny.trt.engine"
    engine.write_bytes(b"\x00" * 64)
    contract = tiny_contract()
    contract.extra["tensorrt"] = {"version": "10.3.0", "gpu": "Orin"}
    contract.save(sidecar_path(engine))
    with pytest.raises(TensorRTUnavailable, match="python3-libnvinfer"):
        Predictor(engine)


@pytest.fixture()
def trt_model(tmp_path: Path):
    pytest.importorskip("tensorrt")
    pytest.importorskip("pycuda.driver")
    onnx_path = write_tiny_model(tmp_path)
    return onnx_path, build_engine(onnx_path, precision="fp32", min_batch=1, opt_batch=2, max_batch=4)


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


# --- A stand-in for tensorrt + pycuda.driver (numpy "device memory", onnxruntime as the "engine"), so
# --- TrtBackend's buffer, shape, padding and dtype handling is exercised on machines without a GPU.


class _HostAlloc(np.ndarray):
    def free(self) -> None:
        pass


class _DeviceAlloc:
    def __init__(self, nbytes: int):
        self.block = bytearray(nbytes)

    def __int__(self) -> int:  # pycuda: int(allocation) is the device pointer
        return id(self.block)

    def free(self) -> None:
        pass


class _FakeCuda(types.ModuleType):
    class Error(Exception):
        pass

    class Device:
        def __init__(self, index: int):
            self.index = index

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return "Fake GPU"

        def retain_primary_context(self):
            return types.SimpleNamespace(push=lambda: None, detach=lambda: None)

    Context = types.SimpleNamespace(pop=lambda: None)

    def __init__(self):
        super().__init__("pycuda.driver")
        self.memory = {}

    def init(self) -> None:
        pass

    def pagelocked_empty(self, n: int, dtype) -> np.ndarray:
        return np.zeros(n, dtype).view(_HostAlloc)[:]

    def mem_alloc(self, nbytes: int) -> _DeviceAlloc:
        alloc = _DeviceAlloc(nbytes)
        self.memory[int(alloc)] = alloc.block
        return alloc

    def memcpy_htod_async(self, dev, host: np.ndarray, stream) -> None:
        dev.block[: host.nbytes] = host.tobytes()

    def memcpy_dtoh_async(self, host: np.ndarray, dev, stream) -> None:
        host[...] = np.frombuffer(bytes(dev.block[: host.nbytes]), host.dtype)

    def Stream(self):  # noqa: N802 - pycuda's name
        return types.SimpleNamespace(handle=0, synchronize=lambda: None)


class _FakeEngine:
    """An 'engine' file holds b'FAKE' + the ONNX path; it runs that ONNX with tokens as int32."""

    def __init__(self, onnx_path: str, cuda: _FakeCuda):
        import onnxruntime as ort

        self.session, self.cuda = ort.InferenceSession(onnx_path), cuda
        self.names = ["image", "coarse_probs", "fine_probs", "diagnosis_tokens"]
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name == "image" else "out"

    def get_tensor_shape(self, name: str) -> tuple:
        return {"image": (-1, 3, 32, 32), "coarse_probs": (-1, 5), "fine_probs": (-1, 7),
                "diagnosis_tokens": (-1, 4)}[name]

    def get_tensor_dtype(self, name: str):
        return np.int32 if name == "diagnosis_tokens" else np.float32

    def get_tensor_profile_shape(self, name: str, profile: int):
        return (2, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)

    def create_execution_context(self):
        return _FakeContext(self)


class _FakeContext:
    def __init__(self, engine: _FakeEngine):
        self.engine, self.batch, self.addresses = engine, None, {}

    def set_input_shape(self, name: str, shape: tuple) -> None:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        assert lo[0] <= shape[0] <= hi[0], f"batch {shape[0]} outside the profile"
        self.batch = shape[0]

    def get_tensor_shape(self, name: str) -> tuple:
        return (self.batch, *self.engine.get_tensor_shape(name)[1:])

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = self.engine.cuda.memory[address]

    def execute_async_v3(self, stream_handle: int) -> bool:
        count = self.batch * 3 * 32 * 32
        image = np.frombuffer(bytes(self.addresses["image"][: count * 4]), np.float32).reshape(self.batch, 3, 32, 32)
        for name, value in zip(self.engine.names[1:], self.engine.session.run(self.engine.names[1:], {"image": image})):
            data = value.astype(self.engine.get_tensor_dtype(name)).tobytes()
            self.addresses[name][: len(data)] = data
        return True


@pytest.fixture()
def fake_trt(monkeypatch):
    cuda = _FakeCuda()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: dtype

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return _FakeEngine(data[4:].decode(), cuda) if data.startswith(b"FAKE") else None

    trt.Runtime = Runtime
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    return trt


def _fake_engine(tmp_path: Path, version: str = "10.3.0") -> tuple[Path, Path]:
    onnx_path = write_tiny_model(tmp_path)
    engine = tmp_path / "tiny.trt.engine"
    engine.write_bytes(b"FAKE" + str(onnx_path).encode())
    contract = tiny_contract()
    contract.extra["tensorrt"] = {"version": version, "gpu": "Fake GPU"}
    contract.save(sidecar_path(engine))
    return onnx_path, engine


def test_trt_backend_buffers_padding_and_int32_tokens(fake_trt, tmp_path: Path):
    onnx_path, engine = _fake_engine(tmp_path)
    images = [write_image(tmp_path / f"{i}.png", (30 * i, 220 - 25 * i, 60)) for i in range(7)]
    with Predictor(onnx_path) as ort_p, Predictor(engine) as trt_p:
        facts = trt_p.describe()
        assert {k: facts[k] for k in ("backend", "tensorrt", "gpu", "min_batch", "max_batch")} == {
            "backend": "tensorrt", "tensorrt": "10.3.0", "gpu": "Fake GPU", "min_batch": 2, "max_batch": 4}
        expected = ort_p.predict(images, batch_size=8)
        got = trt_p.predict(images, batch_size=8)  # 7 images: batches of 4 and 3 (max batch 4)
        single = trt_p.predict(images[:1])  # one image: padded up to the profile's min batch of 2
        raw = trt_p.predict_arrays(np.zeros((1, 3, 32, 32), np.float32))
    assert raw["diagnosis_tokens"].shape == (1, 4) and raw["coarse_probs"].shape == (1, 5)
    for a, b in zip(expected, got):
        assert a.tasks["diagnosis"].text == b.tasks["diagnosis"].text
        assert a.tasks["fine"].probabilities == pytest.approx(b.tasks["fine"].probabilities, abs=1e-6)
    assert single[0].tasks["coarse"].probabilities == pytest.approx(expected[0].tasks["coarse"].probabilities)


def test_trt_backend_refuses_foreign_or_broken_engines(fake_trt, tmp_path: Path):
    _, engine = _fake_engine(tmp_path / "a", version="8.5.2")
    with pytest.raises(ValueError, match="built with TensorRT 8.5.2, this device has 10.3.0.*not portable"):
        Predictor(engine)
    _, engine = _fake_engine(tmp_path / "b")
    engine.write_bytes(write_image(tmp_path / "x.jpg").read_bytes())
    with pytest.raises(ValueError, match="could not deserialize.*JPEG image"):
        Predictor(engine)


class _FakeBuilder:
    """Records what build_engine asks of TensorRT's builder; 'builds' a fake engine of the ONNX."""

    def __init__(self, logger):
        self.network_flags = self.flags = None
        _FakeBuilder.last = self

    def create_network(self, flags: int):
        self.network_flags = flags
        tensor = types.SimpleNamespace(name="image", shape=(-1, 3, 32, 32), dtype="FLOAT")
        return types.SimpleNamespace(num_inputs=1, get_input=lambda i: tensor, num_outputs=0, get_output=None,
                                     num_layers=0, get_layer=None, onnx=None)

    def create_builder_config(self):
        self.config = types.SimpleNamespace(flags=set(), profiles=[], cache=None)
        self.config.set_memory_pool_limit = lambda pool, size: setattr(self.config, "workspace", size)
        self.config.set_flag = self.config.flags.add
        self.config.add_optimization_profile = self.config.profiles.append
        self.config.create_timing_cache = lambda data: types.SimpleNamespace(data=data)
        self.config.set_timing_cache = lambda cache, ignore_mismatch: setattr(self.config, "cache", cache)
        self.config.get_timing_cache = lambda: types.SimpleNamespace(serialize=lambda: self.config.cache.data + b"+")
        return self.config

    def create_optimization_profile(self):
        shapes = {}
        return types.SimpleNamespace(shapes=shapes, set_shape=lambda name, *s: shapes.__setitem__(name, s))

    def build_serialized_network(self, network, config):
        return b"FAKE" + network.onnx.encode()


@pytest.fixture()
def fake_builder(fake_trt):
    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data: bytes, path: str) -> bool:
            self.network.onnx = path
            return True

    fake_trt.Builder, fake_trt.OnnxParser = _FakeBuilder, Parser
    fake_trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
    fake_trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")
    fake_trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    fake_trt.LayerType = types.SimpleNamespace(QUANTIZE="q", DEQUANTIZE="dq")
    return fake_trt


def test_build_engine_writes_engine_sidecar_and_timing_cache(fake_builder, tmp_path: Path, capsys):
    onnx_path = write_tiny_model(tmp_path)
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"old")
    assert build_main([str(onnx_path), "--precision", "fp16", "--min-batch", "2", "--opt-batch", "3",
                       "--max-batch", "4", "--workspace-mb", "64", "--timing-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "network input 'image': shape [-1, 3, 32, 32]" in out and "--fp16" in out
    builder = _FakeBuilder.last
    assert builder.network_flags == 0 and builder.config.flags == {"fp16"}
    assert builder.config.workspace == 64 << 20
    assert builder.config.profiles[0].shapes["image"] == ((2, 3, 32, 32), (3, 3, 32, 32), (4, 3, 32, 32))
    assert cache.read_bytes() == b"old+"  # loaded, then saved after the build
    engine = default_engine_path(onnx_path)
    contract = Contract.load(sidecar_path(engine))
    build = contract.extra["tensorrt"]
    assert build["version"] == "10.3.0" and build["gpu"] == "Fake GPU" and build["precision"] == "fp16"
    assert (build["min_batch"], build["opt_batch"], build["max_batch"]) == (2, 3, 4)
    assert build["onnx_sha256"] == sha256_file(onnx_path)
    assert contract.output_names == tiny_contract().output_names
    with Predictor(engine) as predictor:  # the fake engine runs the ONNX: a full round trip
        (pred,) = predictor.predict([write_image(tmp_path / "r.jpg", (230, 20, 20))])
    assert pred.tasks["diagnosis"].text == "red disc"


def test_build_engine_int8_needs_qdq_and_legacy_flags(fake_builder, tmp_path: Path, capsys):
    onnx_path = write_tiny_model(tmp_path)
    assert build_main([str(onnx_path), "--precision", "int8"]) == 2
    assert "needs a Q/DQ model" in capsys.readouterr().err
    assert _FakeBuilder.last.network_flags == 1 << 5  # STRONGLY_TYPED
    fake_builder.__version__ = "8.5.2.2"
    build_engine(onnx_path, precision="fp16", log=lambda _: None)
    assert _FakeBuilder.last.network_flags == 1 << 0  # EXPLICIT_BATCH on TensorRT 8.x

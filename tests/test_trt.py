"""TensorRT: the pure parts everywhere; engine build + parity only where tensorrt and a GPU exist."""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_deploy import REPO, tiny_contract, write_image, write_tiny_model  # tests/ is on sys.path

from deploy.build_engine import build_engine, default_engine_path, trtexec_command
from deploy.build_engine import main as build_main
from deploy.contract import Contract, sidecar_path
from deploy.errors import UserError, cli
from deploy.fileio import sha256_file
from deploy.predictor import Predictor
from deploy.trt_runtime import TensorRTUnavailable, engine_mismatch

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _retyped(onnx_path: Path, kind: str) -> Path:
    """A copy of the tiny model whose input passes through Cast->FP16->FP32 ('fp16') or Q/DQ ('int8'),
    so it carries FP16 tensors / Q/DQ nodes like the compressed models; it still runs in ONNX Runtime."""
    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        node.input[:] = ["image_in" if name == "image" else name for name in node.input]
    if kind == "fp16":
        new = [helper.make_node("Cast", ["image"], ["image_h"], to=TensorProto.FLOAT16),
               helper.make_node("Cast", ["image_h"], ["image_in"], to=TensorProto.FLOAT)]
    else:
        model.graph.initializer.extend([helper.make_tensor("q_scale", TensorProto.FLOAT, [], [0.02]),
                                        helper.make_tensor("q_zero", TensorProto.INT8, [], [0])])
        new = [helper.make_node("QuantizeLinear", ["image", "q_scale", "q_zero"], ["image_q"]),
               helper.make_node("DequantizeLinear", ["image_q", "q_scale", "q_zero"], ["image_in"])]
    nodes = new + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out = onnx_path.with_name(f"{onnx_path.stem}.{kind}.onnx")
    onnx.save(model, str(out))
    shutil.copy(sidecar_path(onnx_path), sidecar_path(out))
    return out


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
    onnx_path = _retyped(write_tiny_model(tmp_path), kind)
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




# --- Stand-ins for tensorrt, pycuda.driver and cuda-python's runtime, strict where the real ones are:
# --- copies and kernels are queued on their stream and happen only at synchronize (a missing
# --- synchronize returns stale memory), device calls need the context current on the calling thread,
# --- engine I/O types are tensorrt.DataType members mapped through the runtime's table, and a stream
# --- destroyed without its context current counts as leaked.


class _Gpu:
    """Fake device memory, streams and 'current context' bookkeeping shared by both fake bindings."""

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.streams: dict[int, list] = {}
        self.local = threading.local()
        self.next_address = 4096
        self.leaked_streams = self.destroyed_streams = 0
        self.total = 1 << 30

    def current(self) -> bool:
        return bool(getattr(self.local, "stack", None))

    def require_current(self, what: str) -> None:
        assert self.current(), f"{what} without a current CUDA context on this thread"

    def alloc(self, nbytes: int) -> int:
        self.require_current("cuMemAlloc")
        address, self.next_address = self.next_address, self.next_address + nbytes + 256
        self.memory[address] = bytearray(nbytes)
        return address

    def new_stream(self) -> int:
        handle, self.next_address = self.next_address, self.next_address + 1
        self.streams[handle] = []
        return handle

    def enqueue(self, handle: int, work) -> None:
        self.require_current("an async call")
        self.streams[handle].append(work)

    def synchronize(self, handle: int) -> None:
        self.require_current("cuStreamSynchronize")
        queue = self.streams[handle]
        while queue:
            queue.pop(0)()

    def destroy_stream(self, handle: int) -> None:
        if self.current():
            self.destroyed_streams += 1
        else:
            self.leaked_streams += 1
        del self.streams[handle]

    def free_bytes(self) -> int:
        return self.total - sum(len(b) for b in self.memory.values())


class _HostAlloc(np.ndarray):
    live: set = set()

    def free(self) -> None:
        _HostAlloc.live.discard(id(self))


class _FakePyCudaStream:
    def __init__(self, gpu: _Gpu):
        self.gpu, self.handle = gpu, gpu.new_stream()

    def synchronize(self) -> None:
        self.gpu.synchronize(self.handle)

    def __del__(self):  # pycuda: cuStreamDestroy only happens if the stream's context is current
        self.gpu.destroy_stream(self.handle)


class _FakePyCuda(types.ModuleType):
    class Error(Exception):
        pass

    def __init__(self, gpu: _Gpu):
        super().__init__("pycuda.driver")
        self.gpu, self.detached = gpu, 0
        module = self

        class Device:
            def __init__(self, index: int):
                self.index = index

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "Fake GPU"

            def retain_primary_context(self):
                def push():
                    gpu.local.stack = [*getattr(gpu.local, "stack", []), "primary"]

                return types.SimpleNamespace(push=push, detach=lambda: setattr(module, "detached", module.detached + 1))

        def pop():
            gpu.require_current("Context.pop")
            gpu.local.stack = gpu.local.stack[:-1]

        self.Device, self.Context = Device, types.SimpleNamespace(pop=pop)

    def init(self) -> None:
        pass

    def pagelocked_empty(self, n: int, dtype) -> np.ndarray:
        base = np.zeros(n, dtype).view(_HostAlloc)
        _HostAlloc.live.add(id(base))
        return base[:]

    def mem_alloc(self, nbytes: int):
        return _DeviceAlloc(self.gpu, self.gpu.alloc(nbytes))

    def memcpy_htod_async(self, dest: int, host: np.ndarray, stream) -> None:
        gpu = self.gpu

        def copy():  # reads the pinned host memory when the copy runs, as the DMA engine does
            gpu.memory[int(dest)][: host.nbytes] = host.tobytes()

        gpu.enqueue(stream.handle, copy)

    def memcpy_dtoh_async(self, host: np.ndarray, src: int, stream) -> None:
        gpu = self.gpu

        def copy():
            host[...] = np.frombuffer(bytes(gpu.memory[int(src)][: host.nbytes]), host.dtype).reshape(host.shape)

        gpu.enqueue(stream.handle, copy)

    def Stream(self):  # noqa: N802 - pycuda's name
        self.gpu.require_current("Stream()")
        return _FakePyCudaStream(self.gpu)

    def mem_get_info(self) -> tuple[int, int]:
        self.gpu.require_current("mem_get_info")
        return self.gpu.free_bytes(), self.gpu.total


class _DeviceAlloc:
    def __init__(self, gpu: _Gpu, address: int):
        self.gpu, self.address = gpu, address

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.gpu.require_current("cuMemFree")
        del self.gpu.memory[self.address]


class _FakeCudart(types.ModuleType):
    """cuda-python's runtime API: (error, *values) tuples, ints for pointers, real pinned host memory."""

    class _Stream(int):
        pass

    def __init__(self, gpu: _Gpu):
        super().__init__("cuda.bindings.runtime")
        self.gpu, self.host = gpu, {}
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def cudaGetDeviceCount(self):  # noqa: N802 - cuda-python's names
        return 0, 1

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Fake GPU" + b"\0" * 8)

    def cudaSetDevice(self, index):  # noqa: N802
        self.gpu.local.stack = ["primary"]  # the runtime API: current until changed, per thread
        return (0,)

    def cudaMallocHost(self, nbytes):  # noqa: N802
        buffer = ctypes.create_string_buffer(nbytes)
        self.host[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaFreeHost(self, address):  # noqa: N802
        del self.host[address]
        return (0,)

    def cudaMalloc(self, nbytes):  # noqa: N802
        return 0, self.gpu.alloc(nbytes)

    def cudaFree(self, address):  # noqa: N802
        self.gpu.require_current("cudaFree")
        del self.gpu.memory[address]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        gpu = self.gpu
        if kind == 1:
            work = lambda: gpu.memory[dst].__setitem__(slice(0, nbytes), ctypes.string_at(src, nbytes))  # noqa: E731
        else:
            work = lambda: ctypes.memmove(dst, bytes(gpu.memory[src][:nbytes]), nbytes)  # noqa: E731
        gpu.enqueue(int(stream), work)
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        self.gpu.require_current("cudaStreamCreate")
        return 0, self._Stream(self.gpu.new_stream())

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.gpu.synchronize(int(stream))
        return (0,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.gpu.destroy_stream(int(stream))
        return (0,)

    def cudaMemGetInfo(self):  # noqa: N802
        return 0, self.gpu.free_bytes(), self.gpu.total


class _DataType(enum.Enum):  # tensorrt.DataType's members (names as in TensorRT 10)
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class _FakeEngine:
    """An 'engine' file holds b'FAKE' + the ONNX path; it runs that ONNX, with the I/O types of `io_types`."""

    io_types = {"image": _DataType.FLOAT, "coarse_probs": _DataType.FLOAT, "fine_probs": _DataType.HALF,
                "diagnosis_tokens": _DataType.INT64}

    def __init__(self, onnx_path: str, gpu: _Gpu):
        import onnxruntime as ort

        gpu.require_current("deserialize_cuda_engine")
        self.session, self.gpu = ort.InferenceSession(onnx_path), gpu
        self.names = list(self.io_types)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name == "image" else "out"

    def get_tensor_shape(self, name: str) -> tuple:
        return {"image": (-1, 3, 32, 32), "coarse_probs": (-1, 5), "fine_probs": (-1, 7),
                "diagnosis_tokens": (-1, 4)}[name]

    def get_tensor_dtype(self, name: str) -> _DataType:
        return self.io_types[name]

    def get_tensor_profile_shape(self, name: str, profile: int):
        return (2, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)

    def create_execution_context(self):
        return _FakeContext(self)


_NUMPY_OF = {_DataType.FLOAT: np.float32, _DataType.HALF: np.float16, _DataType.INT64: np.int64}


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
        assert isinstance(address, int) and address in self.engine.gpu.memory
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine, batch = self.engine, self.batch
        memory = engine.gpu.memory

        def kernel():  # reads the input when it runs on the stream, not when it is queued
            count = batch * 3 * 32 * 32
            image = np.frombuffer(bytes(memory[self.addresses["image"]][: count * 4]), np.float32)
            outs = engine.session.run(engine.names[1:], {"image": image.reshape(batch, 3, 32, 32)})
            for name, value in zip(engine.names[1:], outs):
                data = value.astype(_NUMPY_OF[engine.io_types[name]]).tobytes()
                memory[self.addresses[name]][: len(data)] = data

        engine.gpu.enqueue(stream_handle, kernel)
        return True


@pytest.fixture(params=["pycuda", "cuda-python"])
def fake_trt(request, monkeypatch):
    """tensorrt + one CUDA binding (pycuda, or cuda-python with pycuda absent), all fake; yields (trt, gpu)."""
    gpu = _Gpu()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = _DataType

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return _FakeEngine(data[4:].decode(), gpu) if data.startswith(b"FAKE") else None

    trt.Runtime = Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if request.param == "pycuda":
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = _FakePyCuda(gpu)
        monkeypatch.setitem(sys.modules, "pycuda", pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda.driver)
        gpu.binding_module = pycuda.driver
    else:
        monkeypatch.setitem(sys.modules, "pycuda", None)  # import fails: pycuda is absent
        monkeypatch.setitem(sys.modules, "pycuda.driver", None)
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        bindings.runtime = _FakeCudart(gpu)
        cuda.bindings = bindings
        for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", bindings.runtime)):
            monkeypatch.setitem(sys.modules, name, module)
        gpu.binding_module = bindings.runtime
    gpu.binding = request.param
    monkeypatch.setattr(_HostAlloc, "live", set())
    return trt, gpu


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
    assert gpu.memory == {} and gpu.streams == {} and _HostAlloc.live == set()
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
    monkeypatch.setitem(_FakeEngine.io_types, "fine_probs", _DataType.BF16)
    with pytest.raises(ValueError, match="I/O type BF16"):
        Predictor(engine)
    assert fake_trt[1].memory == {} and fake_trt[1].leaked_streams == 0  # a failed open releases what it took


# --- The builder: what TensorRT 8.5 / 10.x / 11.x accept, checked per version.

_BUILDER_FLAGS = {8: ("FP16", "INT8", "TF32"), 10: ("FP16", "INT8", "TF32"), 11: ("TF32",)}


class _FakeBuilder:
    """Records what build_engine asks of TensorRT's builder and refuses what that version would:
    removed flags do not exist (AttributeError, as in 11.x), precision flags on a strongly typed network
    fail the build (as 10.x does), and 'builds' a fake engine of the ONNX."""

    def __init__(self, logger):
        _FakeBuilder.last = self

    def create_network(self, flags: int):
        self.network_flags = flags
        tensor = types.SimpleNamespace(name="image", shape=(-1, 3, 32, 32), dtype="FLOAT")
        return types.SimpleNamespace(num_inputs=1, get_input=lambda i: tensor, num_outputs=0, get_output=None,
                                     num_layers=0, get_layer=None, onnx=None, flags=flags)

    def create_builder_config(self):
        config = self.config = types.SimpleNamespace(flags={"TF32"}, profiles=[], cache=None)  # TF32: default on
        config.set_memory_pool_limit = lambda pool, size: setattr(config, "workspace", size)
        config.set_flag = config.flags.add
        config.clear_flag = config.flags.discard
        config.add_optimization_profile = config.profiles.append
        config.create_timing_cache = lambda data: types.SimpleNamespace(data=data)
        config.set_timing_cache = lambda cache, ignore_mismatch: setattr(config, "cache", cache)
        config.get_timing_cache = lambda: types.SimpleNamespace(serialize=lambda: config.cache.data + b"+")
        return config

    def create_optimization_profile(self):
        shapes = {}
        return types.SimpleNamespace(shapes=shapes, set_shape=lambda name, *s: shapes.__setitem__(name, s))

    def build_serialized_network(self, network, config):
        strongly_typed = bool(network.flags & (1 << 5))
        if strongly_typed and config.flags & {"FP16", "INT8"}:
            return None  # TensorRT 10: precision flags are an error on a strongly typed network
        return b"FAKE" + network.onnx.encode()


@pytest.fixture(params=["10.3.0", "11.0.0"])
def fake_builder(request, fake_trt):
    trt, _ = fake_trt
    trt.__version__ = request.param

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data: bytes, path: str) -> bool:
            """Layers typed as TensorRT would type the ONNX: Q/DQ layers, HALF outputs after FP16 casts."""
            model = onnx.load_from_string(data)
            layers = []
            for node in model.graph.node:
                half = node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT16
                out = types.SimpleNamespace(dtype=_DataType.HALF if half else _DataType.FLOAT)
                layers.append(types.SimpleNamespace(type=node.op_type, num_outputs=1, get_output=lambda j, o=out: o))
            self.network.num_layers, self.network.get_layer = len(layers), layers.__getitem__
            self.network.onnx = path
            return True

    major = int(request.param.split(".")[0])
    trt.Builder, trt.OnnxParser = _FakeBuilder, Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in _BUILDER_FLAGS[major]})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.LayerType = types.SimpleNamespace(QUANTIZE="QuantizeLinear", DEQUANTIZE="DequantizeLinear")
    return trt


def test_build_engine_writes_engine_sidecar_and_timing_cache(fake_builder, tmp_path: Path, capsys):
    onnx_path = _retyped(write_tiny_model(tmp_path), "fp16")
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"old")
    assert cli(build_main, [str(onnx_path), "--precision", "fp16", "--min-batch", "2", "--opt-batch", "3",
                            "--max-batch", "4", "--workspace-mb", "64", "--timing-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "network input 'image': shape [-1, 3, 32, 32]" in out and f"TensorRT {fake_builder.__version__}" in out
    builder = _FakeBuilder.last
    assert builder.network_flags == 1 << 5 and builder.config.flags == {"TF32"}  # strongly typed, no FP16 flag
    assert builder.config.workspace == 64 << 20
    assert builder.config.profiles[0].shapes["image"] == ((2, 3, 32, 32), (3, 3, 32, 32), (4, 3, 32, 32))
    assert cache.read_bytes() == b"old+"  # loaded, then saved after the build
    engine = default_engine_path(onnx_path)
    contract = Contract.load(sidecar_path(engine))
    build = contract.extra["tensorrt"]
    assert build["version"] == fake_builder.__version__ and build["gpu"] == "Fake GPU"
    assert build["precision"] == "fp16" and (build["min_batch"], build["opt_batch"], build["max_batch"]) == (2, 3, 4)
    assert build["onnx_sha256"] == sha256_file(onnx_path)
    assert contract.output_names == tiny_contract().output_names
    with Predictor(engine) as predictor:  # the fake engine runs the ONNX: a full round trip
        (pred,) = predictor.predict([write_image(tmp_path / "r.jpg", (230, 20, 20))])
    assert pred.tasks["diagnosis"].text == "red disc"


def test_build_engine_every_precision_strongly_typed(fake_builder, tmp_path: Path, capsys):
    fp32 = write_tiny_model(tmp_path)
    for onnx_path, precision in ((_retyped(fp32, "int8"), "int8"), (fp32, "fp32")):
        build_engine(onnx_path, precision=precision, log=lambda _: None)
        assert _FakeBuilder.last.network_flags == 1 << 5
        assert _FakeBuilder.last.config.flags == (set() if precision == "fp32" else {"TF32"})  # fp32: TF32 off
    # The model's own types decide: a float32 ONNX cannot become an fp16 or int8 engine by flag.
    for precision, needs in (("fp16", "FP16 ONNX"), ("int8", "Q/DQ ONNX")):
        assert cli(build_main, [str(fp32), "--precision", precision]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and needs in err and "this model is fp32" in err


@pytest.mark.parametrize("fake_builder", ["8.5.2.2"], indirect=True)
def test_build_engine_on_tensorrt_8_uses_weak_typing_flags(fake_builder, tmp_path: Path):
    fp32 = write_tiny_model(tmp_path)
    build_engine(fp32, precision="fp16", log=lambda _: None)
    assert _FakeBuilder.last.network_flags == 1 << 0 and _FakeBuilder.last.config.flags == {"FP16", "TF32"}
    build_engine(_retyped(fp32, "int8"), precision="int8", log=lambda _: None)
    assert _FakeBuilder.last.config.flags == {"FP16", "INT8", "TF32"}

"""Stand-ins for TensorRT's runtime and its CUDA bindings, for tests on machines without them.

tests/conftest.py turns `install_tensorrt` into the `fake_trt` fixture (tests/test_trt.py,
tests/test_trt_builder.py). `retyped` gives the tiny ONNX model FP16 tensors or Q/DQ nodes, as the
compressed models have.
"""

from __future__ import annotations

import ctypes
import enum
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploy.contract import sidecar_path


def retyped(onnx_path: Path, kind: str) -> Path:
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


class HostAlloc(np.ndarray):
    live: set = set()

    def free(self) -> None:
        HostAlloc.live.discard(id(self))


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
        base = np.zeros(n, dtype).view(HostAlloc)
        HostAlloc.live.add(id(base))
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


class DataType(enum.Enum):  # tensorrt.DataType's members (names as in TensorRT 10)
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class FakeEngine:
    """An 'engine' file holds b'FAKE' + the ONNX path; it runs that ONNX, with the I/O types of `io_types`."""

    io_types = {"image": DataType.FLOAT, "coarse_probs": DataType.FLOAT, "fine_probs": DataType.HALF,
                "diagnosis_tokens": DataType.INT64}

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

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io_types[name]

    def get_tensor_profile_shape(self, name: str, profile: int):
        return (2, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)

    def create_execution_context(self):
        return _FakeContext(self)


_NUMPY_OF = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64}


class _FakeContext:
    def __init__(self, engine: FakeEngine):
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



def install_tensorrt(binding: str, monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, _Gpu]:
    """Fake tensorrt + one CUDA binding ("pycuda", or "cuda-python" with pycuda absent) in sys.modules
    for the test's duration; (trt, gpu)."""
    gpu = _Gpu()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = DataType

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return FakeEngine(data[4:].decode(), gpu) if data.startswith(b"FAKE") else None

    trt.Runtime = Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if binding == "pycuda":
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
    gpu.binding = binding
    monkeypatch.setattr(HostAlloc, "live", set())
    return trt, gpu

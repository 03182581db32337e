"""The few CUDA calls the TensorRT backend needs, through pycuda or NVIDIA's cuda-python.

pycuda is the design's binding (`pip install '.[jetson]'`; it compiles against JetPack's CUDA).
Where it is absent, NVIDIA's `cuda-python` (wheels, what TensorRT's current samples use) is accepted:
its runtime API works on the device's primary context, the one TensorRT uses too. Both are imported
only when an engine is opened. Every call that can fail raises `CudaUnavailable` (cannot start) or
`RunFailed` (a call failed mid-run); nothing here prints.

    cuda = open_cuda(0)
    with cuda.active():                       # current on this thread for the duration
        stream = cuda.new_stream()
        ...
        cuda.destroy_stream(stream)           # while the context is still current
    cuda.close()
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from deploy.backend import ModelError
from deploy.errors import RunFailed

PYCUDA_HINT = (
    "no CUDA binding: install pycuda (`pip install '.[jetson]'`; it compiles against CUDA, so put nvcc on "
    "PATH first: `export PATH=/usr/local/cuda/bin:$PATH`) or NVIDIA's wheels `pip install '.[cuda-python]'`"
)


class CudaUnavailable(ModelError):
    """No CUDA binding is installed, or CUDA cannot start (no GPU, no driver, no permission)."""


class CudaDevice(ABC):
    """One GPU through one binding: device facts, pinned host memory, device memory, streams."""

    binding: str

    @abstractmethod
    def device_name(self) -> str:
        """The GPU's name (recorded in, and checked against, engine sidecars)."""

    @abstractmethod
    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this device's primary context current on the calling thread for the block."""

    @abstractmethod
    def pinned(self, count: int, dtype: np.dtype) -> np.ndarray:
        """A page-locked host array of `count` elements (free with `free_pinned`)."""

    @abstractmethod
    def free_pinned(self, array: np.ndarray) -> None: ...

    @abstractmethod
    def alloc(self, nbytes: int) -> int:
        """A device allocation; returns its address."""

    @abstractmethod
    def free(self, address: int) -> None: ...

    @abstractmethod
    def htod_async(self, address: int, host: np.ndarray, stream) -> None:
        """Queue a copy of `host` (contiguous) to device memory on `stream`."""

    @abstractmethod
    def dtoh_async(self, host: np.ndarray, address: int, stream) -> None:
        """Queue a copy of device memory into `host` on `stream`; valid after `synchronize`."""

    @abstractmethod
    def new_stream(self): ...

    @abstractmethod
    def stream_handle(self, stream) -> int:
        """The cudaStream_t as an int, for TensorRT's execute_async_v3."""

    @abstractmethod
    def synchronize(self, stream) -> None: ...

    @abstractmethod
    def destroy_stream(self, stream) -> None:
        """Destroy `stream`; call while the context is active (else the driver skips it: a leak)."""

    @abstractmethod
    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""

    def close(self) -> None:  # noqa: B027 - optional: only pycuda holds a context reference to drop
        """Release the context reference (safe to call twice)."""


class PyCudaDevice(CudaDevice):
    binding = "pycuda"

    def __init__(self, cuda, index: int):
        self.cuda = cuda
        try:
            cuda.init()
            if cuda.Device.count() <= index:
                raise CudaUnavailable(f"pycuda found no CUDA device {index}; check the driver (nvidia-smi / tegrastats)")
            self.device = cuda.Device(index)
            self._context = self.device.retain_primary_context()
        except cuda.Error as exc:
            raise CudaUnavailable(_start_failed(exc)) from exc
        self._allocations: dict[int, object] = {}

    def device_name(self) -> str:
        return self.device.name()

    @contextmanager
    def active(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def pinned(self, count: int, dtype: np.dtype) -> np.ndarray:
        return self.cuda.pagelocked_empty(int(count), dtype)

    def free_pinned(self, array: np.ndarray) -> None:
        array.base.free()

    def alloc(self, nbytes: int) -> int:
        allocation = self.cuda.mem_alloc(max(int(nbytes), 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, address: int) -> None:
        self._allocations.pop(address).free()

    def htod_async(self, address: int, host: np.ndarray, stream) -> None:
        self.cuda.memcpy_htod_async(address, host, stream)

    def dtoh_async(self, host: np.ndarray, address: int, stream) -> None:
        self.cuda.memcpy_dtoh_async(host, address, stream)

    def new_stream(self):
        return self.cuda.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def destroy_stream(self, stream) -> None:
        # pycuda destroys a Stream when its last reference goes, and only if its context is current;
        # the caller drops its reference inside `active()`, so this one is the last.
        del stream

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self.cuda.mem_get_info()
        return int(free), int(total)

    def close(self) -> None:
        if self._context is not None:
            self._context.detach()
            self._context = None


class CudaPythonDevice(CudaDevice):
    """NVIDIA's cuda-python, runtime API (cudart), as in TensorRT's own Python samples."""

    binding = "cuda-python"

    def __init__(self, cudart, index: int):
        self.rt, self.index = cudart, index
        try:
            count = self._call(cudart.cudaGetDeviceCount())
        except Exception as exc:  # no driver library, no device: the binding raises its own types
            raise CudaUnavailable(_start_failed(exc)) from exc
        if count <= index:
            raise CudaUnavailable(f"cuda-python found no CUDA device {index}; check the driver (nvidia-smi / tegrastats)")
        self._pinned: dict[int, int] = {}

    def _call(self, result):
        """Unpack cuda-python's (error, *values) tuples; RunFailed naming the error."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise RunFailed(f"CUDA call failed: {name} (cuda-python); check `nvidia-smi` / `tegrastats`")
        return values[0] if len(values) == 1 else tuple(values) or None

    def device_name(self) -> str:
        name = self._call(self.rt.cudaGetDeviceProperties(self.index)).name
        return (name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)).strip()

    @contextmanager
    def active(self) -> Iterator[None]:
        # The runtime API keeps one primary context per device; selecting the device on this thread
        # makes it current here, whichever thread created the backend.
        self._call(self.rt.cudaSetDevice(self.index))
        yield

    def pinned(self, count: int, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(count) * dtype.itemsize, 1)
        address = int(self._call(self.rt.cudaMallocHost(nbytes)))
        buffer = (ctypes.c_byte * nbytes).from_address(address)
        array = np.frombuffer(buffer, dtype=np.uint8)[: int(count) * dtype.itemsize].view(dtype)
        self._pinned[array.ctypes.data] = address
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        self._call(self.rt.cudaFreeHost(self._pinned.pop(array.ctypes.data)))

    def alloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, address: int) -> None:
        self._call(self.rt.cudaFree(address))

    def htod_async(self, address: int, host: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(address, host.ctypes.data, host.nbytes, kind, stream))

    def dtoh_async(self, host: np.ndarray, address: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, address, host.nbytes, kind, stream))

    def new_stream(self):
        return self._call(self.rt.cudaStreamCreate())

    def stream_handle(self, stream) -> int:
        return int(stream)

    def synchronize(self, stream) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))

    def destroy_stream(self, stream) -> None:
        self._call(self.rt.cudaStreamDestroy(stream))

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._call(self.rt.cudaMemGetInfo())
        return int(free), int(total)


def _start_failed(exc: Exception) -> str:
    return (f"CUDA could not start ({type(exc).__name__}: {str(exc).strip()[:200]}); check the driver "
            "(nvidia-smi / tegrastats) and that this user may use the GPU (on a Jetson: the `video` group)")


def _import_cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python
    return runtime


def open_cuda(index: int = 0) -> CudaDevice:
    """GPU `index` through pycuda, else cuda-python; CudaUnavailable saying what to install or check."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        cuda = None
    if cuda is not None:
        return PyCudaDevice(cuda, index)
    try:
        cudart = _import_cudart()
    except ImportError as exc:
        raise CudaUnavailable(PYCUDA_HINT) from exc
    return CudaPythonDevice(cudart, index)

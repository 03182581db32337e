"""The TensorRT backend (TensorRT 10/11 name-based tensor API; pycuda or cuda-python for memory/streams).

tensorrt and the CUDA binding are imported only when a backend is created, and a clear error says what
to install when they are missing. Lifetimes are owned by small classes: `deploy.cuda_binding` (the
device's primary context, shared with TensorRT), `HostDeviceBuffer` (page-locked host memory + a
device allocation, sized for the profile's max batch) and `TrtBackend` (engine, execution context,
one CUDA stream). The context is made current around every call (load, run, close), so a backend
may be used from any thread, one call at a time; the stream is destroyed while it is current.

TensorRT engines are not portable: an engine runs only with the TensorRT version and GPU model it was
built with, so the engine's sidecar records both (`extra.tensorrt`) and they are checked before the
engine is deserialized. For TensorRT 8.5 (JetPack 5) see deploy/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploy.backend import Backend, ModelError, check_model_file, sniff_file
from deploy.cuda_binding import CudaDevice, CudaUnavailable, open_cuda
from deploy.errors import RunFailed

TENSORRT_HINT = (
    "the `tensorrt` Python package is not installed. On a Jetson it comes with JetPack: "
    "`sudo apt install python3-libnvinfer` and use the system python3 or a venv made with "
    "--system-site-packages; on a desktop NVIDIA GPU: `pip install tensorrt --extra-index-url "
    "https://pypi.nvidia.com` (NVIDIA's index; the PyPI `tensorrt` sdist only redirects there). Without "
    "TensorRT, run the .onnx model with --backend ort"
)
# TensorRT DataType name -> numpy dtype for engine I/O. A table, not trt.nptype: nptype has no entry for
# BF16/FP8/INT4 and its INT64 support depends on the version; an I/O type missing here is refused.
IO_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
             "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


class TensorRTUnavailable(CudaUnavailable):
    """tensorrt or a CUDA binding cannot be imported, or no CUDA device is usable."""


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(TENSORRT_HINT) from exc
    return trt


def trt_major(trt) -> int:
    """TensorRT's major version (8 on JetPack 5, 10 on JetPack 6, 11 current)."""
    return int(str(trt.__version__).split(".")[0])


def numpy_dtype(trt_dtype) -> np.dtype:
    """The numpy dtype of an engine I/O tensor type; ModelError for types numpy cannot hold here."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1].upper()
    if name not in IO_DTYPES:
        raise ModelError(f"engine I/O type {name} is not supported by this runtime (use FLOAT/HALF/INT32/INT64 "
                         "inputs and outputs: export with float32 I/O)")
    return np.dtype(IO_DTYPES[name])


def gpu_name(device: int = 0) -> str:
    """The CUDA device's name (recorded in, and checked against, engine sidecars)."""
    cuda = open_cuda(device)
    try:
        return cuda.device_name()
    finally:
        cuda.close()


def engine_mismatch(build: dict, trt_version: str, gpu: str) -> str | None:
    """Why an engine built as `build` (its sidecar's extra.tensorrt) cannot run here, or None if it can."""
    problems = []
    if str(build.get("version")) != trt_version:
        problems.append(f"it was built with TensorRT {build.get('version')}, this device has {trt_version}")
    if str(build.get("gpu")) != gpu:
        problems.append(f"it was built for the GPU {build.get('gpu')!r}, this device has {gpu!r}")
    return "; ".join(problems) or None


class HostDeviceBuffer:
    """Page-locked host array + device allocation for one I/O tensor at its largest shape."""

    def __init__(self, cuda: CudaDevice, shape: tuple[int, ...], dtype: np.dtype):
        self.cuda = cuda
        self.shape = tuple(int(d) for d in shape)
        self.host = cuda.pinned(int(np.prod(self.shape)), dtype)
        self.device: int | None = cuda.alloc(max(self.host.nbytes, 1))

    def to_device(self, data: np.ndarray, stream) -> None:
        """Queue a copy of `data` (flattened) into the device buffer."""
        flat = np.ascontiguousarray(data, dtype=self.host.dtype).ravel()
        self.host[: flat.size] = flat
        self.cuda.htod_async(self.device, self.host[: flat.size], stream)

    def from_device(self, shape: tuple[int, ...], stream) -> np.ndarray:
        """Queue a copy of the first prod(shape) elements back; valid after the stream is synchronized."""
        count = int(np.prod(shape))
        self.cuda.dtoh_async(self.host[:count], self.device, stream)
        return self.host[:count].reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self.cuda.free(self.device)
            self.cuda.free_pinned(self.host)
            self.device = None


class TrtBackend(Backend):
    """A serialized TensorRT engine run with execute_async_v3 on one CUDA stream."""

    name = "tensorrt"

    def __init__(self, path: str | Path, build_info: dict | None = None, device: int = 0):
        self.path = check_model_file(path)
        trt = import_tensorrt()
        self.trt_version = trt.__version__
        self.buffers: dict[str, HostDeviceBuffer] = {}
        self.context = self.engine = self.stream = None
        self.gpu_memory_mb: float | None = None
        self._cuda: CudaDevice | None = open_cuda(device)
        try:
            self.gpu = self._cuda.device_name()
            if build_info:
                problem = engine_mismatch(build_info, self.trt_version, self.gpu)
                if problem:
                    raise ModelError(f"{self.path}: this TensorRT engine cannot run here: {problem}. Engines are "
                                     "not portable: rebuild it on this device with `python -m deploy.build_engine "
                                     "MODEL.onnx` (or run the .onnx with --backend ort)")
            with self._cuda.active():
                free_before = self._cuda.mem_get_info()[0]
                self._load(trt)
                # Device memory this engine holds (weights, activations, I/O buffers): a mem_get_info
                # delta, because host RSS does not see GPU memory on a desktop GPU.
                self.gpu_memory_mb = (free_before - self._cuda.mem_get_info()[0]) / 2**20
        except BaseException:
            self.close()
            raise

    def _load(self, trt) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            what = sniff_file(self.path)
            raise ModelError(f"{self.path}: TensorRT could not deserialize this file"
                             + (f" (it looks like {what})" if what else "")
                             + "; it is not an engine, is damaged, or was built by another TensorRT version: "
                             "rebuild it with `python -m deploy.build_engine`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input tensor, found {inputs}")
        self.input_name = inputs[0]
        declared = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_shape = tuple(d if d >= 0 else None for d in declared)
        if any(d < 0 for d in declared):
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, largest = int(lo[0]), tuple(int(d) for d in hi)
        else:
            self.min_batch, largest = int(declared[0]), tuple(int(d) for d in declared)
        self.max_batch = largest[0]
        # With the input at its largest shape the context reports each output's largest shape.
        self.context.set_input_shape(self.input_name, largest)
        self.output_shapes, self.output_dtypes = {}, {}
        for name in names:
            shape = largest if name == self.input_name else tuple(self.context.get_tensor_shape(name))
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name))
            self.buffers[name] = HostDeviceBuffer(self._cuda, shape, dtype)
            self.context.set_tensor_address(name, self.buffers[name].device)
            if name != self.input_name:
                self.output_shapes[name] = tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name))
                self.output_dtypes[name] = dtype
        self.stream = self._cuda.new_stream()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds the engine's max batch {self.max_batch}; use a smaller "
                             "--batch-size or rebuild the engine with a larger --max-batch")
        if n < self.min_batch:  # the profile cannot run smaller batches: pad, then drop the padding
            pad = np.zeros((self.min_batch - n, *batch.shape[1:]), dtype=batch.dtype)
            return {k: v[:n] for k, v in self.run(np.concatenate([batch, pad])).items()}
        with self._cuda.active():
            self.context.set_input_shape(self.input_name, tuple(batch.shape))
            self.buffers[self.input_name].to_device(batch, self.stream)
            if not self.context.execute_async_v3(self._cuda.stream_handle(self.stream)):
                raise RunFailed(f"{self.path}: TensorRT execution failed (see the TensorRT log above)")
            views = {name: self.buffers[name].from_device(tuple(self.context.get_tensor_shape(name)), self.stream)
                     for name in self.output_shapes}
            self._cuda.synchronize(self.stream)  # the copies above are only queued until here
        return {name: view.copy() for name, view in views.items()}

    def describe(self) -> dict:
        return {"backend": self.name, "tensorrt": self.trt_version, "gpu": self.gpu,
                "cuda_binding": self._cuda.binding if self._cuda else None,
                "gpu_memory_mb": None if self.gpu_memory_mb is None else round(self.gpu_memory_mb, 3),
                "min_batch": getattr(self, "min_batch", None), "max_batch": self.max_batch}

    def close(self) -> None:
        cuda, self._cuda = getattr(self, "_cuda", None), None
        if cuda is None:
            return
        # Everything CUDA owns goes while its context is current: pending work, buffers, the stream
        # (destroyed outside it, the driver skips cuStreamDestroy and leaks it), execution context, engine.
        with cuda.active():
            stream, self.stream = self.stream, None
            if stream is not None:
                cuda.synchronize(stream)
            for buffer in self.buffers.values():
                buffer.free()
            self.buffers = {}
            if stream is not None:
                cuda.destroy_stream(stream)
                del stream
            self.context = self.engine = None
        cuda.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone; nothing left to release
            pass

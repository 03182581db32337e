"""The TensorRT backend (TensorRT 10 name-based tensor API, pycuda for memory and streams).

tensorrt and pycuda are imported only when a backend is created, and a clear error says what to
install when they are missing. Lifetimes are owned by small classes: `CudaContext` (the device's
primary context, shared with TensorRT's runtime API calls), `HostDeviceBuffer` (page-locked host
memory + a device allocation, sized for the profile's max batch) and `TrtBackend` (engine, execution
context, one CUDA stream). A backend must be used from the thread that created it.

TensorRT engines are not portable: an engine runs only with the TensorRT version and GPU model it was
built with, so the engine's sidecar records both (`extra.tensorrt`) and they are checked before the
engine is deserialized. For TensorRT 8.5 (JetPack 5) see deploy/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploy.runtime import Backend, ModelError, check_model_file, sniff_file

TENSORRT_HINT = (
    "the `tensorrt` Python package is not installed. On a Jetson it comes with JetPack: "
    "`sudo apt install python3-libnvinfer` and a venv made with --system-site-packages; on a desktop "
    "NVIDIA GPU: `pip install tensorrt --extra-index-url https://pypi.nvidia.com` (NVIDIA's index; the PyPI "
    "`tensorrt` sdist only redirects there). Without TensorRT, run the .onnx model with --backend ort"
)
PYCUDA_HINT = (
    "`pycuda` is not installed: `pip install pycuda` (it compiles against CUDA: put nvcc on PATH first, "
    "e.g. `export PATH=/usr/local/cuda/bin:$PATH`; on a Jetson the CUDA toolkit comes with JetPack)"
)


class TensorRTUnavailable(ModelError):
    """tensorrt or pycuda cannot be imported, or no CUDA device is usable."""


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(TENSORRT_HINT) from exc
    return trt


def import_pycuda():
    """pycuda.driver, initialised, or TensorRTUnavailable saying how to install it."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise TensorRTUnavailable(PYCUDA_HINT) from exc
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise TensorRTUnavailable("pycuda found no CUDA device; check the driver (nvidia-smi / tegrastats)")
    except cuda.Error as exc:
        raise TensorRTUnavailable(f"CUDA could not start ({exc}); check the driver and that this user may use "
                                  "the GPU (on a Jetson: member of the `video` group)") from exc
    return cuda


def gpu_name(device: int = 0) -> str:
    """The CUDA device's name as pycuda reports it (recorded in, and checked against, engine sidecars)."""
    return import_pycuda().Device(device).name()


def engine_mismatch(build: dict, trt_version: str, gpu: str) -> str | None:
    """Why an engine built as `build` (its sidecar's extra.tensorrt) cannot run here, or None if it can."""
    problems = []
    if str(build.get("version")) != trt_version:
        problems.append(f"it was built with TensorRT {build.get('version')}, this device has {trt_version}")
    if str(build.get("gpu")) != gpu:
        problems.append(f"it was built for the GPU {build.get('gpu')!r}, this device has {gpu!r}")
    return "; ".join(problems) or None


class CudaContext:
    """The device's primary CUDA context, made current on this thread until `close()`.

    The primary context is the one TensorRT (CUDA runtime API) uses, so engine, buffers and stream
    all live in the same context.
    """

    def __init__(self, device: int = 0):
        self.cuda = import_pycuda()
        self.device = self.cuda.Device(device)
        self._context = self.device.retain_primary_context()
        self._context.push()

    def close(self) -> None:
        if self._context is not None:
            self.cuda.Context.pop()
            self._context.detach()
            self._context = None


class HostDeviceBuffer:
    """Page-locked host array + device allocation for one I/O tensor at its largest shape."""

    def __init__(self, cuda, shape: tuple[int, ...], dtype: np.dtype):
        self.cuda = cuda
        self.shape = tuple(int(d) for d in shape)
        self.host = cuda.pagelocked_empty(int(np.prod(self.shape)), dtype)
        self.device = cuda.mem_alloc(max(self.host.nbytes, 1))

    def to_device(self, data: np.ndarray, stream) -> None:
        """Queue a copy of `data` (flattened) into the device buffer."""
        flat = np.ascontiguousarray(data, dtype=self.host.dtype).ravel()
        self.host[: flat.size] = flat
        self.cuda.memcpy_htod_async(self.device, self.host[: flat.size], stream)

    def from_device(self, shape: tuple[int, ...], stream) -> np.ndarray:
        """Queue a copy of the first prod(shape) elements back; valid after stream.synchronize()."""
        count = int(np.prod(shape))
        self.cuda.memcpy_dtoh_async(self.host[:count], self.device, stream)
        return self.host[:count].reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
            self.host.base.free()
            self.device = None


class TrtBackend(Backend):
    """A serialized TensorRT engine run with execute_async_v3 on one CUDA stream."""

    name = "tensorrt"

    def __init__(self, path: str | Path, build_info: dict | None = None, device: int = 0):
        self.path = check_model_file(path)
        trt = import_tensorrt()
        self.trt_version = trt.__version__
        self.buffers: dict[str, HostDeviceBuffer] = {}
        self.context = self.engine = None
        self._cuda = CudaContext(device)
        try:
            self.gpu = self._cuda.device.name()
            if build_info:
                problem = engine_mismatch(build_info, self.trt_version, self.gpu)
                if problem:
                    raise ModelError(f"{self.path}: this TensorRT engine cannot run here: {problem}. Engines are "
                                     "not portable: rebuild it on this device with `python -m deploy.build_engine "
                                     "MODEL.onnx` (or run the .onnx with --backend ort)")
            self._load(trt)
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
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.buffers[name] = HostDeviceBuffer(self._cuda.cuda, shape, dtype)
            self.context.set_tensor_address(name, int(self.buffers[name].device))
            if name != self.input_name:
                self.output_shapes[name] = tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name))
                self.output_dtypes[name] = dtype
        self.stream = self._cuda.cuda.Stream()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds the engine's max batch {self.max_batch}; use a smaller "
                             "--batch-size or rebuild the engine with a larger --max-batch")
        if n < self.min_batch:  # the profile cannot run smaller batches: pad, then drop the padding
            pad = np.zeros((self.min_batch - n, *batch.shape[1:]), dtype=batch.dtype)
            return {k: v[:n] for k, v in self.run(np.concatenate([batch, pad])).items()}
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        self.buffers[self.input_name].to_device(batch, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"{self.path}: TensorRT execution failed (see the TensorRT log above)")
        views = {name: self.buffers[name].from_device(tuple(self.context.get_tensor_shape(name)), self.stream)
                 for name in self.output_shapes}
        self.stream.synchronize()
        return {name: view.copy() for name, view in views.items()}

    def describe(self) -> dict:
        return {"backend": self.name, "tensorrt": self.trt_version, "gpu": self.gpu,
                "min_batch": getattr(self, "min_batch", None), "max_batch": self.max_batch}

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers = {}
        # The execution context and engine must go before their CUDA context is released.
        self.context = self.engine = None
        if getattr(self, "_cuda", None) is not None:
            self._cuda.close()
            self._cuda = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone; nothing left to release
            pass

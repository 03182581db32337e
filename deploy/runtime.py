"""The ONNX Runtime backend, choosing a backend for a model file, and checking a model against its contract.

A backend (deploy.backend.Backend) turns a preprocessed batch into the model's raw named outputs. It
knows nothing about tasks, classes or text: `deploy.predictor.Predictor` adds that from the contract.
The TensorRT backend lives in `deploy.trt_runtime` and is imported only when asked for, so a device
without TensorRT (or a laptop) runs ONNX models with just numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deploy.backend import Backend, ModelError, check_model_file, sniff_file
from deploy.contract import Contract, ContractError, read_metadata, read_sidecar, sidecar_path

BACKENDS = ("auto", "ort", "tensorrt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# CUDA first where onnxruntime-gpu provides it. ORT's TensorRT execution provider is opt-in
# (--providers TensorrtExecutionProvider ...): without an engine cache it rebuilds the engine at every
# start, which takes minutes on a Jetson; the native backend (deploy.trt_runtime) is the way to use TRT.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

# ONNX Runtime logs warnings (in ANSI colour) that are no use to a user, e.g. "Could not find a CPU
# kernel and hence can't constant fold Gemm" for FP16 models on a CPU. Severity 3 keeps errors and
# fatal messages; failures still raise exceptions, which the backends turn into one clear line. Set
# FUNDUS_ORT_LOG_SEVERITY=0 (verbose) .. 2 (warnings) to see more.
ORT_LOG_SEVERITY_ENV = "FUNDUS_ORT_LOG_SEVERITY"
DEFAULT_ORT_LOG_SEVERITY = 3


def ort_log_severity() -> int:
    """ONNX Runtime's minimum log severity: FUNDUS_ORT_LOG_SEVERITY (0-4) or 3 (errors only)."""
    text = os.environ.get(ORT_LOG_SEVERITY_ENV, "")
    return int(text) if text in {"0", "1", "2", "3", "4"} else DEFAULT_ORT_LOG_SEVERITY


def quiet_onnxruntime() -> int:
    """Apply `ort_log_severity()` to ONNX Runtime's default logger (every session, including those that
    the quantization tools create inside); returns the severity."""
    import onnxruntime as ort

    severity = ort_log_severity()
    ort.set_default_logger_severity(severity)
    return severity



def backend_kind(path: str | Path, backend: str = "auto") -> str:
    """'ort' or 'tensorrt' for a model file: explicit choice, else by the file's suffix."""
    if backend not in BACKENDS:
        raise ModelError(f"backend must be one of {BACKENDS}, got {backend!r}")
    suffix = Path(path).suffix.lower()
    if backend == "auto":
        if suffix in ONNX_SUFFIXES:
            return "ort"
        if suffix in ENGINE_SUFFIXES:
            return "tensorrt"
        raise ModelError(f"{path}: cannot tell the backend from the suffix {suffix!r}; use a .onnx or .engine "
                         "file, or pass --backend ort|tensorrt")
    return backend


_ORT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
               "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32)}


def _dims(shape: list) -> tuple:
    """ORT shape (ints, symbolic names or None) -> ints with None for dynamic dimensions."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def session_options(threads: int | None = None):
    """The ONNX Runtime session options of every session here: the device's (OrtBackend) and the
    benchmark's encoder-only and architecture sessions, so that ratios compare like with like. All graph
    optimizations, ORT's warnings off, `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort  # here, not at module level: a TensorRT-only device may lack it

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = quiet_onnxruntime()
    if threads is not None:
        if threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    return options


def default_providers(available: list[str]) -> list[str]:
    """The preferred execution providers that this onnxruntime build has, best first."""
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


class OrtBackend(Backend):
    """An ONNX model run by onnxruntime.InferenceSession."""

    name = "ort"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort  # here, not at module level: a TensorRT-only device may lack it

        self.path = check_model_file(path)
        available = ort.get_available_providers()
        if providers:
            missing = [p for p in providers if p not in available]
            if missing:
                raise ModelError(f"execution providers {missing} are not in this onnxruntime build; available: "
                                 f"{available} (GPU providers need onnxruntime-gpu / NVIDIA's Jetson wheel)")
        options = session_options(threads)
        self.threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=list(providers or default_providers(available)))
        # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no base class but Exception.
        except Exception as exc:
            what = sniff_file(self.path)
            hint = f"it looks like {what}, " if what else ""
            raise ModelError(f"{self.path}: not a loadable ONNX model ({hint}{type(exc).__name__}: "
                             f"{str(exc).strip()[:300]}); re-export it or copy it again") from exc
        self.providers = self.session.get_providers()  # what ORT actually uses, after fallbacks
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input tensor, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.input_shape = _dims(inputs[0].shape)
        self.input_dtype = _ORT_DTYPES.get(inputs[0].type, np.dtype(np.float32))
        outputs = self.session.get_outputs()
        self.output_shapes = {o.name: _dims(o.shape) for o in outputs}
        self.output_dtypes = {o.name: _ORT_DTYPES.get(o.type, np.dtype(np.float32)) for o in outputs}
        self.max_batch = self.input_shape[0] if self.input_shape and self.input_shape[0] else None

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (custom key/value strings)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = list(self.output_shapes)
        values = self.session.run(names, {self.input_name: np.ascontiguousarray(batch, dtype=self.input_dtype)})
        return dict(zip(names, values))

    def close(self) -> None:
        self.session = None  # frees the session's memory arena once no run is in flight

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "onnxruntime": ort.__version__, "providers": list(self.providers),
                "threads": self.threads, "max_batch": self.max_batch}


def _essential(contract: Contract) -> dict:
    # The sidecar may add the model file's own hash and build facts (`hashes`, `extra`), which cannot be
    # embedded in the file they describe; everything that changes how outputs are read must agree.
    data = contract.to_dict()
    data.pop("hashes")
    data.pop("extra")
    return data


def resolve_contract(model_path: Path, embedded: Contract | None) -> Contract:
    """The model's contract: the sidecar, checked against the embedded copy when the model has one.

    An ONNX file that carries its contract still works without the sidecar (copying one file to the
    device is enough); an engine has no metadata, so its sidecar is required.
    """
    sidecar = sidecar_path(model_path)
    if not sidecar.is_file():
        if embedded is not None:
            return embedded
        raise ContractError(f"{model_path}: no contract: {sidecar} is missing and the model carries none in its "
                            f"metadata; copy the sidecar next to the model (export writes both)")
    contract = read_sidecar(model_path)
    if embedded is not None and _essential(contract) != _essential(embedded):
        diff = sorted(k for k, v in _essential(contract).items() if _essential(embedded).get(k) != v)
        raise ContractError(f"{model_path}: the sidecar {sidecar.name} and the contract in the model's metadata "
                            f"disagree on {diff}; the sidecar belongs to another model: copy the matching one")
    return contract


def load_model_contract(model_path: str | Path) -> Contract:
    """The contract of an ONNX model (sidecar and/or metadata) or an engine (sidecar), without running it."""
    model_path = check_model_file(model_path)
    if backend_kind(model_path) == "ort":
        return resolve_contract(model_path, read_metadata(OrtBackend(model_path).metadata, str(model_path)))
    return resolve_contract(model_path, None)


def verify_backend(backend: Backend, contract: Contract, source: str) -> None:
    """Raise ContractError unless the model's tensors are the ones the contract describes."""
    problems = []
    if backend.input_name != contract.input_name:
        problems.append(f"input is named {backend.input_name!r}, the contract says {contract.input_name!r}")
    size = contract.preprocessing.size
    want = (3, size, size)
    got = tuple(backend.input_shape[1:])
    if len(backend.input_shape) != 4 or any(g is not None and g != w for g, w in zip(got, want)):
        problems.append(f"input shape is {list(backend.input_shape)}, the contract needs [N, 3, {size}, {size}]")
    if set(backend.output_shapes) != set(contract.output_names):
        problems.append(f"outputs are {sorted(backend.output_shapes)}, the contract needs {contract.output_names}")
    for task in contract.tasks:
        shape = backend.output_shapes.get(task.output_name)
        if shape is None:
            continue
        dtype = backend.output_dtypes[task.output_name]
        if task.kind == "classification":
            if len(shape) != 2 or (shape[1] is not None and shape[1] != task.num_classes):
                problems.append(f"{task.output_name} has shape {list(shape)}, but task {task.name!r} has "
                                f"{task.num_classes} classes")
            if dtype.kind != "f":
                problems.append(f"{task.output_name} is {dtype}, expected float probabilities")
        else:
            if len(shape) != 2:
                problems.append(f"{task.output_name} has shape {list(shape)}, expected [N, max_len]")
            if dtype.kind not in "iu":
                problems.append(f"{task.output_name} is {dtype}, expected integer token ids")
    if problems:
        raise ContractError(f"{source}: the model does not match its contract: " + "; ".join(problems)
                            + ". Re-export the model or copy the sidecar that belongs to it")


def open_backend(path: str | Path, backend: str = "auto", providers: list[str] | None = None,
                 threads: int | None = None, contract: Contract | None = None) -> Backend:
    """Load a model with the chosen backend. For engines, `contract` is used to refuse an engine built
    for another TensorRT version or GPU before TensorRT tries to deserialize it."""
    path = check_model_file(path)
    kind = backend_kind(path, backend)
    if kind == "ort":
        return OrtBackend(path, providers=providers, threads=threads)
    from deploy.trt_runtime import TrtBackend  # lazy: imports tensorrt and pycuda

    build = (contract.extra.get("tensorrt") if contract else None) or None
    return TrtBackend(path, build_info=build)


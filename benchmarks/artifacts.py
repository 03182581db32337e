"""The artifacts of a run and how to load each one as a `Runner` (preprocessed batch -> outputs by task).

Artifacts (runs/<name>/): PyTorch checkpoints of every teacher, the student and the baseline (and the
teacher ensemble built from the teachers); ONNX files from `make export` / `make compress`
(<model>.onnx, .fp16, .int8-cpu, .int8-tensorrt); TensorRT engines (*.engine in engines/ or onnx/).
Names are `<model>.<flavour>`: student.pytorch, student.fp32, student.int8-cpu, student.engine, ...
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from deploy.contract import TaskSpec, read_sidecar
from deploy.preprocess import PreprocessSpec
from deploy.vocab import Vocabulary
from train.layout import ONNX_FLAVOURS, RunLayout

STUDENT_ROLES = ("student", "baseline")
# Ops whose multiply-accumulates dominate; weight input index and kind.
_CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_OPS = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "Gemm": 1}


@dataclass
class Artifact:
    """One thing to benchmark. `skip` holds the reason when it cannot run on this machine."""

    name: str
    model: str  # student | baseline | ensemble | <teacher name>
    role: str  # student | baseline | ensemble | teacher
    format: str  # pytorch | onnx | tensorrt
    precision: str  # fp32 | fp16 | int8-cpu | int8-tensorrt
    paths: list[Path] = field(default_factory=list)
    onnx_fp32: Path | None = None  # the model's FP32 graph (MACs of PyTorch artifacts)
    skip: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["paths"] = [str(p) for p in self.paths]
        data["onnx_fp32"] = str(self.onnx_fp32) if self.onnx_fp32 else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Artifact:
        data = dict(data)
        data["paths"] = [Path(p) for p in data.get("paths", [])]
        data["onnx_fp32"] = Path(data["onnx_fp32"]) if data.get("onnx_fp32") else None
        return cls(**data)


def _missing(paths: list[Path], make: str) -> str | None:
    gone = [str(p) for p in paths if not p.is_file()]
    return f"skipped: {gone[0]} not found (run `make {make}`)" if gone else None


def _engine_precision(engine: Path) -> str | None:
    """The precision deploy.build_engine recorded in the engine's sidecar (int8 / fp16 / fp32)."""
    try:
        build = read_sidecar(engine).extra.get("tensorrt", {})
    except (OSError, ValueError, AttributeError):
        return None
    return build.get("precision") if isinstance(build, dict) else None


def discover(run_dir: Path, teachers: dict[str, Path], cuda: bool, ort_gpu: bool,
             tensorrt: bool) -> list[Artifact]:
    """Every artifact the benchmark reports on, in report order, with a skip reason where needed.

    teachers: teacher name -> its best.safetensors. cuda: torch sees a GPU (adds PyTorch FP16);
    ort_gpu: onnxruntime has a GPU provider (FP16 ONNX runs); tensorrt: `import tensorrt` works.
    """
    layout = RunLayout(run_dir)
    out: list[Artifact] = []

    def onnx_artifacts(model: str, role: str, flavours: tuple[str, ...]) -> None:
        fp32 = layout.onnx(model)
        for flavour in flavours:
            path = layout.onnx(model, flavour)
            skip = _missing([path], "export" if flavour == "fp32" else "compress")
            if flavour == "fp16" and not ort_gpu and skip is None:
                skip = "skipped: FP16 ONNX needs a GPU execution provider (onnxruntime-gpu); none here"
            out.append(Artifact(f"{model}.{flavour}", model, role, "onnx", flavour, [path], fp32, skip))

    paths = list(teachers.values())
    out.append(Artifact("ensemble.pytorch", "ensemble", "ensemble", "pytorch", "fp32", paths,
                        layout.onnx("ensemble"), _missing(paths, "teachers")))
    onnx_artifacts("ensemble", "ensemble", ("fp32",))
    for name, ckpt in teachers.items():
        out.append(Artifact(f"{name}.pytorch", name, "teacher", "pytorch", "fp32", [ckpt],
                            layout.onnx(name), _missing([ckpt], "teachers")))
        onnx_artifacts(name, "teacher", ("fp32",))
    engines = layout.engines()
    for role in STUDENT_ROLES:
        ckpt = layout.checkpoint(role)
        fp32 = layout.onnx(role)
        out.append(Artifact(f"{role}.pytorch", role, role, "pytorch", "fp32", [ckpt], fp32,
                            _missing([ckpt], "student")))
        if cuda:
            out.append(Artifact(f"{role}.pytorch-fp16", role, role, "pytorch", "fp16", [ckpt], fp32,
                                _missing([ckpt], "student")))
        onnx_artifacts(role, role, ONNX_FLAVOURS)
        mine = [e for e in engines if e.name.split(".")[0] == role]
        for engine in mine:
            stem = engine.name.removesuffix(".engine").removesuffix(".trt")
            precision = _engine_precision(engine) or next((f for f in ONNX_FLAVOURS if f".{f}" in stem), "fp32")
            skip = None if tensorrt else "skipped: tensorrt not installed (Jetson / NVIDIA GPU only)"
            out.append(Artifact(f"{stem}.engine", role, role, "tensorrt", precision, [engine], fp32, skip))
        if not mine:
            why = "no engine built (run `make engine`)" if tensorrt else "tensorrt not installed"
            out.append(Artifact(f"{role}.engine", role, role, "tensorrt", "int8-tensorrt", [], fp32,
                                f"skipped: {why}"))
    return out


# --- size, parameters and multiply-accumulates ----------------------------------------------------
def size_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def _fixed_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy whose graph inputs have batch `batch`, so shape inference gives concrete shapes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    return model


def _shape(value_info) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def onnx_graph_stats(path: Path) -> dict:
    """{"params", "macs", "uncounted"} of an ONNX graph at batch 1.

    params: elements of weight initializers (float or 8-bit; quantization scales/zero points and
    int64 shape constants excluded). macs: Conv = out elements x in_channels/group x kernel area;
    MatMul/Gemm = out elements x the reduced dimension; same for the quantized forms. `uncounted`
    lists counted-op nodes whose shapes could not be inferred (their MACs are missing from the sum).
    """
    model = shape_inference.infer_shapes(_fixed_batch(onnx.load(str(path))), data_prop=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = {vi.name: _shape(vi) for vi in [*graph.value_info, *graph.input, *graph.output]}
    shapes.update({name: list(t.dims) for name, t in inits.items()})
    qparams = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    weight_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                    onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    params = sum(int(np.prod(t.dims)) for name, t in inits.items()
                 if name not in qparams and t.data_type in weight_types and len(t.dims) >= 1)
    macs, uncounted = 0, []
    for node in graph.node:
        if node.op_type not in _CONV_OPS and node.op_type not in _MATMUL_OPS:
            continue
        out = shapes.get(node.output[0])
        if node.op_type in _CONV_OPS:
            w = shapes.get(node.input[_CONV_OPS[node.op_type]])
            if out is None or w is None:
                uncounted.append(node.name or node.op_type)
                continue
            macs += int(np.prod(out)) * int(np.prod(w[1:]))  # w: [C_out, C_in/group, kH, kW]
        else:
            a = shapes.get(node.input[0])
            if out is None or a is None:
                uncounted.append(node.name or node.op_type)
                continue
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if node.op_type == "Gemm" and trans_a else a[-1]
            macs += int(np.prod(out)) * int(k)
    return {"params": params, "macs": macs, "uncounted": uncounted}


# --- runners --------------------------------------------------------------------------------------
class Runner(ABC):
    """A loaded artifact: `run(batch)` maps float32 [N, 3, S, S] to outputs keyed by task name
    (float32 probabilities [N, C], int64 token ids [N, L]). `sync()` waits for the device."""

    tasks: list[TaskSpec]
    spec: PreprocessSpec
    vocab: Vocabulary | None
    info: dict
    params: int | None = None
    can_reopen: bool = False  # reopen() gives a new runtime session

    @abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of one preprocessed batch."""

    def sync(self) -> None:  # noqa: B027 - optional hook: most runners have nothing to wait for
        """Wait for queued device work (CUDA); a no-op on the CPU."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    def reopen(self) -> None:
        """Load the model into a new runtime session, the old one released (where `can_reopen`;
        benchmarks/interleave.py says why a timing round gets a fresh session)."""
        raise TypeError(f"{type(self).__name__} has no runtime session to reopen (can_reopen is False)")


class PredictorRunner(Runner):
    """ONNX Runtime or TensorRT through deploy.predictor.Predictor (contract checked on load)."""

    def __init__(self, path: Path, backend: str, threads: int | None, providers: list[str] | None):
        self._load = functools.partial(_predictor, path, backend, providers, threads)
        self.can_reopen = backend == "ort"  # a TensorRT engine takes seconds to deserialize: kept
        self.predictor = self._load()
        contract = self.predictor.contract
        self.tasks, self.spec, self.vocab = list(contract.tasks), contract.preprocessing, contract.vocabulary
        self.info = self.predictor.describe()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raw = self.predictor.predict_arrays(batch)
        out = {}
        for task in self.tasks:
            value = raw[task.output_name]
            out[task.name] = value.astype(np.float32) if task.kind == "classification" else value.astype(np.int64)
        return out

    def close(self) -> None:
        self.predictor.close()

    def reopen(self) -> None:
        if not self.can_reopen:
            super().reopen()
        self.predictor.close()
        self.predictor = self._load()


def _predictor(path: Path, backend: str, providers: list[str] | None, threads: int | None):
    from deploy.predictor import Predictor

    return Predictor(path, backend=backend, providers=providers if backend == "ort" else None,
                     threads=threads if backend == "ort" else None)


def open_artifact(artifact: Artifact, tasks: list[TaskSpec], vocab: Vocabulary | None, threads: int | None,
                  providers: list[str] | None = None, device: str = "cpu") -> Runner:
    """Load an artifact as a Runner; raises (ModelError, ContractError, CheckpointError...) when it cannot."""
    if artifact.skip:
        raise RuntimeError(f"{artifact.name} is not runnable here: {artifact.skip}")
    if artifact.format == "onnx":
        return PredictorRunner(artifact.paths[0], "ort", threads, providers)
    if artifact.format == "tensorrt":
        return PredictorRunner(artifact.paths[0], "tensorrt", threads, None)
    return TorchRunner(artifact, tasks, vocab, threads, device)


class TorchRunner(Runner):
    """A PyTorch checkpoint (or the teacher ensemble) under `torch.inference_mode`.

    CPU: FP32 with `torch.set_num_threads(threads)`. CUDA: precision "fp16" runs the model in half
    precision with channels_last memory format and replays a CUDA graph at batch 1 (launch overhead
    dominates single images); `sync()` synchronizes so timings cover the GPU work.
    """

    def __init__(self, artifact: Artifact, tasks: list[TaskSpec], vocab: Vocabulary | None,
                 threads: int | None, device: str = "cpu"):
        import torch

        from train.ensemble import TeacherEnsemble, attach_stored_combination
        from train.models.multitask import ExportModel
        from train.models.saved import load_model

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device if torch.cuda.is_available() or device == "cpu" else "cpu")
        self.half = artifact.precision == "fp16" and self.device.type == "cuda"
        models, metas = zip(*(load_model(p) for p in artifact.paths))
        if "preprocessing" not in metas[0]:
            raise ValueError(f"{artifact.paths[0]}: checkpoint meta has no 'preprocessing'; re-train or re-save it")
        self.spec = PreprocessSpec.from_dict(metas[0]["preprocessing"])
        if artifact.role == "ensemble":
            # The ensemble as the student saw it: calibration/weights stored in its run's ensemble/.
            run_dir = RunLayout.of_teacher_checkpoint(artifact.paths[0]).root
            module = attach_stored_combination(TeacherEnsemble(list(models), tasks), run_dir, list(artifact.paths))
            self.tasks = list(module.tasks)
        else:
            module = ExportModel(models[0])
            self.tasks = list(models[0].tasks)
        self.vocab = vocab
        self.params = sum(p.numel() for p in module.parameters())
        self.dtype = torch.float16 if self.half else torch.float32
        fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.module = module.to(self.device, dtype=self.dtype, memory_format=fmt).eval()
        self.fmt = fmt
        self.graph = None  # (CUDAGraph, static input, static outputs) for batch 1 on CUDA
        self.info = {"backend": "pytorch", "torch": torch.__version__, "device": str(self.device),
                     "threads": torch.get_num_threads(), "dtype": str(self.dtype).replace("torch.", ""),
                     "channels_last": fmt is torch.channels_last, "cuda_graph_batch1": False}

    def _forward(self, x):
        out = self.module(x)
        names = [t.name for t in self.tasks]
        return out if isinstance(out, dict) else dict(zip(names, out))

    def _capture(self, size: int) -> None:
        """Record the batch-1 forward pass as a CUDA graph (warm-up on a side stream first, per the
        torch.cuda.graphs documentation)."""
        torch = self.torch
        static_in = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype).to(memory_format=self.fmt)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                self._forward(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self._forward(static_in)
        self.graph = (graph, static_in, static_out)
        self.info["cuda_graph_batch1"] = True

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        x = x.to(self.device, dtype=self.dtype).to(memory_format=self.fmt)
        if self.device.type == "cuda" and len(x) == 1:
            if self.graph is None:
                self._capture(x.shape[-1])
            graph, static_in, out = self.graph
            static_in.copy_(x)
            graph.replay()
        else:
            with torch.inference_mode():
                out = self._forward(x)
        return {k: (v.float() if v.is_floating_point() else v.long()).cpu().numpy() for k, v in out.items()}

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.module = self.graph = None

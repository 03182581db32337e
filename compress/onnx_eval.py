"""Run an ONNX model over a split of the dataset and score it with the training metric code.

Export verification, the INT8 accuracy guard and the benchmarks all evaluate ONNX files through this
module: the images come from train.data (the deployed preprocessing), the numbers from train.metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from torch.utils.data import DataLoader

from deploy.contract import Contract, TaskSpec, sidecar_path
from deploy.runtime import quiet_onnxruntime
from train.data.torch_data import FundusImages
from train.evaluate import score_outputs

# Where each artifact of a run lives (compress writes, benchmarks reads).
ONNX_DIR = "onnx"
FLAVOURS = ("fp32", "fp16", "int8-cpu", "int8-tensorrt")
quiet_onnxruntime()  # before quantize/export/bench create sessions (also those inside ORT's quantization tools)


def onnx_path(run_dir: Path, model: str, flavour: str = "fp32") -> Path:
    """runs/<name>/onnx/<model>.onnx for FP32, <model>.<flavour>.onnx otherwise."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    suffix = "" if flavour == "fp32" else f".{flavour}"
    return Path(run_dir) / ONNX_DIR / f"{model}{suffix}.onnx"


def make_session(path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = quiet_onnxruntime()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def image_batches(data: FundusImages, batch_size: int = 64, limit: int | None = None):
    """Preprocessed float32 image batches of `data` in order (at most `limit` images)."""
    n = len(data) if limit is None else min(limit, len(data))
    loader = DataLoader(range(n), batch_size=batch_size, shuffle=False)
    for idx in loader:
        yield np.stack([data[int(i)]["image"].numpy() for i in idx])


def run_onnx(session: ort.InferenceSession, data: FundusImages, batch_size: int = 64,
             limit: int | None = None) -> dict[str, np.ndarray]:
    """Outputs of the model for every image, keyed by task name (output `<task>_probs|_tokens`)."""
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in image_batches(data, batch_size, limit):
        for name, value in zip(names, session.run(names, {input_name: batch})):
            parts[name].append(value)
    return {n.rsplit("_", 1)[0]: np.concatenate(v) for n, v in parts.items()}


def evaluate_onnx(path: str | Path, data: FundusImages, tasks: list[TaskSpec], threads: int | None = None,
                  batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict]:
    """(outputs, metrics per task) of an ONNX model on `data`."""
    outputs = run_onnx(make_session(path, threads), data, batch_size)
    outputs = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in outputs.items()}
    return outputs, score_outputs(outputs, data, tasks, data.dataset.vocabulary)


def load_contract(path: str | Path) -> Contract:
    return Contract.load(sidecar_path(path))

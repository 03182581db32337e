"""Run an ONNX model over a split of the dataset and score it with the training metric code.

Export verification, the INT8 accuracy guard and the benchmarks all evaluate ONNX files through this
module: the images come from train.data (the deployed preprocessing), the session from the device's
own runtime (deploy.runtime.OrtBackend, on the CPU provider), the numbers from train.metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from deploy.contract import TaskSpec
from deploy.runtime import OrtBackend, quiet_onnxruntime
from train.datasets import FundusImages
from train.evaluate import score_outputs

quiet_onnxruntime()  # before quantize/export/bench create sessions (also those inside ORT's quantization tools)


def open_onnx(path: str | Path, threads: int | None = None, providers: list[str] | None = None) -> OrtBackend:
    """The model in the deploy runtime's ONNX Runtime backend (CPU unless `providers` say otherwise), so
    the guard, the export check and the device score through one session setup."""
    return OrtBackend(path, providers=providers or ["CPUExecutionProvider"], threads=threads or None)


def image_batches(data: FundusImages, batch_size: int = 64, limit: int | None = None):
    """Preprocessed float32 image batches of `data` in order (at most `limit` images)."""
    n = len(data) if limit is None else min(limit, len(data))
    loader = DataLoader(range(n), batch_size=batch_size, shuffle=False)
    for idx in loader:
        yield np.stack([data[int(i)]["image"].numpy() for i in idx])


def run_onnx(backend: OrtBackend, data: FundusImages, batch_size: int = 64,
             limit: int | None = None) -> dict[str, np.ndarray]:
    """Outputs of the model for every image, keyed by task name (output `<task>_probs|_tokens`)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in backend.output_shapes}
    for batch in image_batches(data, batch_size, limit):
        for name, value in backend.run(batch).items():
            parts[name].append(value)
    return {n.rsplit("_", 1)[0]: np.concatenate(v) for n, v in parts.items()}


def evaluate_onnx(path: str | Path, data: FundusImages, tasks: list[TaskSpec], threads: int | None = None,
                  batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict]:
    """(outputs, metrics per task) of an ONNX model on `data`."""
    outputs = run_onnx(open_onnx(path, threads), data, batch_size)
    outputs = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in outputs.items()}
    return outputs, score_outputs(outputs, data, tasks, data.dataset.vocabulary)

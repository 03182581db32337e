"""Predictor: image files in, diagnoses out, for any model file that has a deployment contract.

    from deploy.predictor import Predictor
    with Predictor("runs/default/onnx/student.onnx") as predictor:
        for p in predictor.predict(["a.jpg", "b.png"]):
            print(p.to_dict())

One bad image never stops a batch: its Prediction carries `error` (naming the file and the fix) and
the other images are still predicted. "Wrong kind" of image means, here: a file that is not an image
Pillow can decode fully (text, PDF, truncated or corrupt files), an image with a side shorter than
MIN_SIDE pixels (icons, thumbnails) or an aspect ratio beyond MAX_ASPECT (banners, scanned strips;
fundus cameras give 1:1 to 3:2). Any colour mode is accepted and converted to RGB (grayscale, RGBA,
palette, 16-bit). Whether the picture shows a retina is NOT checked: a photo of a cat gets a diagnosis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy.backend import Backend, check_model_file
from deploy.contract import Contract, TaskSpec, read_metadata
from deploy.preprocess import ImageError, load_image, preprocess_image
from deploy.runtime import backend_kind, open_backend, resolve_contract, verify_backend
from deploy.vocab import Vocabulary

MIN_SIDE = 32
MAX_ASPECT = 4.0
TOP_K = 5


@dataclass
class ClassResult:
    """One classification task's answer for one image."""

    label: str
    probability: float
    probabilities: dict[str, float]
    top5: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"label": self.label, "probability": self.probability, "probabilities": dict(self.probabilities),
                "top5": [[c, p] for c, p in self.top5]}


@dataclass
class TextResult:
    """One text task's generated sentence for one image."""

    text: str

    def to_dict(self) -> dict:
        return {"text": self.text}


@dataclass
class Prediction:
    """Everything predicted for one image file; `error` is set (and `tasks` empty) when it failed."""

    path: str
    tasks: dict[str, ClassResult | TextResult] = field(default_factory=dict)
    timing_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """JSON-friendly nested dict: {path, tasks: {name: {...}}, timing_ms, error}."""
        return {"path": self.path, "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
                "timing_ms": dict(self.timing_ms), "error": self.error}

    def flat_dict(self, contract: Contract) -> dict[str, object]:
        """One flat row with a fixed set of columns for `contract` (CSV logs); empty cells on error."""
        row: dict[str, object] = {"path": self.path, "error": self.error or ""}
        for task in contract.tasks:
            result = self.tasks.get(task.name)
            if task.kind == "classification":
                ok = isinstance(result, ClassResult)
                row[f"{task.name}_label"] = result.label if ok else ""
                row[f"{task.name}_probability"] = round(result.probability, 6) if ok else ""
                row[f"{task.name}_top5"] = "; ".join(f"{c}:{p:.4f}" for c, p in result.top5) if ok else ""
            else:
                row[f"{task.name}_text"] = result.text if isinstance(result, TextResult) else ""
        for stage in ("preprocess", "inference", "postprocess"):
            row[f"{stage}_ms"] = self.timing_ms.get(stage, "")
        return row


def check_image_kind(img, path: str | Path) -> None:
    """Raise ImageError for images that cannot be fundus photographs by their geometry (see module doc)."""
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{path}: image is {w}x{h} pixels, smaller than {MIN_SIDE} px on a side; this is not a "
                         "fundus photograph (a thumbnail or icon?): use the camera's full-size export")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageError(f"{path}: image is {w}x{h} pixels (aspect ratio above {MAX_ASPECT:g}:1); this is not a "
                         "fundus photograph: use the camera's image, not a strip or a report page")


def _class_result(task: TaskSpec, probs: np.ndarray) -> ClassResult:
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    best = int(order[0])
    return ClassResult(
        label=task.classes[best],
        probability=float(probs[best]),
        probabilities={c: float(p) for c, p in zip(task.classes, probs)},
        top5=[(task.classes[int(i)], float(probs[int(i)])) for i in order[:TOP_K]],
    )


def decode_row(outputs: dict[str, np.ndarray], row: int, tasks: list[TaskSpec],
               vocabulary: Vocabulary | None) -> dict[str, ClassResult | TextResult]:
    """The device's post-processing of one image (`row`) of a model's outputs, keyed by output name
    (`TaskSpec.output_name`): label, probabilities and top-5 per classification task, the sentence per
    text task. The benchmarks time this very function."""
    results: dict[str, ClassResult | TextResult] = {}
    for task in tasks:
        value = outputs[task.output_name][row]
        if task.kind == "classification":
            results[task.name] = _class_result(task, value)
        else:
            results[task.name] = TextResult(vocabulary.decode(value.astype(np.int64).tolist()) if vocabulary else "")
    return results


class Predictor:
    """A model file plus its contract: loads, verifies, preprocesses, runs and decodes.

    backend: "auto" (by suffix: .onnx -> onnxruntime, .engine -> TensorRT), "ort" or "tensorrt";
    providers/threads apply to onnxruntime.
    """

    def __init__(self, model_path: str | Path, backend: str = "auto", providers: list[str] | None = None,
                 threads: int | None = None):
        self.model_path = check_model_file(model_path)
        # Engines carry no metadata: read the sidecar first so a foreign engine is refused up front.
        kind = backend_kind(self.model_path, backend)
        engine_contract = resolve_contract(self.model_path, None) if kind == "tensorrt" else None
        self.backend: Backend = open_backend(self.model_path, backend, providers, threads, engine_contract)
        try:
            metadata = getattr(self.backend, "metadata", None)
            embedded = read_metadata(metadata, str(self.model_path)) if metadata is not None else None
            self.contract: Contract = engine_contract or resolve_contract(self.model_path, embedded)
            verify_backend(self.backend, self.contract, str(self.model_path))
        except BaseException:
            self.backend.close()
            raise
        self.spec = self.contract.preprocessing
        # Never send more than the model can take (TensorRT profiles have a max batch).
        self.max_batch = self.backend.max_batch

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    def describe(self) -> dict:
        """Model, contract and backend facts (JSON-friendly)."""
        return {"model": str(self.model_path), "model_name": self.contract.model_name,
                "model_version": self.contract.model_version, **self.backend.describe()}

    def predict_arrays(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs (contract order) for a preprocessed float32 batch [N, 3, S, S]; splits big batches."""
        batch = np.asarray(batch, dtype=np.float32)
        size = self.spec.size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or len(batch) == 0:
            raise ValueError(f"batch must be [N, 3, {size}, {size}] float32 with N >= 1, got {list(batch.shape)}")
        step = self.max_batch or max(len(batch), 1)
        parts = [self.backend.run(batch[i:i + step]) for i in range(0, len(batch), step)]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.contract.output_names}

    def _load(self, path: Path) -> np.ndarray:
        img = load_image(path)
        check_image_kind(img, path)
        return preprocess_image(img, self.spec)

    def predict(self, paths: list[str | Path], batch_size: int = 8) -> list[Prediction]:
        """Predictions for image files, in the order given; bad files get `error` set."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.max_batch:
            batch_size = min(batch_size, self.max_batch)
        predictions: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            predictions.extend(self._predict_batch([Path(p) for p in paths[start:start + batch_size]]))
        return predictions

    def _predict_batch(self, paths: list[Path]) -> list[Prediction]:
        predictions = [Prediction(path=str(p)) for p in paths]
        arrays, good = [], []
        for pred, path in zip(predictions, paths):
            t0 = time.perf_counter()
            try:
                arrays.append(self._load(path))
                good.append(pred)
            except ImageError as exc:
                pred.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
                pred.error = f"{path}: could not be read ({type(exc).__name__}: {exc}); check or re-export it"
            pred.timing_ms["preprocess"] = (time.perf_counter() - t0) * 1e3
        if good:
            t0 = time.perf_counter()
            outputs = self.predict_arrays(np.stack(arrays))
            per_image = (time.perf_counter() - t0) * 1e3 / len(good)  # batch time shared by its images
            for row, pred in enumerate(good):
                t0 = time.perf_counter()
                pred.tasks = decode_row(outputs, row, self.contract.tasks, self.contract.vocabulary)
                pred.timing_ms["inference"] = per_image
                pred.timing_ms["postprocess"] = (time.perf_counter() - t0) * 1e3
        for pred in predictions:
            pred.timing_ms = {k: round(v, 3) for k, v in pred.timing_ms.items()}
        return predictions

"""Accuracy of an artifact on the test split, its agreement with the teacher ensemble, and floors.

The images are the test split's, prepared once per preprocessing spec with deploy.preprocess (the
code the device runs); the numbers come from train.evaluate.score_outputs / train.metrics (the code
training reports with), so a benchmark accuracy and a training accuracy are the same quantity.

Floors: `ARTIFACT:METRIC=VALUE`, e.g. `student.int8-cpu:coarse/accuracy=80` (percent); ARTIFACT may be a glob
(`student.*`), METRIC is a headline key (`coarse/accuracy`, `fine/top5`, `diagnosis/bleu`, `coarse/ece`
is a ceiling: lower is better). An artifact below a floor is "exported but below its accuracy floor";
a floor that names no measured artifact fails too (nothing was checked).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from deploy.contract import TaskSpec
from deploy.preprocess import PreprocessSpec
from deploy.vocab import Vocabulary
from train.datasets import FundusImages
from train.evaluate import score_outputs
from train.floors import Floor, floor_violations, parse_floor, unmatched_floors  # noqa: F401 (re-exported)
from train.metrics import LOWER_IS_BETTER, agreement, headline  # noqa: F401 (re-exported)
from train.stage import Splits, image_set

CACHE_MB = 512  # preprocessed test images kept in memory up to this size


def sample_rows(rows: list, limit: int | None, seed: int) -> list:
    """All rows, or a seeded random sample of `limit` of them in manifest order. Never the first rows:
    manifests are often in patient or class order, so a head is not a sample of the split."""
    if not limit or limit >= len(rows):
        return list(rows)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
    return [rows[i] for i in keep]


class TestImages:
    """The test split (or a seeded random sample of `limit` rows), preprocessed with each model's spec."""

    def __init__(self, splits: Splits, limit: int | None = None, seed: int = 0):
        self.splits = splits
        self.rows = sample_rows(list(splits.test), limit, seed)
        self.tasks: list[TaskSpec] = list(splits.data.spec.tasks)
        self.vocab: Vocabulary | None = splits.data.vocabulary
        self._data: dict[PreprocessSpec, FundusImages] = {}
        self._arrays: dict[PreprocessSpec, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def data(self, spec: PreprocessSpec) -> FundusImages:
        if spec not in self._data:
            self._data[spec] = image_set(self.splits, self.rows, self.tasks, spec)
        return self._data[spec]

    def _image(self, spec: PreprocessSpec, i: int) -> np.ndarray:
        return self.data(spec)[i]["image"].numpy()

    def batches(self, spec: PreprocessSpec, batch_size: int) -> Iterator[np.ndarray]:
        """Float32 [B, 3, S, S] batches of the whole split, in order. Kept in memory after the first
        pass when the split fits CACHE_MB (200 images at 96 px: 22 MB), else prepared on every pass."""
        n, size = len(self.rows), spec.size
        if spec in self._arrays or n * 3 * size * size * 4 <= CACHE_MB * 2**20:
            if spec not in self._arrays:
                self._arrays[spec] = np.stack([self._image(spec, i) for i in range(n)])
            arrays = self._arrays[spec]
            yield from (arrays[i:i + batch_size] for i in range(0, n, batch_size))
            return
        for start in range(0, n, batch_size):
            yield np.stack([self._image(spec, i) for i in range(start, min(start + batch_size, n))])

    def head(self, spec: PreprocessSpec, n: int) -> np.ndarray:
        """The first `n` images (cycled when the split is smaller) as one contiguous batch."""
        idx = [i % len(self.rows) for i in range(n)]
        if spec in self._arrays:
            return np.ascontiguousarray(self._arrays[spec][idx])
        return np.stack([self._image(spec, i) for i in idx])

    def paths(self) -> list[str]:
        return [str(self.splits.data.image_path(r)) for r in self.rows]


def predict_all(run, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `run(batch)` for every batch, concatenated in order."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for name, value in run(batch).items():
            parts.setdefault(name, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def score(outputs: dict[str, np.ndarray], test: TestImages, spec: PreprocessSpec,
          tasks: Sequence[TaskSpec]) -> dict:
    """Full metrics per task (train.evaluate.score_outputs) of outputs over `test`."""
    return score_outputs(outputs, test.data(spec), list(tasks), test.vocab)


def summarize(metrics: dict, tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """Headline numbers (accuracy, macro-F1, top-1/5, BLEU, exact match) plus `<task>/ece`."""
    flat = headline(metrics, tasks)
    for task in tasks:
        ece = metrics.get(task.name, {}).get("ece")
        if task.kind == "classification" and ece is not None:
            flat[f"{task.name}/ece"] = float(ece)
    return flat


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], tasks: Sequence[TaskSpec],
            vocab: Vocabulary | None) -> dict[str, float]:
    """Agreement with the reference model on the same images, flat: `<task>/top1_agreement`,
    `<task>/mean_kl` (KL(reference || artifact)), `<task>/sequence_agreement` for text."""
    shared = [t for t in tasks if t.name in outputs and t.name in reference]
    flat: dict[str, float] = {}
    for task, values in agreement(outputs, reference, shared, vocab).items():
        for key in ("top1_agreement", "mean_kl", "sequence_agreement"):
            if values.get(key) is not None:
                flat[f"{task}/{key}"] = float(values[key])
    return flat


def retention(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """metric / reference metric for every shared higher-is-better headline key."""
    out = {}
    for key, value in metrics.items():
        ref = reference.get(key)
        if ref and not key.endswith(LOWER_IS_BETTER):
            out[key] = value / ref
    return out

"""Refuse models trained for another version of the dataset, or on other pixels (stale inputs).

A model's class i is output i: if dataset.yaml's class order, task list or vocabulary changed after a
teacher was trained, distilling, exporting or benchmarking it would silently mislabel every prediction.
Training records `dataset_fingerprint` in every checkpoint's config (so a changed dataset also changes the
run fingerprint); the later stages call `check_checkpoint` / `check_tasks` before using a model.
Likewise a model fed another size or normalisation than it was trained with (teachers.mean changed after
the teachers trained) degrades silently: `check_preprocessing` refuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deploy.contract import TaskSpec
from deploy.preprocess import PreprocessSpec
from deploy.vocab import Vocabulary
from train.checkpoint import load_checkpoint
from train.config import ConfigError
from train.data.manifest import Dataset, DatasetError


def vocabulary_sha256(vocab: Vocabulary | None) -> str | None:
    if vocab is None:
        return None
    return hashlib.sha256(json.dumps(vocab.to_dict(), sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(data: Dataset) -> dict:
    """What a trained model depends on: the tasks with their ordered classes, and the vocabulary. A task's
    `normal` class only changes what the reports compute, so declaring it later retrains nothing."""
    tasks = [{k: v for k, v in t.to_dict().items() if k != "normal"} for t in data.spec.tasks]
    return {"tasks": tasks, "vocabulary_sha256": vocabulary_sha256(data.vocabulary)}


def check_tasks(where: str | Path, model_tasks: list[TaskSpec], data: Dataset,
                vocab_sha256: str | None = None) -> None:
    """DatasetError naming `where` and the fix unless every task of the model is the dataset's, with the
    same kind and class order, and (when known) the same vocabulary."""
    spec_file = data.root / "dataset.yaml"
    fix = (f"retrain it (delete {Path(where).parent} or use another name=...), or point data.root at the "
           "dataset it was trained on")
    for task in model_tasks:
        if task.name not in data.spec.task_names:
            raise DatasetError(f"{where}: trained for task {task.name!r}, which {spec_file} does not have "
                               f"(tasks: {data.spec.task_names}); {fix}")
        current = data.spec.task(task.name)
        if (current.kind, current.classes, current.ordinal) != (task.kind, task.classes, task.ordinal):
            raise DatasetError(f"{where}: task {task.name!r} was trained with classes {list(task.classes)}, but "
                               f"{spec_file} now lists {list(current.classes)} (output i is class i, so the order "
                               f"matters); {fix}")
    has_text = any(t.kind == "text" for t in model_tasks)
    if has_text and vocab_sha256 is not None and vocab_sha256 != vocabulary_sha256(data.vocabulary):
        raise DatasetError(f"{where}: trained with another vocabulary than {data.root / data.spec.vocabulary}; {fix}")


def check_checkpoint(path: Path, data: Dataset) -> None:
    """`check_tasks` for a checkpoint written by train.models.saved.save_model."""
    _, meta = load_checkpoint(path)
    tasks = [TaskSpec.from_dict(t) for t in meta.get("model", {}).get("tasks", [])]
    recorded = meta.get("config", {}).get("dataset", {}).get("vocabulary_sha256")
    check_tasks(path, tasks, data, recorded)


def check_preprocessing(path: Path, spec: PreprocessSpec) -> None:
    """ConfigError unless the checkpoint at `path` (if there is one) was trained on `spec`'s pixels."""
    if not Path(path).exists():
        return
    _, meta = load_checkpoint(path)
    if "preprocessing" not in meta:  # written before checkpoints recorded it
        return
    trained = PreprocessSpec.from_dict(meta["preprocessing"])
    if trained != spec:
        changed = {k: (v, getattr(spec, k)) for k, v in trained.to_dict().items() if v != getattr(spec, k)}
        raise ConfigError(f"{path}: trained with other preprocessing than the config now gives "
                           f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); retrain it "
                           f"(delete {Path(path).parent} or use another name=...), or restore the config's "
                           f"image_size/mean/std")

"""What every training stage does the same way: load and check the dataset, build datasets and
models, write the final evaluation. Used by train.teachers, train.student, compress and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deploy.contract import Contract, TaskSpec
from deploy.fileio import atomic_write_text
from deploy.labelled import derive_hierarchy
from deploy.preprocess import PreprocessSpec
from train.config import save_config
from train.data.manifest import Dataset, DatasetError, load_dataset, write_manifest
from train.data.splits import label_fraction
from train.data.validate import check_dataset
from train.datasets import FundusImages
from train.distributed import DistInfo, barrier, broadcast_object
from train.evaluate import collect_outputs, model_predict, score_outputs, selection_score
from train.experiment import AugmentConfig, ExperimentConfig
from train.layout import FINAL, RESOLVED_CONFIG
from train.losses import class_balance_weights
from train.metrics import headline
from train.models.multitask import ModelConfig, MultiTaskNet
from train.preflight import check_experiment


@dataclass
class Splits:
    """The datasets a stage trains and evaluates on."""

    data: Dataset
    train: list
    val: list
    test: list
    unlabeled: list


def _fraction_manifest(cfg: ExperimentConfig, data: Dataset, stratify: str, info: DistInfo) -> str:
    """Write (rank 0, atomically) the label-fraction manifest next to the original; return its name."""
    pct = round(cfg.data.label_fraction * 100)
    name = f"manifest.frac{pct:03d}.seed{cfg.seed}.csv"
    if info.is_main:
        rows = label_fraction(data.rows, cfg.data.label_fraction, stratify, seed=cfg.seed)
        write_manifest(data.root / name, rows, data.spec.task_names)
    barrier(info)
    return name


def _validated(data: Dataset, info: DistInfo) -> None:
    """Refuse an invalid dataset. The result is remembered per manifest content, so stages re-check fast."""
    digest = hashlib.sha256(data.manifest_path.read_bytes()).hexdigest()[:16]
    stamp = data.root / f".validated-{data.manifest_path.stem}-{digest}"
    error = None
    if info.is_main and not stamp.exists():
        try:
            check_dataset(data.root, manifest=data.spec.manifest)  # names every bad row and the fix
            stamp.touch()
        except DatasetError as exc:
            error = str(exc)
    error = broadcast_object(error, info)  # every rank stops with the same message
    if error:
        raise DatasetError(error)


def load_splits(cfg: ExperimentConfig, info: DistInfo | None = None) -> Splits:
    """The experiment's dataset (label fraction applied), validated, split into row lists."""
    info = info or DistInfo()
    data = load_dataset(cfg.data.root, manifest=cfg.data.manifest)
    check_experiment(cfg, data.spec, f"config (data.root={cfg.data.root})")  # before any stage trains
    stratify = cfg.data.stratify_task or next(t.name for t in data.spec.tasks if t.kind == "classification")
    if cfg.data.label_fraction is not None and cfg.data.label_fraction < 1:
        data = load_dataset(cfg.data.root, manifest=_fraction_manifest(cfg, data, stratify, info))
    if cfg.data.validate:
        _validated(data, info)
    splits = Splits(data, data.split("train"), data.split("val"), data.split("test"), data.split("unlabeled"))
    for name in ("train", "val", "test"):
        if not getattr(splits, name):
            raise DatasetError(f"{data.manifest_path}: the {name} split is empty; re-split the dataset")
    return splits


def image_set(splits: Splits, rows: list, tasks: list[TaskSpec], spec: PreprocessSpec,
              augment: AugmentConfig | None = None) -> FundusImages:
    return FundusImages(splits.data, rows, tasks, spec, augment)


def class_weights(data: FundusImages, tasks: list[TaskSpec], mode: str) -> dict[str, torch.Tensor | None]:
    """CE class weights (TrainConfig.class_balance) of each classification task from `data`'s labels."""
    return {t.name: class_balance_weights(np.asarray(data.targets[t.name]), t.num_classes, mode)
            for t in tasks if t.kind == "classification"}


def build_model(model_cfg: ModelConfig, data: Dataset, task_names: list[str]) -> MultiTaskNet:
    tasks = [data.spec.task(n) for n in task_names]
    vocab = data.vocabulary
    return MultiTaskNet(model_cfg, tasks, vocab_size=len(vocab) if vocab else None,
                        max_len=vocab.max_len if vocab else 1)


def model_contract(name: str, version: str, data: Dataset, tasks: list[TaskSpec], spec: PreprocessSpec) -> Contract:
    """The deployment contract; `extra.hierarchy` (fine class -> coarse class, where the dataset's tasks
    nest) lets a device flag heads that contradict each other (deploy/labelled.py)."""
    needs_vocab = any(t.kind == "text" for t in tasks)
    hierarchy = derive_hierarchy(tasks, [r.labels for r in data.rows if r.split != "unlabeled"], data.spec.extra)
    return Contract(model_name=name, model_version=version, tasks=tasks, preprocessing=spec,
                    vocabulary=data.vocabulary if needs_vocab else None,
                    extra={"hierarchy": hierarchy} if hierarchy else {})


def evaluate_model(model: torch.nn.Module, data: FundusImages, tasks: list[TaskSpec], device: torch.device,
                   batch_size: int, info: DistInfo | None = None, select: str = "auto") -> tuple[float, dict]:
    """(selection score, full metrics per task) of a model on a split."""
    _, metrics = evaluate_outputs(model, data, tasks, device, batch_size, info)
    return selection_score(metrics, data.tasks, select), metrics


def evaluate_outputs(model: torch.nn.Module, data: FundusImages, tasks: list[TaskSpec], device: torch.device,
                     batch_size: int, info: DistInfo | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(per-image outputs, full metrics per task) of a model on a split; the outputs serve the summary's
    intervals and clinical numbers without a second pass."""
    outputs = collect_outputs(model_predict(model), data, device, batch_size, info)
    return outputs, score_outputs(outputs, data, tasks, data.dataset.vocabulary)


def flat_headline(metrics: dict, tasks: list[TaskSpec]) -> dict[str, float]:
    return {f"val/{k}": v for k, v in headline(metrics, tasks).items()}


def write_final(out_dir: Path, name: str, metrics: dict, tasks: list[TaskSpec], extra: dict | None = None) -> Path:
    """The final test evaluation of one model (JSON): headline numbers first, then everything."""
    record = {"model": name, "split": "test", "headline": headline(metrics, tasks), "metrics": metrics,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    return atomic_write_text(out_dir / FINAL, json.dumps(record, indent=1))


def save_resolved(cfg: ExperimentConfig, out_dir: Path) -> None:
    save_config(cfg, out_dir / RESOLVED_CONFIG)

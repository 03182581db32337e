"""The student's training images: the labelled split plus the unlabelled pool it distils on.

The pool is the dataset's own `unlabeled` split and, optionally, folders of photographs named in the
config (`student.kd.unlabeled_pools`): another camera's export, a public set, anything unlabelled. A
referenced pool joins at load time and touches neither the dataset folder nor the teachers (they train
on labelled images only), so trying another pool retrains only the student. `student.kd.own_unlabeled:
false` leaves the dataset's own pool out (to compare pools of the same size).
"""

from __future__ import annotations

from pathlib import Path

from train.data.adapters.generic import read_unlabeled
from train.data.manifest import Row
from train.experiment import ExperimentConfig
from train.stage import Splits


def pool_rows(folder: str | Path) -> list[Row]:
    """Every image below `folder` as an unlabelled row with an absolute path (DatasetError if none)."""
    adapted = read_unlabeled(Path(folder).expanduser().resolve(), name=Path(folder).name)
    return [Row(path=str(s.source), patient_id=f"pool:{folder}/{s.patient_id}", eye=s.eye, split="unlabeled")
            for s in adapted.samples]


def unlabelled_pool(cfg: ExperimentConfig, splits: Splits) -> list[Row]:
    """The unlabelled images the KD student learns from (none when kd.use_unlabeled is off)."""
    kd = cfg.student.kd
    if not kd.use_unlabeled:
        return []
    own = list(splits.unlabeled) if kd.own_unlabeled else []
    return own + [row for folder in kd.unlabeled_pools for row in pool_rows(folder)]


def student_rows(cfg: ExperimentConfig, splits: Splits) -> list[Row]:
    """Labelled training rows, then the unlabelled pool: the student's training set, in that order."""
    return splits.train + unlabelled_pool(cfg, splits)

"""The student's epoch plan and optimizer-step budgets: how many steps a run will take, and the
teachers' budget policy.

A teacher that gets fewer optimizer steps than the student it teaches is usually the weaker model, and
distilling it pulls the student down. `teachers.budget_multiple: m` gives every teacher at least
m x the student's optimizer steps (through `train.min_steps`, which adds epochs); null keeps the
configured schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from train.experiment import ExperimentConfig, TrainConfig, role_preprocessing
from train.loop import EpochPlan
from train.pool import student_rows
from train.stage import Splits, image_set


def mixed_epoch(lab_idx: np.ndarray, unl_idx: np.ndarray, share: float, seed: int, epoch: int) -> np.ndarray:
    """One joint epoch of len(lab_idx) + len(unl_idx) items of which `share` are labelled: the labelled
    images tiled (each shown equally often), the unlabelled ones a fresh sample each epoch."""
    size = len(lab_idx) + len(unl_idx)
    n_lab = max(len(lab_idx), round(share * size))  # never fewer labelled items than the natural mix
    rng = np.random.default_rng([seed, epoch])
    lab = np.concatenate([np.tile(lab_idx, n_lab // len(lab_idx)),
                          rng.choice(lab_idx, n_lab % len(lab_idx), replace=False)])
    unl = rng.choice(unl_idx, size - n_lab, replace=False)
    return np.concatenate([lab, unl])


def student_plan(cfg: ExperimentConfig, labelled: np.ndarray):
    """Epoch -> (items, mode). joint: every image every epoch; staged: the paper's three stages."""
    lab_idx, unl_idx, all_idx = np.flatnonzero(labelled), np.flatnonzero(~labelled), np.arange(len(labelled))
    kd = cfg.student.kd
    if kd.schedule == "joint":
        if not kd.use_unlabeled or len(unl_idx) == 0:
            return lambda epoch: EpochPlan(lab_idx, "joint")
        if kd.labelled_share is None:
            return lambda epoch: EpochPlan(all_idx, "joint")
        return lambda epoch: EpochPlan(mixed_epoch(lab_idx, unl_idx, kd.labelled_share, cfg.seed, epoch), "joint")
    s1, s2, _ = kd.stage_epochs

    def plan(epoch: int) -> EpochPlan:
        if epoch < s1:
            return EpochPlan(lab_idx, "labels")
        if epoch < s1 + s2 or not kd.use_unlabeled or len(unl_idx) == 0:
            return EpochPlan(lab_idx, "labels+kd")
        return EpochPlan(unl_idx, "unlabeled-kd")

    return plan


def schedule_steps(plan: Callable, tcfg: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps of a run with this epoch plan and schedule: the rule of train.loop.Trainer
    (ceil over ranks and batches, `max_steps_per_epoch` caps an epoch, `min_steps` adds epochs)."""

    def per_epoch(epoch: int) -> int:
        steps = math.ceil(math.ceil(len(plan(epoch).indices) / world_size) / tcfg.batch_size)
        return min(steps, tcfg.max_steps_per_epoch) if tcfg.max_steps_per_epoch else steps

    epochs, steps = 0, 0
    while epochs < tcfg.epochs or steps < tcfg.min_steps:
        steps += per_epoch(epochs)
        epochs += 1
    return steps


def student_train_config(cfg: ExperimentConfig) -> TrainConfig:
    """The student's schedule: the staged schedule's epochs are the sum of its stages."""
    tcfg, kd = cfg.student.train, cfg.student.kd
    return dataclasses.replace(tcfg, epochs=sum(kd.stage_epochs)) if kd.schedule == "staged" else tcfg


def student_steps(cfg: ExperimentConfig, splits: Splits, world_size: int = 1) -> int:
    """Optimizer steps `make student` will spend on the KD student (no image is read)."""
    rows = student_rows(cfg, splits)
    data = image_set(splits, rows, splits.data.spec.tasks, role_preprocessing(cfg, "student"))
    return schedule_steps(student_plan(cfg, data.labelled), student_train_config(cfg), world_size)


def teacher_train_config(cfg: ExperimentConfig, splits: Splits, world_size: int = 1) -> TrainConfig:
    """The teachers' schedule under the budget policy: `min_steps` raised to budget_multiple x the
    student's steps (never lowered). Unchanged when teachers.budget_multiple is null."""
    tcfg, multiple = cfg.teachers.train, cfg.teachers.budget_multiple
    if multiple is None:
        return tcfg
    floor = math.ceil(multiple * student_steps(cfg, splits, world_size))
    return dataclasses.replace(tcfg, min_steps=max(tcfg.min_steps, floor))

"""Step budgets: the count matches the training loop's, and the teachers' budget policy."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_dataset, write_tiny_config

from train.budget import schedule_steps, student_plan, student_steps, teacher_train_config
from train.distributed import DistInfo
from train.experiment import load_experiment, role_preprocessing
from train.loop import Trainer
from train.stage import build_model, image_set, load_splits


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _trainer_steps(cfg, splits, world_size: int) -> int:
    """What train.loop.Trainer itself counts for the student's schedule (nothing is trained)."""
    rows = splits.train + splits.unlabeled
    data = image_set(splits, rows, splits.data.spec.tasks, role_preprocessing(cfg, "student"))
    model = build_model(cfg.student.model, splits.data, splits.data.spec.task_names)
    staged = cfg.student.kd.schedule == "staged"  # the paper's schedule runs the sum of its stages' epochs
    tcfg = dataclasses.replace(cfg.student.train, epochs=sum(cfg.student.kd.stage_epochs)) if staged else cfg.student.train
    trainer = Trainer(name="s", model=model, train_set=data, plan=student_plan(cfg, data.labelled), step=None,
                      evaluate=None, cfg=tcfg, out_dir=Path("unused"), seed=0,
                      device=torch.device("cpu"), info=DistInfo(rank=0, world_size=world_size), meta={})
    return trainer.total_steps


@pytest.mark.parametrize("overrides,world_size", [
    ([], 1),
    (["student.train.batch_size=7", "student.train.min_steps=20"], 1),
    (["student.kd.schedule=staged", "student.kd.stage_epochs=[2,1,3]"], 1),
    (["student.kd.labelled_share=0.7"], 1),
    (["student.train.max_steps_per_epoch=2", "student.train.epochs=3"], 2),
])
def test_student_steps_match_the_training_loop(tiny_data, tmp_path, overrides, world_size):
    cfg = load_experiment(write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs"), overrides)
    splits = load_splits(cfg)
    assert student_steps(cfg, splits, world_size) == _trainer_steps(cfg, splits, world_size)


def test_schedule_steps_counts_epochs_and_min_steps():
    from types import SimpleNamespace

    from train.experiment import TrainConfig

    plan = lambda epoch: SimpleNamespace(indices=range(100))  # noqa: E731  4 batches of 32 per epoch
    assert schedule_steps(plan, TrainConfig(epochs=2, batch_size=32)) == 8
    assert schedule_steps(plan, TrainConfig(epochs=2, batch_size=32, min_steps=9)) == 12  # whole epochs
    assert schedule_steps(plan, TrainConfig(epochs=2, batch_size=32), world_size=2) == 4


def test_budget_multiple_gives_teachers_at_least_the_students_steps(tiny_data, tmp_path):
    path = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    plain = load_experiment(path)
    splits = load_splits(plain)
    assert teacher_train_config(plain, splits) is plain.teachers.train  # null: schedule untouched
    s = student_steps(plain, splits)
    for multiple in (1.0, 2.5):
        cfg = load_experiment(path, [f"teachers.budget_multiple={multiple}"])
        assert teacher_train_config(cfg, splits).min_steps == math.ceil(multiple * s)
    # A configured floor above the policy's is kept.
    high = load_experiment(path, ["teachers.budget_multiple=1", f"teachers.train.min_steps={10 * s}"])
    assert teacher_train_config(high, splits).min_steps == 10 * s


def test_budget_multiple_must_be_positive(tiny_data, tmp_path):
    from train.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="budget_multiple"):
        load_experiment(write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs"),
                        ["teachers.budget_multiple=0"])


@pytest.mark.parametrize("config", ["default", "real", "real_gpu"])
def test_the_configs_users_train_with_give_every_teacher_the_students_steps(config):
    # Without the policy, a student trained over an unlabelled pool gets many times a teacher's steps,
    # and a ~145-step ensemble lost to a Lite0 trained alone (issue 9).
    multiple = load_experiment(f"configs/{config}.yaml").teachers.budget_multiple
    assert multiple is not None and multiple >= 1

"""Normalisation per model: the teachers' and the student's sections each resolve their own input
(train.experiment.role_preprocessing), and every stage and exported contract uses its model's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import make_tiny_dataset, write_tiny_config

from deploy.contract import read_sidecar
from deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from train.config import ConfigError
from train.experiment import ExperimentConfig, load_experiment, role_preprocessing

LITE = (0.5, 0.5, 0.5)


def test_each_role_resolves_its_own_size_mean_and_std():
    cfg = load_experiment(None, ["image_size=96", "teachers.image_size=128", f"teachers.mean={list(IMAGENET_MEAN)}",
                                 f"teachers.std={list(IMAGENET_STD)}", "resize=center_crop"])
    teachers, student = role_preprocessing(cfg, "teachers"), role_preprocessing(cfg, "student")
    assert (teachers.size, teachers.mean, teachers.std) == (128, IMAGENET_MEAN, IMAGENET_STD)
    assert (student.size, student.mean, student.std) == (96, LITE, LITE)  # the run's values
    assert teachers.resize == student.resize == "center_crop"


def test_a_section_value_wins_over_the_run_value_one_key_at_a_time():
    cfg = load_experiment(None, ["mean=[0.4, 0.4, 0.4]", "std=[0.2, 0.2, 0.2]", "student.std=[0.3, 0.3, 0.3]"])
    student = role_preprocessing(cfg, "student")
    assert (student.mean, student.std) == ((0.4, 0.4, 0.4), (0.3, 0.3, 0.3))
    assert role_preprocessing(cfg, "teachers").std == (0.2, 0.2, 0.2)
    with pytest.raises(ValueError, match="role must be one of"):
        role_preprocessing(cfg, "baseline")  # the baseline is a student: one name per section


def test_paper_config_gives_resnet_teachers_imagenet_statistics_and_the_lite_student_its_own():
    cfg = load_experiment(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    assert role_preprocessing(cfg, "teachers").mean == IMAGENET_MEAN
    assert role_preprocessing(cfg, "teachers").std == IMAGENET_STD
    assert role_preprocessing(cfg, "student").mean == role_preprocessing(cfg, "student").std == LITE


@pytest.mark.parametrize("override", ["teachers.std=[0.2, 0.0, 0.2]", "student.std=[0.5, -0.5, 0.5]",
                                      "std=[0.5, 0.5, 0]", "teachers.mean=[0.5, 0.5]",
                                      "student.mean=[0.5, .nan, 0.5]"])
def test_invalid_normalisation_is_refused_at_load(override):
    with pytest.raises(ConfigError, match="std must be > 0|3 finite numbers|expected 3 items"):
        load_experiment(None, [override])


def test_the_deployed_spec_refuses_a_zero_std_too():
    with pytest.raises(ValueError, match="std must be > 0"):
        PreprocessSpec(size=32, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="3 finite numbers"):
        PreprocessSpec.from_dict({"size": 32, "mean": [0.5, 0.5]})
    assert ExperimentConfig().mean == LITE  # the defaults stay valid


TEACHER_MEAN, TEACHER_STD = IMAGENET_MEAN, IMAGENET_STD
STUDENT_MEAN, STUDENT_STD = (0.45, 0.45, 0.45), (0.3, 0.3, 0.3)


@pytest.fixture(scope="module")
def distinct_run(tmp_path_factory) -> Path:
    """Two tiny teachers and a student trained one step each through the real entry points, with
    different statistics per role, then exported (student, teachers, ensemble)."""
    from compress.export import export_all
    from train import student, teachers

    root = tmp_path_factory.mktemp("norm")
    data = make_tiny_dataset(root / "data", unlabeled_patients=2)
    one_step = {"epochs": 1, "max_steps_per_epoch": 1}
    cfg = write_tiny_config(root / "cfg.yaml", data, root / "runs", **{
        "teachers.mean": list(TEACHER_MEAN), "teachers.std": list(TEACHER_STD),
        "student.mean": list(STUDENT_MEAN), "student.std": list(STUDENT_STD), "student.baseline": False,
        **{f"{role}.train.{k}": v for role in ("teachers", "student") for k, v in one_step.items()}})
    assert teachers.main(["--config", str(cfg)]) == 0
    assert student.main(["--config", str(cfg)]) == 0
    # Only a rough match is asked of one-step models: the contracts are what is checked here.
    export_all(str(cfg), ["compress.models=[student,teachers,ensemble]", "compress.verify_min_agreement=0.0",
                          "compress.verify_atol=1.0"])
    return cfg


def _stats(spec: PreprocessSpec) -> tuple:
    return tuple(spec.mean), tuple(spec.std)


def test_exported_contracts_carry_each_models_own_normalisation(distinct_run: Path):
    layout = load_experiment(distinct_run).layout
    assert _stats(read_sidecar(layout.onnx("student")).preprocessing) == (STUDENT_MEAN, STUDENT_STD)
    for name in ("t_cls", "t_all", "ensemble"):
        assert _stats(read_sidecar(layout.onnx(name)).preprocessing) == (TEACHER_MEAN, TEACHER_STD), name


def test_soft_targets_are_computed_on_the_teachers_pixels(distinct_run: Path):
    from train.checkpoint import load_checkpoint

    cfg = load_experiment(distinct_run)
    _, meta = load_checkpoint(cfg.layout.teacher_outputs())
    used = PreprocessSpec.from_dict(meta["key"]["preprocessing"])
    assert _stats(used) == (TEACHER_MEAN, TEACHER_STD)
    _, student_meta = load_checkpoint(cfg.layout.checkpoint("student"))
    assert _stats(PreprocessSpec.from_dict(student_meta["preprocessing"])) == (STUDENT_MEAN, STUDENT_STD)


def test_teachers_trained_on_other_pixels_are_refused(distinct_run: Path):
    import torch

    from train.calibrate import teacher_ensemble
    from train.stage import load_splits

    cfg = load_experiment(distinct_run, [f"teachers.mean={list(STUDENT_MEAN)}"])
    with pytest.raises(ConfigError, match="trained with other preprocessing"):
        teacher_ensemble(cfg, load_splits(cfg), torch.device("cpu"))

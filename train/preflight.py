"""Check the whole experiment config against the dataset before the first stage trains anything.

Every stage (teachers, student, KD, compress, bench) reads one config; a wrong task name in the KD
temperatures or a bench floor used to surface only after the teachers had trained for an hour. Here
each section is checked against the dataset's tasks in well under a second, and every problem is
reported at once, naming the config key and the dataset's real task names.
"""

from __future__ import annotations

from pathlib import Path

from train.config import ConfigError
from train.data.manifest import DatasetSpec
from train.experiment import ExperimentConfig, teacher_specs
from train.floors import parse_floor
from train.metrics import (
    HEADLINE_KEYS,
    LOWER_IS_BETTER,
    joint_key,
    present_ks,
    selectable_metrics,
)
from train.models.config import (
    LITE_SOURCES,
    ModelConfig,
    PretrainedError,
    lite_variant,
    lite_weights_path,
    validate_source,
)

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048
MAX_AUTO_TEACHERS = 15  # 4 tasks; 5 would be 31 teachers
EXPORTABLE = ("student", "baseline", "ensemble", "teachers")
QUANTIZABLE = ("student", "baseline")


def metric_keys(spec: DatasetSpec) -> set[str]:
    """Every headline key a model of this dataset can report (what floors and select_metric may name)."""
    keys = set()
    for t in spec.tasks:
        names = set(HEADLINE_KEYS[t.kind])
        if t.kind == "classification":
            names |= {"ece"}  # the benchmark reports calibration too
            names -= {"top5"} if 5 not in present_ks(t.num_classes) else set()
            names -= {"kappa", "mae"} if not t.ordinal else set()
        keys |= {f"{t.name}/{n}" for n in names}
    keys |= {f"{joint_key(g)}/joint_accuracy" for g in spec.joint}
    return keys


def _tasks_problems(where: str, named: list[str] | dict, spec: DatasetSpec) -> list[str]:
    unknown = sorted(set(named) - set(spec.task_names))
    return [f"{where} names unknown task(s) {unknown}; the dataset's tasks are {spec.task_names}"] if unknown else []


def _select_problems(where: str, select: str, keys: set[str]) -> list[str]:
    if "/" in select:
        if select.endswith(LOWER_IS_BETTER):
            return [f"{where}={select!r} is lower-is-better; checkpoints are kept by the highest score, "
                    "pick a score such as kappa or balanced_accuracy"]
        return [] if select in keys else [f"{where}={select!r} is not a metric of this dataset; one of {sorted(keys)}"]
    if select not in selectable_metrics():
        return [f"{where}={select!r}: use one of {list(selectable_metrics())} or a task metric such as "
                f"{sorted(keys)[0]}"]
    return []


def _pretrained_problems(where: str, model: ModelConfig) -> list[str]:
    try:
        validate_source(model.pretrained)
        if model.pretrained in LITE_SOURCES:
            lite_variant(model.backbone, model.pretrained)
            lite_weights_path(int(model.pretrained[-1]))
        elif model.pretrained.endswith(".safetensors") and not Path(model.pretrained).is_file():
            return [f"{where}.pretrained: {model.pretrained} not found"]
    except (PretrainedError, ValueError) as exc:
        return [f"{where}.pretrained: {exc}"]
    return []


def _size_problems(cfg: ExperimentConfig) -> list[str]:
    sizes = {"image_size": cfg.image_size, "teachers.image_size": cfg.teachers.image_size,
             "student.image_size": cfg.student.image_size}
    return [f"{k}={v} must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels" for k, v in sizes.items()
            if v is not None and not MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE]


def _floor_problems(cfg: ExperimentConfig, keys: set[str]) -> list[str]:
    problems = []
    for text in cfg.bench.floors:
        floor = parse_floor(text)
        if floor.metric not in keys:
            problems.append(f"bench.floors: {text!r} names metric {floor.metric!r}, not one of {sorted(keys)}")
    return problems


def experiment_problems(cfg: ExperimentConfig, spec: DatasetSpec) -> list[str]:
    """Every mismatch between the config and the dataset, as readable lines (empty = fine)."""
    keys = metric_keys(spec)
    problems = _tasks_problems("student.kd.temperatures", cfg.student.kd.temperatures, spec)
    stratify = cfg.data.stratify_task
    if stratify and (stratify not in spec.task_names or spec.task(stratify).kind != "classification"):
        problems.append(f"data.stratify_task={stratify!r} is not a classification task of {spec.task_names}")
    try:
        members = teacher_specs(cfg, spec.task_names)
    except ConfigError as exc:
        problems.append(str(exc))
        members = []
    if cfg.teachers.members is None and len(members) > MAX_AUTO_TEACHERS:
        problems.append(f"{len(spec.task_names)} tasks make {len(members)} teachers (one per task subset); list "
                        f"the ones to train in teachers.members (e.g. one per task plus one with all tasks)")
    for where, train in (("teachers.train", cfg.teachers.train), ("student.train", cfg.student.train)):
        problems += _select_problems(f"{where}.select_metric", train.select_metric, keys)
    models = [("teachers.model", cfg.teachers.model), ("student.model", cfg.student.model)]
    models += [(f"teachers.members[{m.name}].model", m.model) for m in members if m.model is not None]
    for where, model in models:
        problems += _pretrained_problems(where, model)
        if model.pretrained == "none" and not cfg.allow_random_init:
            problems.append(f"{where}.pretrained: none trains from random weights; give ImageNet weights "
                            f"(efficientnet-lite0/1/2, timm, or a .safetensors path: configs/paper.yaml says how) "
                            f"or set allow_random_init: true if that is meant")
        if model.tasks is not None:
            problems += _tasks_problems(f"{where}.tasks", model.tasks, spec)
    problems += _size_problems(cfg)
    problems += [f"student.kd.unlabeled_pools: {folder!r} is not a folder (give folders of photographs)"
                 for folder in cfg.student.kd.unlabeled_pools if not Path(folder).expanduser().is_dir()]
    problems += [f"compress.models: unknown {sorted(set(cfg.compress.models) - set(EXPORTABLE))}; use {list(EXPORTABLE)}"
                 ] if set(cfg.compress.models) - set(EXPORTABLE) else []
    problems += [f"compress.quantize: unknown {sorted(set(cfg.compress.quantize) - set(QUANTIZABLE))}; use "
                 f"{list(QUANTIZABLE)}"] if set(cfg.compress.quantize) - set(QUANTIZABLE) else []
    return problems + _floor_problems(cfg, keys)


def check_experiment(cfg: ExperimentConfig, spec: DatasetSpec, source: str = "the config") -> None:
    """ConfigError listing every problem of `experiment_problems`, before anything trains."""
    problems = experiment_problems(cfg, spec)
    if problems:
        raise ConfigError(f"{source} does not fit dataset {spec.name!r}: " + "; ".join(problems))

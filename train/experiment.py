"""The experiment config: data, teachers, student and baseline, compression and benchmark settings.

One YAML file (configs/default.yaml, configs/paper.yaml, ...) drives every stage of the pipeline, so
`make teachers student export compress bench` all read the same resolved values. Loading validates
every key (unknown keys are rejected with the list of valid ones).

    python -m train.experiment --config configs/default.yaml --print run_dir

Checking it against a dataset is `python -m train.check` (make check).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deploy.errors import cli
from deploy.preprocess import PreprocessSpec, check_normalisation
from train.config import ConfigError, load_config, read_overrides_file, split_overrides, to_dict
from train.downstream_config import (  # noqa: F401 (CALIBRATION_METHODS, GuardConfig: re-exported)
    CALIBRATION_METHODS,
    BenchConfig,
    ClinicalConfig,
    CompressConfig,
    GuardConfig,
)
from train.layout import RunLayout
from train.models.config import ModelConfig
from train.stage_times import note_run


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    manifest: str | None = None  # another manifest in the same folder (e.g. a label-fraction subset)
    label_fraction: float | None = None  # keep this share of labelled training patients (paper: 0.15)
    stratify_task: str | None = None  # default: the first classification task
    validate: bool = True  # refuse to train on a dataset the validator rejects

    def __post_init__(self) -> None:
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")


@dataclass
class AugmentConfig:
    """Photometric/geometric jitter on the PIL image before the deployed preprocessing.

    No horizontal flip: it would swap the eye's anatomy (disc side) against its left/right label and text.
    """

    enabled: bool = True
    rotate_deg: float = 10.0
    translate: float = 0.03
    scale: float = 0.05
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only; the paper used SGD with Nesterov momentum
    nesterov: bool = True
    schedule: Literal["cosine", "plateau", "none"] = "cosine"
    warmup_epochs: float = 0.0
    plateau_patience: int = 2
    plateau_factor: float = 0.3


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: bool = True  # mixed precision on CUDA only; ignored on CPU
    grad_clip: float = 5.0
    # Validation metric for the best checkpoint: auto = mean over tasks of balanced accuracy (kappa for
    # ordinal tasks, BLEU for text); a metric name (macro_f1, accuracy, ...) for every classification
    # task; or one headline key (coarse/accuracy). See train.metrics.primary_metric.
    select_metric: str = "auto"
    # Cross-entropy class weights against skew: none | sqrt_inverse | inverse (n_c^-0.5 / n_c^-1, mean 1
    # over the training labels). Real sets are skewed (ODIR ~44 % normal, ~2 % hypertension).
    class_balance: Literal["none", "sqrt_inverse", "inverse"] = "none"
    num_workers: int = 0
    eval_batch_size: int = 64
    max_steps_per_epoch: int | None = None  # caps an epoch (used to give the baseline the student's budget)
    # At least this many optimizer steps: small (label-fraction) training sets get more epochs instead
    # of a starved model. 0 = exactly `epochs`.
    min_steps: int = 0
    # Validate and checkpoint at most this many times (evenly spaced; always after the last epoch), so
    # runs of many short epochs stay cheap. A killed run resumes from the last checkpointed epoch.
    max_evals: int = 10

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_evals < 1 or self.min_steps < 0:
            raise ValueError("epochs, batch_size and max_evals must be >= 1 and min_steps >= 0")


Stats = tuple[float, float, float]


def check_section_normalisation(section: str, mean: Stats | None, std: Stats | None) -> None:
    """A role's own mean/std (None = the run's): 3 finite values each, std > 0 (ValueError naming the key)."""
    try:
        check_normalisation(mean, std)
    except ValueError as exc:
        raise ValueError(f"{section}: {exc}") from exc


@dataclass
class TeacherSpec:
    name: str
    tasks: list[str]
    model: ModelConfig | None = None  # overrides the shared teacher model (e.g. another backbone)


@dataclass
class TeachersConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="efficientnet_lite1"))
    train: TrainConfig = field(default_factory=TrainConfig)
    members: list[TeacherSpec] | None = None  # None: one teacher per non-empty subset of the tasks
    # The teachers' input (null = the run's image_size / mean / std): every teacher, its soft targets and
    # the exported teacher and ensemble contracts use it (role_preprocessing below).
    image_size: int | None = None
    mean: Stats | None = None
    std: Stats | None = None
    # How the ensemble combines its teachers per task, the text vote too (train/calibrate.py): mean (equal
    # vote), calibrated_mean (each teacher temperature-scaled on the validation split) or
    # quality_weighted (calibrated + weights from validation NLL). Soft targets and export use the same.
    ensemble_weighting: Literal["mean", "calibrated_mean", "quality_weighted"] = "mean"
    # Budget policy (train/budget.py): every teacher gets at least budget_multiple x the student's
    # optimizer steps (train.min_steps is raised, adding epochs). null = the configured schedule only.
    budget_multiple: float | None = None

    def __post_init__(self) -> None:
        if self.budget_multiple is not None and self.budget_multiple <= 0:
            raise ValueError(f"teachers.budget_multiple must be > 0 (or null), got {self.budget_multiple}")
        check_section_normalisation("teachers", self.mean, self.std)


@dataclass
class KDConfig:
    alpha: float = 0.95  # weight of the KD term on labelled images (paper)
    temperatures: dict[str, float] = field(default_factory=dict)  # per task; missing -> default_temperature
    default_temperature: float = 4.0
    ensemble_mode: Literal["mean_probs", "kl_sum"] = "mean_probs"
    schedule: Literal["joint", "staged"] = "joint"
    # staged: epochs of (1) labels only, (2) labels + KD, (3) unlabelled KD only (the paper's schedule)
    stage_epochs: list[int] = field(default_factory=lambda: [1, 2, 1])
    token_kd: bool = True  # token-level KL against the text teachers under teacher forcing
    sequence_kd: bool = True  # the ensemble's greedy diagnosis as the decoder target on unlabelled images
    use_unlabeled: bool = True
    # Folders of unlabelled photographs that join the dataset's own pool at load time (train/pool.py);
    # own_unlabeled: false leaves the dataset's own `unlabeled` split out.
    unlabeled_pools: list[str] = field(default_factory=list)
    own_unlabeled: bool = True
    # joint schedule: the share of each epoch's images that are labelled (labelled images repeated,
    # unlabelled ones drawn anew each epoch, the epoch's size unchanged). With a large pool the natural
    # mix shows each labelled image only once or twice; null keeps the natural mix.
    labelled_share: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"kd.alpha must be in [0, 1], got {self.alpha}")
        if self.labelled_share is not None and not 0 < self.labelled_share <= 1:
            raise ValueError(f"kd.labelled_share must be in (0, 1] (or null), got {self.labelled_share}")
        if len(self.stage_epochs) != 3 or min(self.stage_epochs) < 0:
            raise ValueError("kd.stage_epochs must be 3 non-negative epoch counts")


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="efficientnet_lite0",
                                                                   pretrained="efficientnet-lite0"))
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    baseline: bool = True  # also train the same student on labels only, with the same step budget
    # The student's input, also the baseline's and the linear probe's (null = the run's values).
    image_size: int | None = None
    mean: Stats | None = None
    std: Stats | None = None

    def __post_init__(self) -> None:
        check_section_normalisation("student", self.mean, self.std)


@dataclass
class ExperimentConfig:
    name: str = "default"
    runs_root: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    image_size: int = 96
    resize: Literal["letterbox", "center_crop", "stretch"] = "letterbox"
    # The run's normalisation, for every model whose section (teachers, student) sets none of its own.
    # The EfficientNet-Lite ImageNet weights were trained on inputs scaled to [-1, 1] (mean = std = 0.5);
    # torchvision/timm ResNets on ImageNet statistics (deploy.preprocess.IMAGENET_MEAN/STD).
    mean: Stats = (0.5, 0.5, 0.5)
    std: Stats = (0.5, 0.5, 0.5)
    # Models with `pretrained: none` train from random weights, which on a few thousand photographs is
    # far weaker than starting from ImageNet; refused (train.preflight) unless this says it is meant.
    allow_random_init: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    clinical: ClinicalConfig = field(default_factory=ClinicalConfig)

    def __post_init__(self) -> None:
        check_section_normalisation("config", self.mean, self.std)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name

    @property
    def layout(self) -> RunLayout:
        """Every path of this run's folder."""
        return RunLayout(self.run_dir)


def teacher_specs(cfg: ExperimentConfig, task_names: list[str]) -> list[TeacherSpec]:
    """The configured teachers, or one per non-empty subset of the tasks (the paper's ensemble)."""
    if cfg.teachers.members is not None:
        specs = cfg.teachers.members
    else:
        specs = [TeacherSpec(name="teacher_" + "_".join(subset), tasks=list(subset))
                 for r in range(1, len(task_names) + 1) for subset in itertools.combinations(task_names, r)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"teacher names must be unique, got {names}")
    for s in specs:
        unknown = set(s.tasks) - set(task_names)
        if unknown or not s.tasks:
            raise ConfigError(f"teacher {s.name!r}: tasks {s.tasks} must be a non-empty subset of {task_names}")
    return specs


ROLES = ("teachers", "student")  # the config sections that carry their own input settings


def role_preprocessing(cfg: ExperimentConfig, role: str) -> PreprocessSpec:
    """How `role`'s models see pixels: "teachers" (every teacher and the ensemble) or "student" (also the
    baseline and the linear probe). The section's image_size, mean and std where set, else the run's.

    The one place these resolve: training, soft targets, evaluation and export all ask here, so a
    model's contract carries the normalisation it was trained with (ImageNet ResNet teachers and a
    [-1, 1] EfficientNet-Lite student each keep their own)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    section = getattr(cfg, role)
    return PreprocessSpec(size=section.image_size or cfg.image_size, resize=cfg.resize,
                          mean=tuple(section.mean if section.mean is not None else cfg.mean),
                          std=tuple(section.std if section.std is not None else cfg.std))


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    cfg = load_config(ExperimentConfig, path, overrides)
    note_run(cfg.layout)  # a timed stage (train.stage_times.run_stage) records into this run folder
    return cfg


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every stage shares: --config and overrides (read them with `config_overrides`)."""
    parser.add_argument("--config", default="configs/default.yaml", help="experiment YAML (configs/)")
    parser.add_argument("--overrides-file", default=None, metavar="YAML",
                        help="a (partial) config mapping applied on top of --config")
    parser.add_argument("--set", dest="set_text", action="append", default=[], metavar="'k=v k2=v2'",
                        help="overrides in one string (how make passes OVERRIDES)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override config values, e.g. student.train.epochs=2")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """All overrides of a stage's command line, later ones winning: key=value words (the Makefile's
    data.root and name), then the overrides file, then the --set strings (the user's OVERRIDES)."""
    items = list(args.overrides)
    items += read_overrides_file(args.overrides_file) if args.overrides_file else []
    for text in args.set_text:
        items += split_overrides(text)
    return items


def _lookup(cfg: ExperimentConfig, key: str):
    node = to_dict(cfg)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--print {key}: no such config key; top-level keys: {sorted(to_dict(cfg))}")
        node = node[part]
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.experiment", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--print", dest="key", default=None, help="print one value (e.g. run_dir, data.root)")
    args = parser.parse_args(argv)
    cfg = load_experiment(args.config, config_overrides(args))
    if args.key == "run_dir":
        print(cfg.run_dir)
    elif args.key:
        print(_lookup(cfg, args.key))
    else:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

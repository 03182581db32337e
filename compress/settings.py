"""The `compress:` section of the experiment config (export, calibration, quantization, guard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from train.config import from_dict
from train.experiment import ExperimentConfig

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class GuardConfig:
    """Largest allowed drop of an INT8 model against its FP32 model on the validation split."""

    max_drop_accuracy_points: float = 1.0  # first classification task (T1) accuracy
    max_drop_top5_points: float = 1.0  # other classification tasks (T2) top-5
    max_drop_bleu: float = 1.0  # text task BLEU
    # Tried in order when the first attempt misses a threshold (see compress/guard.py).
    fallbacks: list[Literal["method", "more_images", "sensitive_layers"]] = field(
        default_factory=lambda: ["method", "more_images", "sensitive_layers"])
    sensitivity_candidates: int = 12  # how many layers the per-layer sensitivity pass tries
    max_float_layers: int = 4  # at most this many sensitive layers are kept in float

    def __post_init__(self) -> None:
        if self.sensitivity_candidates < 1 or self.max_float_layers < 1:
            raise ValueError("guard.sensitivity_candidates and guard.max_float_layers must be >= 1")
        if min(self.max_drop_accuracy_points, self.max_drop_top5_points, self.max_drop_bleu) < 0:
            raise ValueError("guard thresholds are drops in points and must be >= 0")


@dataclass
class CompressConfig:
    opset: int = 17
    models: list[str] = field(default_factory=lambda: ["student", "baseline", "ensemble", "teachers"])
    quantize: list[str] = field(default_factory=lambda: ["student", "baseline"])
    verify_images: int | None = None  # validation images for the export check (None: all)
    verify_atol: float = 1e-4  # max |p_onnx - p_torch| of FP32 probabilities
    verify_min_agreement: float = 0.995  # identical top-1 and decoded text on at least this share
    calibration_images: int = 500
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = 99.999
    calibration_batch: int = 16
    guard: GuardConfig = field(default_factory=GuardConfig)
    threads: int = 2


def compress_config(cfg: ExperimentConfig) -> CompressConfig:
    return from_dict(CompressConfig, cfg.compress, where="compress")

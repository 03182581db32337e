"""The `compress:` section of the experiment config (export, calibration, quantization, guard)."""

from __future__ import annotations

from train.experiment import CALIBRATION_METHODS, CompressConfig, ExperimentConfig, GuardConfig  # noqa: F401 (re-exported)


def compress_config(cfg: ExperimentConfig) -> CompressConfig:
    return cfg.compress

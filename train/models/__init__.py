"""Models: the multi-task network, its GRU decoder, offline pretrained weights, a build-by-name registry."""

from train.models.decoder import DiagnosisDecoder
from train.models.multitask import ClassificationHead, ExportModel, ModelConfig, MultiTaskNet, select_tasks
from train.models.pretrained import (
    LITE_MEAN,
    LITE_STD,
    PretrainedError,
    lite_weights_path,
    load_lite_weights,
    load_pretrained,
)
from train.models.registry import build, register, registered

__all__ = [
    "LITE_MEAN",
    "LITE_STD",
    "ClassificationHead",
    "DiagnosisDecoder",
    "ExportModel",
    "ModelConfig",
    "MultiTaskNet",
    "PretrainedError",
    "build",
    "lite_weights_path",
    "load_lite_weights",
    "load_pretrained",
    "register",
    "registered",
    "select_tasks",
]

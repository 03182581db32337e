"""One small registry for everything built by name (backbones, decoders, models).

`@register("name", kind="decoder")` records a factory; `build(kind, name, **kw)` calls it. Backbones
need no registration: any timm model name builds a headless timm encoder (`num_classes=0`, so its
output is the globally pooled feature vector), which keeps configs as plain data (`backbone: resnet50`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import timm
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(name: str, kind: str = "model") -> Callable[[F], F]:
    """Decorator: record `factory` under (kind, name). Registering the same pair twice is an error."""

    def decorate(factory: F) -> F:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not factory:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__qualname__})")
        table[name] = factory
        return factory

    return decorate


def registered(kind: str) -> list[str]:
    """Names registered under `kind` (backbones: only the non-timm ones)."""
    return sorted(_REGISTRY.get(kind, {}))


def _base_name(name: str) -> str:
    """timm names may carry a pretrained tag ("efficientnet_lite0.ra_in1k"); the architecture is before it."""
    return name.split(".", 1)[0]


def build(kind: str, name: str, **kwargs: Any) -> Any:
    """Build `name` of `kind`. Backbones fall back to `timm.create_model(name, num_classes=0, **kwargs)`."""
    table = _REGISTRY.get(kind, {})
    if name in table:
        return table[name](**kwargs)
    if kind == "backbone":
        return build_timm_backbone(name, **kwargs)
    known = sorted(table) or ["(none registered)"]
    raise KeyError(f"unknown {kind} {name!r}; registered {kind}s: {known}")


def build_timm_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A headless timm model whose forward returns pooled features `[N, num_features]`."""
    if not timm.is_model(_base_name(name)):
        close = timm.list_models(f"*{_base_name(name).split('_')[0]}*")[:10]
        raise KeyError(f"backbone {name!r} is neither registered nor a timm model; similar timm names: {close}")
    # Random init here: pretrained weights are loaded separately (train.models.pretrained), offline.
    model = timm.create_model(_base_name(name), pretrained=False, num_classes=0, **kwargs)
    if not hasattr(model, "num_features"):
        raise TypeError(f"timm model {name!r} has no num_features; it cannot serve as a pooled encoder")
    return model

"""Whole models in and out of checkpoints: `save_model` writes a MultiTaskNet's weights with everything
needed to rebuild it (config, tasks, vocabulary size) in the checkpoint meta; `load_model` rebuilds it
from the file alone. The file format itself (safetensors + JSON meta) is train.checkpoint's job, which
knows nothing about models: this module sits on top of both, so neither imports the other's side.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deploy.contract import TaskSpec
from deploy.errors import UserError
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train.config import from_dict, to_dict
from train.models.config import ModelConfig
from train.models.multitask import MultiTaskNet

MODEL_FORMAT = "fundus_mtkd.model"
MODEL_FORMAT_VERSION = 1


def model_meta(model: MultiTaskNet) -> dict:
    """What is needed to rebuild `model` without any training config."""
    return {"config": to_dict(model.cfg), "tasks": [t.to_dict() for t in model.tasks],
            "vocab_size": model.vocab_size, "max_len": model.max_len}


def save_model(path: str | Path, model: MultiTaskNet, meta: dict | None = None) -> Path:
    """Save weights + everything needed to rebuild the model; `meta` adds caller data (epoch, metrics...)."""
    meta = dict(meta or {})
    reserved = {"format", "format_version", "model"} & set(meta)
    if reserved:
        raise CheckpointError(f"meta keys {sorted(reserved)} are reserved by save_model")
    full = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "model": model_meta(model), **meta}
    return save_checkpoint(path, model.state_dict(), full)


def load_model(path: str | Path) -> tuple[MultiTaskNet, dict]:
    """Rebuild a MultiTaskNet from a `save_model` checkpoint alone; returned in eval mode."""
    tensors, meta = load_checkpoint(path)
    if meta.get("format") != MODEL_FORMAT or "model" not in meta:
        raise CheckpointError(f"{path}: not a model checkpoint (no {MODEL_FORMAT!r} meta); it was not written "
                              "by train.models.saved.save_model")
    if meta.get("format_version") != MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path}: model format version {meta.get('format_version')!r} is not supported")
    model = _build_described_model(path, meta["model"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model described in its meta ({exc})") from exc
    return model.eval(), meta


def _build_described_model(path: Path, info: Any) -> MultiTaskNet:
    """The (untrained) model a checkpoint's `model` meta describes; CheckpointError naming the bad field."""
    fix = "the checkpoint's meta was edited or damaged: re-save it with train.models.saved.save_model"
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: meta 'model' must be an object, got {type(info).__name__}; {fix}")
    missing = [k for k in ("config", "tasks", "vocab_size", "max_len") if k not in info]
    if missing:
        raise CheckpointError(f"{path}: meta 'model' lacks {missing}; {fix}")
    if not isinstance(info["tasks"], list) or not info["tasks"]:
        raise CheckpointError(f"{path}: meta 'model.tasks' must be a non-empty list, got {info['tasks']!r}; {fix}")
    for key, optional in (("vocab_size", True), ("max_len", False)):  # vocab_size is None without a text task
        value = info[key]
        if not (value is None and optional) and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckpointError(f"{path}: meta 'model.{key}' must be a whole number, got {value!r}; {fix}")
    if not isinstance(info["config"], dict):
        raise CheckpointError(f"{path}: meta 'model.config' must be an object, got {info['config']!r}; {fix}")
    cfg = from_dict(ModelConfig, info["config"], where=f"{path}: model.config")
    # The weights come from this file: skip the pretrained source (it may be absent on this machine).
    cfg = dataclasses.replace(cfg, pretrained="none")
    try:
        tasks = [TaskSpec.from_dict(t) for t in info["tasks"]]
        return MultiTaskNet(cfg, tasks, vocab_size=info["vocab_size"], max_len=info["max_len"])
    except UserError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # e.g. a backbone timm does not know
        raise CheckpointError(f"{path}: cannot build the model its meta describes ({type(exc).__name__}: {exc}); "
                              f"{fix}, or install the library version it was trained with") from exc

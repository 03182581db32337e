"""A training run's history: one record per validation epoch (`epoch`, train losses, `val/<headline key>`,
`val/score`), kept by train/loop.py in the resume checkpoint's meta. Which record belongs to the kept
checkpoint is decided here once, for the curves (train/plots.py), the KD sweep (train/sweep.py) and the
summary's validation pick of a teacher (train/summary.py). Torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from train.layout import LAST_CHECKPOINT, meta_sidecar


def kept_record(history: list[dict]) -> dict:
    """The record of the kept checkpoint: the highest validation score, a tie keeping the later epoch
    (Trainer's rule: a later checkpoint has trained longer; a NaN score is never kept). {} when no record
    has a score."""
    scored = [r for r in history if isinstance(r.get("val/score"), (int, float)) and math.isfinite(r["val/score"])]
    return max(scored, key=lambda r: (r["val/score"], r["epoch"])) if scored else {}


def validation_headline(record: dict) -> dict[str, float]:
    """A history record's validation metrics keyed like the summary's columns ('fine/top5')."""
    return {k[len("val/"):]: v for k, v in record.items() if k.startswith("val/") and k != "val/score"}


def kept_validation(model_dir: Path) -> dict[str, float]:
    """The validation metrics of a trained model's kept checkpoint, read from the history in its resume
    point's JSON sidecar ({} when the run folder has none, e.g. copied without it)."""
    sidecar = meta_sidecar(Path(model_dir) / LAST_CHECKPOINT)
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    history = meta.get("history") if isinstance(meta, dict) else None
    return validation_headline(kept_record(history)) if isinstance(history, list) else {}

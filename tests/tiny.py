"""A tiny, clearly learnable dataset in the real format, and a matching tiny experiment config.

Coarse class = dominant colour, fine class = colour + a bright square in one of two corners, text =
a sentence naming both. Tests of training, distillation, export, compression and benchmarks use it so
they run in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from deploy.contract import TaskSpec
from train.data.manifest import DatasetSpec, Row, build_vocabulary, save_spec, write_manifest
from train.data.splits import assign_splits

COARSE = ("red", "green", "blue")
FINE = tuple(f"{c}_{corner}" for c in COARSE for corner in ("left", "right"))
_COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def _image(coarse: str, corner: str, rng: np.random.Generator, size: int) -> Image.Image:
    arr = np.clip(np.array(_COLOURS[coarse], dtype=np.float32) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    q = size // 3
    x0 = 2 if corner == "left" else size - q - 2
    arr[2:2 + q, x0:x0 + q] = 255
    return Image.fromarray(arr.astype(np.uint8))


def make_tiny_dataset(root: Path, patients: int = 30, unlabeled_patients: int = 10, size: int = 32,
                      seed: int = 0) -> Path:
    """Write dataset.yaml, manifest.csv, vocab.json and JPEGs under `root`; returns root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients + unlabeled_patients):
        for eye in ("left", "right"):
            coarse = COARSE[(p + (eye == "right")) % 3]
            corner = ("left", "right")[int(rng.integers(2))]
            name = f"images/p{p:03d}_{eye}.jpg"
            _image(coarse, corner, rng, size).save(root / name, quality=95)
            labelled = p < patients
            labels = {"coarse": coarse, "fine": f"{coarse}_{corner}",
                      "diagnosis": f"{eye} eye: {coarse} fundus with a spot at the {corner}."} if labelled else \
                {"coarse": "", "fine": "", "diagnosis": ""}
            rows.append(Row(path=name, patient_id=f"p{p:03d}", eye=eye,
                            split="train" if labelled else "unlabeled", labels=labels))
    rows = assign_splits(rows, "coarse", {"train": 0.6, "val": 0.2, "test": 0.2}, seed=seed)
    spec = DatasetSpec(name="tiny", tasks=[TaskSpec("coarse", "classification", COARSE, normal="red"),
                                           TaskSpec("fine", "classification", FINE),
                                           TaskSpec("diagnosis", "text")])
    save_spec(spec, root)
    write_manifest(root / "manifest.csv", rows, spec.task_names)
    build_vocabulary(spec, rows, max_len=12).save(root / "vocab.json")
    return root


def tiny_model() -> dict:
    return {"backbone": "test_efficientnet", "pretrained": "none", "head_hidden": 32, "dropout": 0.0,
            "embed_dim": 16, "decoder_hidden": 32, "decoder_context": True}


def write_tiny_config(path: Path, data_root: Path, runs_root: Path, **extra) -> Path:
    """An experiment config over the tiny dataset with tiny models and 2 teachers."""
    train = {"epochs": 3, "batch_size": 16, "eval_batch_size": 32,
             "optim": {"lr": 0.01, "schedule": "cosine"}, "augment": {"enabled": False}}
    cfg = {
        "name": "tiny", "runs_root": str(runs_root), "seed": 0, "device": "cpu", "image_size": 32,
        "allow_random_init": True,  # the tiny test backbone has no pretrained weights
        "data": {"root": str(data_root)},
        "teachers": {"model": tiny_model(), "train": train,
                     "members": [{"name": "t_cls", "tasks": ["coarse", "fine"]},
                                 {"name": "t_all", "tasks": ["coarse", "fine", "diagnosis"]}]},
        "student": {"model": tiny_model(), "train": {**train, "epochs": 2}, "kd": {"alpha": 0.9}},
        "compress": {"calibration_images": 16, "models": ["student", "ensemble"], "quantize": ["student"]},
    }
    return write_yaml(path, cfg, extra)


def write_yaml(path: Path, data: dict, dotted: dict) -> Path:
    """Write `data` as YAML after setting each `a.b.c` key of `dotted` (nested mappings made as needed)."""
    for key, value in dotted.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path

"""A foreign unlabelled pool: configs/data_foreign_pool.yaml renders, and one command merges it."""

from __future__ import annotations

from pathlib import Path

import yaml
from tiny import make_tiny_dataset

from train.adapt import main as adapt_main
from train.data.manifest import load_dataset
from train.make_data import main as make_data_main

REPO = Path(__file__).resolve().parents[1]


def test_foreign_pool_renders_and_merges_as_unlabelled(tmp_path: Path):
    config = REPO / "configs" / "data_foreign_pool.yaml"
    pool = tmp_path / "pool"
    assert make_data_main(["--config", str(config), "--out", str(pool), "unlabeled_patients=3", "size=64",
                           "workers=1"]) == 0
    rendered = yaml.safe_load((pool / "synth_config.yaml").read_text())
    default = yaml.safe_load((REPO / "configs" / "data.yaml").read_text())
    # Another camera and clinic: other seed, stronger nuisances, other JPEG quality, other class mix.
    for key in ("seed", "difficulty", "jpeg_quality", "prevalence"):
        assert rendered[key] != default[key], key
    data = make_tiny_dataset(tmp_path / "tiny", size=32)
    before = load_dataset(data)
    assert adapt_main(["unlabeled", "--src", str(pool / "images"), "--out", str(data)]) == 0
    after = load_dataset(data)
    pool_images = sorted((pool / "images").glob("*.jpg"))
    assert len(after.split("unlabeled")) == len(before.split("unlabeled")) + len(pool_images)
    for split in ("train", "val", "test"):
        assert after.split(split) == before.split(split)  # labelled rows untouched

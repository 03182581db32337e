"""A foreign unlabelled pool: configs/data_foreign_pool.yaml renders, and one command merges it."""

from __future__ import annotations

from pathlib import Path

import yaml
from tiny import make_tiny_dataset

from train.data.adapt import main as adapt_main
from train.data.make_data import main as make_data_main
from train.data.manifest import load_dataset

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


def _pool_folder(root: Path, count: int) -> Path:
    from PIL import Image

    (root / "cam2").mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 40), (i * 20, 90, 160)).save(root / "cam2" / f"img{i:02d}.png")
    return root


def test_a_referenced_pool_joins_the_students_images_only(tmp_path: Path):
    """student.kd.unlabeled_pools: the folder's images join (or, own_unlabeled false, replace) the
    dataset's pool for the student, its step budget and its soft targets; teachers and baseline not."""
    import pytest
    from tiny import write_tiny_config

    import train.student as student_mod
    from train.budget import student_steps
    from train.config import ConfigError
    from train.experiment import load_experiment
    from train.pool import student_rows
    from train.stage import load_splits

    data = make_tiny_dataset(tmp_path / "tiny", size=32)
    pool = _pool_folder(tmp_path / "pool", 5)
    path = write_tiny_config(tmp_path / "c.yaml", data, tmp_path / "runs")
    own = load_splits(load_experiment(path))
    counts = {}
    for name, extra in {"own": [], "both": [f"student.kd.unlabeled_pools=[{pool}]"],
                        "pool only": [f"student.kd.unlabeled_pools=[{pool}]", "student.kd.own_unlabeled=false"],
                        "none": ["student.kd.use_unlabeled=false"]}.items():
        cfg = load_experiment(path, extra)
        rows = student_rows(cfg, load_splits(cfg))
        counts[name] = len(rows) - len(own.train)
        assert rows[:len(own.train)] == own.train
    assert counts == {"own": len(own.unlabeled), "both": len(own.unlabeled) + 5, "pool only": 5, "none": 0}
    cfg = load_experiment(path, [f"student.kd.unlabeled_pools=[{pool}]", "student.kd.own_unlabeled=false"])
    assert student_steps(cfg, load_splits(cfg)) < student_steps(load_experiment(path), own)  # 5 images, not 20

    seen = {}

    class Stop(Exception):
        pass

    def spy(splits, rows, *args, **kwargs):  # the student's training set is the first image_set built
        seen.setdefault("rows", rows)
        raise Stop

    student_mod.image_set, real = spy, student_mod.image_set
    try:
        with pytest.raises(Stop):
            student_mod.fit_student(cfg, load_splits(cfg), "student", "cpu", None, None)
    finally:
        student_mod.image_set = real
    assert {r.path for r in seen["rows"][len(own.train):]} == {str(p) for p in sorted((pool / "cam2").glob("*.png"))}

    with pytest.raises(ConfigError, match="unlabeled_pools: .*missing.* is not a folder"):
        load_splits(load_experiment(path, [f"student.kd.unlabeled_pools=[{tmp_path / 'missing'}]"]))

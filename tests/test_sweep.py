"""The KD sweep: every grid point trained from the cached soft targets, scored on validation, sorted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import make_tiny_dataset, write_tiny_config

import train.sweep as sweep_mod
from deploy.errors import cli
from train.experiment import load_experiment
from train.seed_spread import seed_tables
from train.sweep import Point, grid


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny experiment with one teacher trained for one epoch."""
    import train.teachers as teachers_mod
    from train.distributed import DistInfo
    from train.stage import load_splits

    root = tmp_path_factory.mktemp("sweep")
    data = make_tiny_dataset(root / "data")
    path = write_tiny_config(root / "c.yaml", data, root / "runs", **{
        "teachers.members": [{"name": "t_all", "tasks": ["coarse", "fine", "diagnosis"]}],
        "teachers.train.epochs": 1, "student.train.epochs": 1})
    cfg = load_experiment(path)
    teachers_mod.train_teacher(cfg, cfg.teachers.members[0], load_splits(cfg), torch.device("cpu"), DistInfo())
    return path


def test_grid_defaults_to_the_configured_values(trained):
    cfg = load_experiment(trained)
    assert grid(cfg, None, None, None, None) == [Point(0.9, None, "joint", "mean")]
    points = grid(cfg, [0.5, 0.9], ["2", "config"], ["joint", "staged"], None)
    assert len(points) == 8 and len({p.name for p in points}) == 8
    assert Point(0.5, 2.0, "staged", "mean").overrides()[-1] == "student.kd.default_temperature=2.0"
    lengths = grid(cfg, None, None, None, None, None, [2, 4])
    assert [p.name for p in lengths] == ["a0.9-Tconfig-joint-mean-E2", "a0.9-Tconfig-joint-mean-E4"]
    assert lengths[1].overrides()[-1] == "student.train.epochs=4"


def test_each_training_length_gets_a_step_matched_baseline(trained, monkeypatch):
    """The orchestration only (training is faked: 3 steps per configured epoch): each --epochs length
    runs with its own student.train.epochs, and each gets a labels-only baseline with its steps."""
    calls = []

    def fake_run_point(cfg, splits, soft, role, device, info, steps_budget=None):
        steps = steps_budget or 3 * cfg.student.train.epochs
        calls.append((role, steps))
        return {"val_score": 0.5, "steps": steps, "best_epoch": 1, "val": {}, "seconds": 0.0}

    monkeypatch.setattr(sweep_mod, "run_point", fake_run_point)
    assert cli(sweep_mod.main, ["--config", str(trained), "--epochs", "1", "2"]) == 0
    assert calls == [("student", 3), ("student", 6), ("baseline", 3), ("baseline", 6)]
    records = json.loads((trained.parent / "runs" / "tiny" / "sweep" / "sweep.json").read_text())["records"]
    assert {r["point"] for r in records} == {"a0.9-Tconfig-joint-mean-E1", "a0.9-Tconfig-joint-mean-E2",
                                             "labels-only baseline (3 steps)", "labels-only baseline (6 steps)"}


def test_each_seed_gets_its_own_baseline_and_the_spread_over_seeds(trained, monkeypatch):
    """--seeds repeats every point and its step-matched baseline per seed (training faked: the score
    depends on role and seed); sweep.md pairs each student with the baseline of its own seed."""
    calls = []

    def fake_run_point(cfg, splits, soft, role, device, info, steps_budget=None):
        steps = steps_budget or 3 * cfg.student.train.epochs
        calls.append((role, steps, cfg.seed))
        score = (0.5 + 0.1 * cfg.seed) if role == "student" else (0.4 + 0.05 * cfg.seed)
        return {"val_score": score, "steps": steps, "best_epoch": 1, "val": {"coarse/accuracy": score}, "seconds": 0.0}

    monkeypatch.setattr(sweep_mod, "run_point", fake_run_point)
    assert cli(sweep_mod.main, ["--config", str(trained), "--epochs", "1", "2", "--seeds", "3", "4"]) == 0
    assert sorted(calls) == sorted([("student", s, sd) for s in (3, 6) for sd in (3, 4)]
                                   + [("baseline", s, sd) for s in (3, 6) for sd in (3, 4)])
    out = trained.parent / "runs" / "tiny" / "sweep"
    records = {r["point"]: r for r in json.loads((out / "sweep.json").read_text())["records"]}
    assert records["a0.9-Tconfig-joint-mean-E2-S4"]["baseline"] == "labels-only baseline (6 steps, seed 4)"
    assert records["labels-only baseline (3 steps, seed 3)"]["group"] == "labels-only baseline (3 steps)"
    md = (out / "sweep.md").read_text()
    # Seed 3: student 0.8 vs baseline 0.55, seed 4: 0.9 vs 0.6 -> differences 0.25 and 0.30.
    assert "| a0.9-Tconfig-joint-mean-E1 | 3, 4 | 0.8500 ± 0.0707 | 85.0 ± 7.1 |" in md
    assert "| labels-only baseline (3 steps) | 3, 4 | 0.5750 ± 0.0354 | 57.5 ± 3.5 |" in md
    assert "| a0.9-Tconfig-joint-mean-E2 | 3, 4 | +0.2750 ± 0.0354 | +27.5 ± 3.5 |" in md
    assert "- a0.9-Tconfig-joint-mean-E1: above its baseline on the score with 2 of 2 seeds" in md
    for bad in (["1", "1"], ["-1"]):
        with pytest.raises(SystemExit) as exc:
            cli(sweep_mod.main, ["--config", str(trained), "--seeds", *bad])
        assert exc.value.code == 2


def test_a_tie_with_the_baseline_is_not_counted_above():
    """The seed tables from records alone: a student level with its seed's baseline is not 'above'."""
    def rec(point, group, seed, score, baseline=None):
        return {"point": point, "group": group, "seed": seed, "val_score": score, "baseline": baseline,
                "val": {"diagnosis/bleu": 100 * score}}

    records = [rec("s-S0", "s", 0, 0.7, "b-S0"), rec("s-S1", "s", 1, 0.6, "b-S1"),
               rec("b-S0", "b", 0, 0.5), rec("b-S1", "b", 1, 0.6)]
    text = seed_tables(records, [("diagnosis/bleu", "BLEU")])
    assert "| s | 0, 1 | +0.1000 ± 0.1414 | +10.0 ± 14.1 |" in text  # BLEU stays on its 0-100 scale
    assert "- s: above its baseline on the score with 1 of 2 seeds" in text
    # Without baselines (--no-baseline) the spread stays and no empty difference table is written.
    alone = seed_tables([dict(r, baseline=None) for r in records[:2]], [("diagnosis/bleu", "BLEU")])
    assert "| s | 0, 1 | 0.6500 ± 0.0707 | 65.0 ± 7.1 |" in alone and "minus" not in alone


def test_seed_zero_is_a_seed_and_one_length_pools_the_baselines(trained, monkeypatch):
    """With the config's seed elsewhere (5), --seeds 0 1 trains seed 0 for real (its own -S0 point);
    one training length gives the baselines one configuration; the tables are well formed, best first."""
    calls = []

    def fake_run_point(cfg, splits, soft, role, device, info, steps_budget=None):
        calls.append((role, cfg.seed, cfg.name))
        score = (0.5 + 0.1 * cfg.seed) if role == "student" else 0.45
        return {"val_score": score, "steps": 3, "best_epoch": 1, "val": {"coarse/accuracy": score}, "seconds": 0.0}

    monkeypatch.setattr(sweep_mod, "run_point", fake_run_point)
    assert cli(sweep_mod.main, ["--config", str(trained), "seed=5", "--seeds", "0", "1"]) == 0
    assert sorted((role, seed) for role, seed, _ in calls) == [("baseline", 0), ("baseline", 1),
                                                               ("student", 0), ("student", 1)]
    assert "a0.9-Tconfig-joint-mean-S0" in {name for _, _, name in calls}
    out = trained.parent / "runs" / "tiny" / "sweep"
    records = {r["point"]: r for r in json.loads((out / "sweep.json").read_text())["records"]}
    assert records["labels-only baseline (seed 0)"]["group"] == "labels-only baseline"
    md = (out / "sweep.md").read_text()
    assert md.index("| a0.9-Tconfig-joint-mean | 0, 1 |") < md.index("| labels-only baseline | 0, 1 |")
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every table's separator has one cell per header cell
        if line.startswith("|---"):
            assert line.count("|") == lines[i - 1].count("|"), lines[i - 1]


def test_one_seed_or_none_adds_no_seed_tables(trained, monkeypatch):
    def fake_run_point(cfg, splits, soft, role, device, info, steps_budget=None):
        return {"val_score": 0.5, "steps": 3, "best_epoch": 1, "val": {}, "seconds": 0.0}

    monkeypatch.setattr(sweep_mod, "run_point", fake_run_point)
    out = trained.parent / "runs" / "tiny" / "sweep"
    assert cli(sweep_mod.main, ["--config", str(trained), "--seeds", "2"]) == 0
    md = (out / "sweep.md").read_text()
    assert "| seed |" in md and "labels-only baseline (seed 2)" in md and "Over the seeds" not in md
    assert cli(sweep_mod.main, ["--config", str(trained)]) == 0
    assert "| seed |" not in (out / "sweep.md").read_text()


def test_sweep_trains_every_point_and_sorts_by_validation(trained, monkeypatch):
    seen = []
    real = sweep_mod.fit_student

    def spy(cfg, splits, role, device, info, soft, steps_budget=None):
        seen.append((role, cfg.student.kd.alpha, cfg.student.kd.default_temperature, dict(cfg.student.kd.temperatures),
                     soft.combination.weighting if soft is not None else None))
        return real(cfg, splits, role, device, info, soft, steps_budget)

    monkeypatch.setattr(sweep_mod, "fit_student", spy)
    args = ["--config", str(trained), "--alpha", "0.2", "0.9", "--temperature", "3", "--weighting", "mean",
            "quality_weighted", "--steps", "2"]
    assert cli(sweep_mod.main, args) == 0
    out = trained.parent / "runs" / "tiny" / "sweep"
    report = json.loads((out / "sweep.json").read_text())
    assert [t["name"] for t in report["tasks"]] == ["coarse", "fine", "diagnosis"]  # the table needs no other file
    records = report["records"]
    scores = [r["val_score"] for r in records]
    assert scores == sorted(scores, reverse=True) and len(records) == 5
    assert "labels-only baseline" in {r["point"] for r in records}
    # Each point really ran with its own alpha, temperature and ensemble weighting.
    students = sorted(s for s in seen if s[0] == "student")
    assert students == sorted(("student", a, 3.0, {}, w) for a in (0.2, 0.9) for w in ("mean", "quality_weighted"))
    for r in records:
        assert r["steps"] == 2  # the short budget (one epoch of 3 batches, capped), the baseline's too
        assert set(r["val"]) >= {"coarse/accuracy", "diagnosis/bleu"}
    point_dir = next(out.glob("*/a0.2-T3-joint-mean/student"))
    resolved = yaml.safe_load((point_dir / "config.yaml").read_text())
    assert resolved["student"]["kd"]["alpha"] == 0.2
    md = (out / "sweep.md").read_text()
    assert md.index(records[0]["point"]) < md.index(records[-1]["point"])  # best first
    # A second run resumes every finished point instead of training it again.
    before = (point_dir / "metrics.csv").stat().st_mtime_ns
    assert cli(sweep_mod.main, args) == 0
    assert (point_dir / "metrics.csv").stat().st_mtime_ns == before


@pytest.mark.parametrize("bad", [["--alpha", "1.5"], ["--temperature", "hot"]])
def test_bad_grid_values_exit_2_with_one_line(trained, bad, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own exit for --temperature
        raise SystemExit(cli(sweep_mod.main, ["--config", str(trained), *bad, "--steps", "1"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and ("alpha" in err[-1] or "temperature" in err[-1])

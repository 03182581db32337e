"""The linear probe (logistic regression on frozen backbone features) and the summary's floor flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_dataset, write_tiny_config

from deploy.contract import TaskSpec
from train.probe import fit_logistic
from train.summary import (
    behind_only,
    below_floors,
    comparison_lines,
    ensemble_behind_teachers,
    ensemble_versus,
    split_ties,
    validation_picks,
)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian classes in 5-D, separable up to a little overlap, on an odd scale and offset."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    x = centres[labels] + torch.randn(n, 5, generator=g) * 0.7
    return x * 50.0 + 300.0, labels  # standardisation must undo the scale


def test_logistic_regression_learns_and_generalises():
    x, y = _blobs(300, 0)
    model = fit_logistic(x, y, 3, c=1.0)
    x_test, y_test = _blobs(300, 1)
    probs = model.predict_proba(x_test)
    assert probs.shape == (300, 3) and torch.allclose(probs.sum(1), torch.ones(300))
    assert (probs.argmax(1) == y_test).float().mean() > 0.9


def test_logistic_regression_is_the_minimum_of_the_penalised_loss():
    x, y = _blobs(200, 2)
    c = 0.5
    model = fit_logistic(x, y, 3, c)
    z = ((x - model.mean) / model.std).double()
    w = model.weight.double().requires_grad_(True)
    b = model.bias.double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + w.pow(2).sum() / (2 * c * len(y))
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_smaller_c_means_stronger_l2():
    x, y = _blobs(200, 3)
    norms = [fit_logistic(x, y, 3, c).weight.norm().item() for c in (1e-3, 1e-1, 10.0)]
    assert norms[0] < norms[1] < norms[2]
    assert norms[0] < 0.2  # heavily penalised: nearly uniform predictions


def test_below_floor_flags_only_where_the_student_is_below():
    tasks = [TaskSpec("grade", "classification", tuple("abcde")), TaskSpec("risk", "classification", ("0", "1")),
             TaskSpec("report", "text")]
    rows = {"student": {"grade/accuracy": 0.50, "grade/macro_f1": 0.40, "risk/balanced_accuracy": 0.80,
                        "report/bleu": 60.0},
            "baseline": {"grade/accuracy": 0.55, "grade/macro_f1": 0.40, "risk/top1": 0.70, "risk/top5": 1.0,
                         "report/bleu": 61.5},
            "linear probe": {"grade/accuracy": 0.45, "grade/macro_f1": 0.42, "risk/balanced_accuracy": 0.82}}
    below = below_floors(rows, tasks)
    assert below == {"grade/accuracy": {"baseline": pytest.approx(-5.0)},
                     "grade/macro_f1": {"linear probe": pytest.approx(-2.0)},
                     "risk/balanced_accuracy": {"linear probe": pytest.approx(-2.0)},
                     "report/bleu": {"baseline": pytest.approx(-1.5)}}  # the probe has no text row
    assert below_floors({"student": rows["student"]}, tasks) == {}


def test_a_gap_within_one_paired_standard_error_is_a_tie():
    """0.5 (or exactly 1) point under the baseline with a 1-point standard error is level; 1.5 points under
    it, or any gap to the probe (no per-image outputs, no error), stays BELOW FLOOR."""
    below = {"a/accuracy": {"baseline": -0.5, "linear probe": -0.5}, "b/accuracy": {"baseline": -1.5},
             "c/bleu": {"baseline": -1.0}}
    se = {"baseline": {"a/accuracy": 1.0, "b/accuracy": 1.0, "c/bleu": 1.0}}
    gaps, ties = split_ties(below, se)
    assert gaps == {"a/accuracy": {"linear probe": -0.5}, "b/accuracy": {"baseline": -1.5}}
    assert ties == {"a/accuracy": {"baseline": [-0.5, 1.0]}, "c/bleu": {"baseline": [-1.0, 1.0]}}
    assert split_ties(below, {})[0] == below and split_ties(below, {})[1] == {}
    lines = comparison_lines({"deltas_points": {}, "below_floor": gaps, "level_with_floor": ties,
                              "ensemble_behind_teacher": {}})
    assert "- BELOW FLOOR b/accuracy: KD student -1.5 points vs the baseline" in lines
    assert any(line.startswith("- level with the baseline on a/accuracy: KD student -0.5") for line in lines)


def test_ensemble_behind_its_best_teacher_is_flagged_per_column():
    tasks = [TaskSpec("grade", "classification", tuple("abc")), TaskSpec("report", "text")]
    rows = {"t_grade": {"grade/accuracy": 0.70, "grade/balanced_accuracy": 0.60},
            "t_all": {"grade/accuracy": 0.74, "grade/balanced_accuracy": 0.50, "report/bleu": 40.0},
            "ensemble": {"grade/accuracy": 0.72, "grade/balanced_accuracy": 0.65, "report/bleu": 40.0}}
    behind = ensemble_behind_teachers(rows, ["t_grade", "t_all"], tasks)
    assert behind == {"grade/accuracy": ("t_all", pytest.approx(-2.0))}  # a tie (BLEU) is not behind


def test_the_ensemble_is_compared_with_the_teacher_validation_picks_not_the_best_on_test():
    """Validation picks t_grade for grade accuracy (0.80 vs 0.75) although t_all is better on test: the
    ensemble is +2 points against the pick and -2 against the best on test. A tie on validation keeps both
    teachers and compares with the better of them on test; a teacher without validation numbers or
    without the column is never picked."""
    tasks = [TaskSpec("grade", "classification", tuple("abc")), TaskSpec("report", "text")]
    rows = {"t_grade": {"grade/accuracy": 0.70, "grade/balanced_accuracy": 0.60},
            "t_all": {"grade/accuracy": 0.74, "grade/balanced_accuracy": 0.66, "report/bleu": 40.0},
            "t_new": {"grade/accuracy": 0.99, "report/bleu": 99.0},
            "ensemble": {"grade/accuracy": 0.72, "grade/balanced_accuracy": 0.65, "report/bleu": 41.0}}
    validation = {"t_grade": {"grade/accuracy": 0.80, "grade/balanced_accuracy": 0.70},
                  "t_all": {"grade/accuracy": 0.75, "grade/balanced_accuracy": 0.70, "report/bleu": 30.0},
                  "t_new": {}}
    teachers = ["t_grade", "t_all", "t_new"]
    picks = validation_picks(validation, teachers, tasks)
    assert picks == {"grade/accuracy": ["t_grade"], "grade/balanced_accuracy": ["t_grade", "t_all"],
                     "report/bleu": ["t_all"]}
    versus = ensemble_versus(rows, picks)
    assert versus == {"grade/accuracy": ("t_grade", pytest.approx(2.0)),
                      "grade/balanced_accuracy": ("t_all", pytest.approx(-1.0)),
                      "report/bleu": ("t_all", pytest.approx(1.0))}
    assert ensemble_behind_teachers(rows, teachers, tasks)["grade/accuracy"] == ("t_new", pytest.approx(-27.0))


def test_validation_picks_cover_joint_columns_and_tie_only_on_equal_scores():
    """Two teachers 0.1 point apart on validation are not tied (a tie is equal up to float rounding); a
    joint column is picked like any other; NaN and missing values are never picked; the ensemble without
    a column is not compared on it."""
    tasks = [TaskSpec("grade", "classification", tuple("abc")), TaskSpec("risk", "classification", tuple("xy"))]
    joint = [("grade", "risk")]
    j = "grade+risk/joint_accuracy"
    validation = {"t1": {"grade/accuracy": 0.801, j: 0.5, "risk/accuracy": float("nan")},
                  "t2": {"grade/accuracy": 0.800, j: 0.6, "risk/accuracy": 0.7},
                  "t3": {"grade/accuracy": 0.801 * (1 + 1e-12), j: None}}
    picks = validation_picks(validation, ["t1", "t2", "t3"], tasks, joint)
    assert picks["grade/accuracy"] == ["t1", "t3"] and picks[j] == ["t2"] and picks["risk/accuracy"] == ["t2"]
    assert j not in validation_picks(validation, ["t1", "t2", "t3"], tasks)
    rows = {"t1": {"grade/accuracy": 0.5}, "t2": {j: 0.4, "risk/accuracy": 0.9}, "t3": {"grade/accuracy": 0.6},
            "ensemble": {"grade/accuracy": 0.55, j: 0.5}}
    versus = ensemble_versus(rows, picks)
    assert versus == {"grade/accuracy": ("t3", pytest.approx(-5.0)), j: ("t2", pytest.approx(10.0))}
    assert behind_only(versus) == {"grade/accuracy": ("t3", pytest.approx(-5.0))}


def test_the_summary_lists_the_ensemble_against_each_validation_pick():
    picks = {"a/accuracy": {"teachers": ["t1"], "validation": 80.0, "versus": "t1", "ensemble_minus": 2.0},
             "b/accuracy": {"teachers": ["t1", "t2"], "validation": 70.0, "versus": "t2", "ensemble_minus": -0.5},
             "c/bleu": {"teachers": ["t2"], "validation": 30.0, "versus": "t2", "ensemble_minus": -3.0}}
    lines = comparison_lines({"deltas_points": {}, "below_floor": {}, "ensemble_behind_teacher": {},
                              "ensemble_vs_validation_pick": picks,
                              "ensemble_behind_validation_pick": {"c/bleu": ["t2", -3.0]},
                              "ensemble_level_with_validation_pick": {"b/accuracy": {"t2": [-0.5, 0.8]}},
                              "teachers_without_validation_record": ["t3"]})
    assert "- a/accuracy: t1, validation 80.0: ensemble +2.0 points" in lines
    assert ("- b/accuracy: t2 (t1 / t2 tie on validation; the better on test), validation 70.0: ensemble -0.5 "
            "points, level: within one standard error (0.8) of the paired difference") in lines
    assert "- ENSEMBLE BEHIND on c/bleu: t2, validation 30.0: ensemble -3.0 points" in lines
    assert "- left out of the picks, no validation record (last.json) in their folder: t3" in lines
    assert not any("validation picks" in line for line in comparison_lines(
        {"deltas_points": {}, "below_floor": {}, "ensemble_behind_teacher": {}}))  # an older summary.json


@pytest.mark.slow
def test_probe_row_and_floor_flags_appear_in_a_tiny_runs_summary(tmp_path: Path):
    import train.teachers as teachers_mod
    from train.distributed import DistInfo
    from train.experiment import load_experiment
    from train.stage import load_splits
    from train.student import run as run_student

    data = make_tiny_dataset(tmp_path / "data")
    cfg = load_experiment(write_tiny_config(tmp_path / "c.yaml", data, tmp_path / "runs", **{
        "teachers.members": [{"name": "t_all", "tasks": ["coarse", "fine", "diagnosis"]}],
        "teachers.train.epochs": 1, "student.train.epochs": 1}))
    splits = load_splits(cfg)
    teachers_mod.train_teacher(cfg, cfg.teachers.members[0], splits, torch.device("cpu"), DistInfo())
    run_student(cfg, DistInfo(), torch.device("cpu"))
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    probe = summary["rows"]["linear probe"]
    assert {"coarse/accuracy", "fine/top1"} <= set(probe) and "diagnosis/bleu" not in probe
    assert probe["coarse/accuracy"] >= 0.6  # colour is linear in any features worth the name; chance is 1/3
    md = (cfg.run_dir / "summary.md").read_text()
    assert "| linear probe |" in md and "Floors" in md
    for key, floors in summary["below_floor"].items():
        for floor, gap in floors.items():
            assert gap < 0 and f"BELOW FLOOR {key}" in md
            assert summary["rows"]["student"][key] < summary["rows"][floor][key]
    record = json.loads((cfg.run_dir / "probe" / "final.json").read_text())
    assert set(record["C"]) == {"coarse", "fine"} and record["image_size"] == 32


def test_each_ensemble_comparison_keeps_its_own_gaps_and_the_teachers_run_once(monkeypatch):
    """train.summary.ensemble_comparisons: the best teacher on test (t1) and the validation pick (t2)
    are split into behind / level separately, with one cache of teacher outputs for both."""
    from types import SimpleNamespace

    import train.summary as summary_mod

    tasks = [TaskSpec("grade", "classification", tuple("abc"))]
    splits = SimpleNamespace(data=SimpleNamespace(spec=SimpleNamespace(tasks=tasks, joint=[])))
    rows = {"t1": {"grade/accuracy": 0.90}, "t2": {"grade/accuracy": 0.85}, "ensemble": {"grade/accuracy": 0.80}}
    pick = {"teachers": ["t2"], "validation": 95.0, "versus": "t2", "ensemble_minus": -5.0}
    caches = []

    def fake_gaps(cfg, splits, behind, ensemble_test, test, device, cache):
        caches.append(cache)
        (key, (teacher, gap)), = behind.items()
        return ({}, {key: {teacher: [gap, 99.0]}}) if teacher == "t2" else ({key: (teacher, gap)}, {})

    monkeypatch.setattr(summary_mod, "ensemble_gaps", fake_gaps)
    monkeypatch.setattr(summary_mod, "versus_validation_picks", lambda *a: ({"grade/accuracy": pick}, ["t3"]))
    out = summary_mod.ensemble_comparisons(None, splits, rows, ["t1", "t2"], {}, None, "cpu")
    assert out["ensemble_behind_teacher"] == {"grade/accuracy": ("t1", pytest.approx(-10.0))}
    assert out["ensemble_level_with_teacher"] == {} and out["ensemble_behind_validation_pick"] == {}
    assert out["ensemble_level_with_validation_pick"] == {"grade/accuracy": {"t2": [-5.0, 99.0]}}
    assert out["ensemble_vs_validation_pick"] == {"grade/accuracy": pick}
    assert out["teachers_without_validation_record"] == ["t3"]
    assert len(caches) == 2 and caches[0] is caches[1]

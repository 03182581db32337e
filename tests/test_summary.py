"""The summary's comparison of the ensemble with its teachers in test NLL (train/summary.py, calibrate.held_out_nll)."""

from __future__ import annotations

import json

import pytest
import torch

from train.calibrate import teacher_ensemble
from train.ensemble import Combination
from train.experiment import load_experiment
from train.stage import load_splits


@torch.no_grad()
def test_the_summary_scores_the_ensemble_and_each_teacher_by_test_nll(trained_run):
    """held_out_nll against a hand computation with a crafted combination (its own temperature and weight
    per teacher), on the test split's labelled images and reference tokens; the summary stores it for the
    fitted combination."""
    from train.calibrate import held_out_nll, validation_logits
    from train.experiment import role_preprocessing
    from train.stage import image_set

    cfg = load_experiment(trained_run.config)
    splits = load_splits(cfg)
    ensemble, fitted = teacher_ensemble(cfg, splits, torch.device("cpu"))
    test = image_set(splits, splits.test, splits.data.spec.tasks, role_preprocessing(cfg, "teachers"))
    logits = validation_logits(ensemble, test, torch.device("cpu"))
    assert set(logits) == {"coarse", "fine", "diagnosis"}
    crafted = Combination("quality_weighted", fitted.teachers)
    assert max(z.shape[0] for z, _, _ in logits.values()) >= 2  # a task whose weights move the mixture
    for task, (z, _, _) in logits.items():
        n = z.shape[0]
        crafted.temperatures[task] = [0.5 + i for i in range(n)]
        crafted.weights[task] = [2.0 * (i + 1) / (n * (n + 1)) for i in range(n)]  # 1:2:3..., sums to 1
    scores = held_out_nll(ensemble, crafted, test, torch.device("cpu"))
    for task, (z, labels, _) in logits.items():
        temps, weights = crafted.temperatures[task], crafted.weights[task]
        probs = [(zi / t).softmax(-1)[torch.arange(len(labels)), labels] for zi, t in zip(z, temps)]
        mixture = sum(w * p for w, p in zip(weights, probs))
        names = [fitted.teachers[i] for i in ensemble._members(task)]
        assert scores[task]["ensemble"] == pytest.approx(float(-mixture.log().mean()), rel=1e-5)
        assert scores[task]["teachers"] == pytest.approx({m: float(-p.log().mean()) for m, p in zip(names, probs)},
                                                          rel=1e-5)
        assert scores[task]["rows"] == len(labels) == int((labels >= 0).sum())
        assert scores[task]["unit"] == ("tokens" if task == "diagnosis" else "images")
    summary = json.loads(cfg.layout.summary("json").read_text())
    stored, now = summary["ensemble_test_nll"], held_out_nll(ensemble, fitted, test, torch.device("cpu"))
    assert set(stored) == set(now)
    for task, d in now.items():
        assert stored[task]["ensemble"] == pytest.approx(d["ensemble"], rel=1e-5)
        assert stored[task]["teachers"] == pytest.approx(d["teachers"], rel=1e-5)
    assert "in test NLL" in cfg.layout.summary("md").read_text()


def test_nll_lines_name_the_teachers_below_the_ensemble():
    from train.summary import nll_lines

    summary = {"ensemble_test_nll": {
        "coarse": {"unit": "images", "rows": 190, "ensemble": 0.26, "teachers": {"a": 0.27, "b": 0.5}},
        "fine": {"unit": "images", "rows": 190, "ensemble": 1.5, "teachers": {"a": 1.4, "b": 1.45, "c": 1.6}},
        "diagnosis": {"unit": "tokens", "rows": 3234, "ensemble": 0.33, "teachers": {"d": 0.33}}}}
    lines = nll_lines(summary)
    assert lines[-3:] == ["- coarse (190 images): ensemble 0.2600, best teacher a 0.2700",
                          "- ENSEMBLE NLL ABOVE a, b on fine (190 images): ensemble 1.5000, best teacher a 1.4000",
                          "- diagnosis (3234 tokens): ensemble 0.3300, best teacher d 0.3300"]  # a tie is not above
    assert nll_lines({}) == [] and nll_lines({"ensemble_test_nll": {}}) == []

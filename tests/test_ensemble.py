"""The teacher ensemble's combination: temperature calibration, quality weights, soft targets = export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_dataset, tiny_model, write_tiny_config

import train.student as student_mod
from deploy.contract import TaskSpec
from train.calibrate import (
    calibrated_probs,
    choose_shrinkage,
    cv_folds,
    fit_mixture_weights,
    fit_task,
    fit_temperature,
    format_report,
    nll,
    teacher_ensemble,
    true_class_probs,
)
from train.ensemble import (
    Combination,
    SoftTargets,
    StaleCombination,
    TeacherEnsemble,
    attach_stored_combination,
)
from train.experiment import load_experiment
from train.loop import StaleCheckpoint
from train.models.multitask import ModelConfig, MultiTaskNet
from train.stage import load_splits


def _teacher_logits(n: int, classes: int, accuracy: float, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and logits that put `scale` on a class that is right with probability `accuracy`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    wrong = (labels + torch.randint(1, classes, (n,), generator=g)) % classes
    picked = torch.where(torch.rand(n, generator=g) < accuracy, labels, wrong)
    logits = torch.randn(n, classes, generator=g) * 0.3
    logits[torch.arange(n), picked] += scale
    return logits, labels


def test_calibration_lowers_the_nll_of_an_overconfident_teacher():
    logits, labels = _teacher_logits(400, 5, accuracy=0.7, scale=12.0, seed=0)  # 70 % right, ~100 % sure
    t = fit_temperature(logits, labels)
    before, after = nll(logits.softmax(-1), labels), nll((logits / t).softmax(-1), labels)
    assert t > 2.0  # softened
    assert after < 0.5 * before
    # The fit is the minimum: nearby temperatures are no better.
    for other in (0.8 * t, 1.25 * t):
        assert nll((logits / other).softmax(-1), labels) >= after - 1e-4


def test_calibration_sharpens_an_underconfident_teacher_and_keeps_its_argmax():
    logits, labels = _teacher_logits(400, 5, accuracy=0.95, scale=0.5, seed=1)
    t = fit_temperature(logits, labels)
    assert t < 1.0
    temps, _, report = fit_task(logits[None], labels, "calibrated_mean")
    assert temps == [pytest.approx(t)]
    assert report["nll_calibrated"][0] < report["nll_raw"][0]
    assert report["accuracy"][0] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


def test_quality_weights_favour_the_better_teacher():
    good, labels = _teacher_logits(500, 4, accuracy=0.9, scale=3.0, seed=2)
    bad = torch.randn(500, 4, generator=torch.Generator().manual_seed(4))  # an uninformative teacher
    temps, weights, report = fit_task(torch.stack([bad, good]), labels, "quality_weighted")
    assert weights[1] > 0.8 and weights[0] < 0.2 and sum(weights) == pytest.approx(1.0)
    # Never worse on validation than the best single calibrated teacher (a corner of the simplex)...
    assert report["ensemble_nll"] <= min(report["nll_calibrated"]) + 1e-6
    # ...and better than the equal vote.
    _, equal, mean_report = fit_task(torch.stack([bad, good]), labels, "calibrated_mean")
    assert equal == [0.5, 0.5] and report["ensemble_nll"] < mean_report["ensemble_nll"]
    assert not report["below_best_teacher"]


def test_an_ensemble_below_its_best_teacher_is_reported():
    good, labels = _teacher_logits(300, 4, accuracy=0.9, scale=3.0, seed=5)
    noise = [torch.randn(300, 4, generator=torch.Generator().manual_seed(s)) * 5 for s in (6, 7)]
    temps, weights, report = fit_task(torch.stack([good, *noise]), labels, "mean")
    assert report["below_best_teacher"]
    comb = Combination("mean", ["good", "n1", "n2"], {"coarse": temps}, {"coarse": weights})
    rep = {"teachers": ["good", "n1", "n2"], "temperature": temps, "weight": weights, **report}
    warning = format_report(comb, {"coarse": rep}).split("WARNING coarse")[1]
    right = [round(300 * a) for a in (report["ensemble_accuracy"], max(report["accuracy"]))]
    assert f"gets {right[0]} of 300 validation images right, its best teacher {right[1]}" in warning
    assert "ensemble_weighting=quality_weighted" in warning
    # Already quality-weighted: the advice is stronger teachers, not the weighting it has.
    weighted = format_report(dataclasses.replace(comb, weighting="quality_weighted"), {"coarse": rep})
    assert "WARNING coarse" in weighted and "ensemble_weighting=" not in weighted


def test_near_equal_teachers_on_a_small_validation_split_get_the_equal_vote():
    """The in-sample mixture fit favours whichever teacher was luckiest on 60 images; cross-validation
    sees that it does worse on held-out images than the equal vote, and shrinks the weights to it."""
    labels = _teacher_logits(60, 5, 0.8, 2.0, seed=10)[1]
    logits = []
    for seed in (11, 12, 13, 14):  # same quality, independent mistakes
        g = torch.Generator().manual_seed(seed)
        right = torch.rand(60, generator=g) < 0.8
        picked = torch.where(right, labels, (labels + torch.randint(1, 5, (60,), generator=g)) % 5)
        lg = torch.randn(60, 5, generator=g)
        lg[torch.arange(60), picked] += 4.0
        logits.append(lg)
    logits = torch.stack(logits)
    _, weights, report = fit_task(logits, labels, "quality_weighted")
    in_sample = fit_mixture_weights(true_class_probs(calibrated_probs(logits, [fit_temperature(lg, labels) for lg in logits]), labels))
    assert max(in_sample) - min(in_sample) > 0.2  # the unshrunk fit picks favourites
    assert report["cv_nll"]["0"] > report["cv_nll"][f"{report['shrinkage']:g}"]  # ...and does worse held out
    assert report["shrinkage"] >= 0.75 and max(weights) - min(weights) < 0.1
    assert "shrunk towards the equal vote by s = " in format_report(
        Combination("quality_weighted", list("abcd")), {"coarse": {"teachers": list("abcd"), "temperature": [1.0] * 4,
                                                                    "weight": weights, **report}})


def test_a_clearly_better_teacher_keeps_its_weight_under_cross_validation():
    good, labels = _teacher_logits(300, 4, accuracy=0.9, scale=3.0, seed=2)
    noise = [torch.randn(300, 4, generator=torch.Generator().manual_seed(s)) * 3 for s in (3, 4)]
    _, weights, report = fit_task(torch.stack([good, *noise]), labels, "quality_weighted")
    assert report["shrinkage"] <= 0.1 and weights[0] > 0.85
    assert min(report["cv_nll"].values()) == report["cv_nll"][f"{report['shrinkage']:g}"]


def test_cross_validation_folds_hold_out_whole_images():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 6, 6])  # e.g. a sentence's tokens share its image
    folds = cv_folds(groups, folds=3)
    for g in groups.unique():
        assert folds[groups == g].unique().numel() == 1
    assert sorted(folds.unique().tolist()) == [0, 1, 2]
    assert cv_folds(groups, folds=8) is None  # 7 images cannot fill 8 folds
    _, weights, report = fit_task(torch.randn(3, 4, 5), torch.tensor([0, 1, 2, 3]), "quality_weighted")
    assert report["cv_nll"] == {} and report["shrinkage"] == 1.0 and weights == [pytest.approx(1 / 3)] * 3
    assert choose_shrinkage({0.0: 0.5, 0.5: 0.4, 1.0: 0.4}) == 1.0  # a tie goes to the equal vote


def test_mixture_weights_stay_equal_for_identical_teachers():
    p = torch.rand(1, 50).clamp_min(0.05).expand(3, -1)
    assert fit_mixture_weights(p).tolist() == pytest.approx([1 / 3] * 3)


def _tiny_teachers() -> tuple[list[MultiTaskNet], list[TaskSpec]]:
    tasks = [TaskSpec("coarse", "classification", ("a", "b", "c")), TaskSpec("fine", "classification", ("x", "y"))]
    cfg = ModelConfig(**{**tiny_model(), "decoder_context": False})
    torch.manual_seed(0)
    return [MultiTaskNet(cfg, tasks, None, 1).eval(), MultiTaskNet(cfg, tasks[:1], None, 1).eval()], tasks


def test_soft_targets_and_the_exported_ensemble_combine_alike():
    teachers, tasks = _tiny_teachers()
    ensemble = TeacherEnsemble(teachers, tasks).eval()
    comb = Combination("quality_weighted", ["t0", "t1"], temperatures={"coarse": [2.0, 0.5], "fine": [3.0]},
                       weights={"coarse": [0.8, 0.2], "fine": [1.0]})
    images = torch.randn(5, 3, 32, 32)
    plain = ensemble(images)
    ensemble.set_combination(comb)
    with torch.no_grad():
        combined = ensemble(images)
        _, logits = ensemble.teacher_outputs(images)
    soft = SoftTargets(logits={k: torch.stack(v) for k, v in logits.items()}, combination=comb)
    for task in ("coarse", "fine"):
        assert torch.allclose(soft.class_probs(task, torch.arange(5), 1.0), combined[task], atol=1e-6)
    expected = 0.8 * (logits["coarse"][0] / 2.0).softmax(-1) + 0.2 * (logits["coarse"][1] / 0.5).softmax(-1)
    assert torch.allclose(combined["coarse"], expected, atol=1e-6)
    assert not torch.allclose(plain["coarse"], combined["coarse"])
    # At the KD temperature the calibrated logits are softened once more: softmax(z / (T_i * T_kd)).
    kd = soft.class_probs("fine", torch.tensor([1, 3]), 4.0)
    assert torch.allclose(kd, (logits["fine"][0][[1, 3]] / 12.0).softmax(-1), atol=1e-6)
    # kl_sum averages the teachers' KL equally: it refuses unequal weights rather than ignore them.
    with pytest.raises(ValueError, match="kl_sum"):
        soft.class_probs("coarse", torch.arange(5), 1.0, per_teacher=True)


def _text_teachers() -> tuple[list[MultiTaskNet], list[TaskSpec]]:
    """Two untrained teachers with a text head (different seeds: they write different sentences)."""
    tasks = [TaskSpec("diagnosis", "text")]
    cfg = ModelConfig(**{**tiny_model(), "decoder_context": False})
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(MultiTaskNet(cfg, tasks, 11, 6).eval())
    return teachers, tasks


@torch.no_grad()
def test_text_teachers_vote_with_their_weights_in_decoding_and_in_the_token_targets():
    teachers, tasks = _text_teachers()
    images = torch.randn(8, 3, 32, 32)
    alone = [TeacherEnsemble([t], tasks).eval().decode([t.features(images)])[0] for t in teachers]
    assert not torch.equal(alone[0], alone[1])  # else the weights could not show
    ensemble = TeacherEnsemble(teachers, tasks).eval()
    feats = [t.features(images) for t in teachers]
    for k in (0, 1):  # all the weight on one teacher: the ensemble writes that teacher's sentences
        weights = [1.0 - k, float(k)]
        ensemble.set_combination(Combination("quality_weighted", ["t0", "t1"], {"diagnosis": [1.0, 1.0]},
                                             {"diagnosis": weights}))
        assert torch.equal(ensemble.decode(feats)[0], alone[k])
    # The student's token targets: sum_i w_i softmax(z_i / (T_i * T_kd)) along the cached tokens.
    tokens, logits = ensemble.decode(feats)
    comb = Combination("quality_weighted", ["t0", "t1"], {"diagnosis": [2.0, 0.5]}, {"diagnosis": [0.7, 0.3]})
    soft = SoftTargets(logits={}, text_tokens=tokens, text_logits=logits, combination=comb)
    idx = torch.tensor([5, 1])
    expected = 0.7 * (logits[0][idx] / 4.0).softmax(-1) + 0.3 * (logits[1][idx] / 1.0).softmax(-1)
    assert torch.allclose(soft.token_probs("diagnosis", idx, 2.0), expected, atol=1e-6)
    with pytest.raises(ValueError, match="kl_sum"):
        soft.token_probs("diagnosis", idx, 2.0, per_teacher=True)


def test_stored_combination_is_refused_for_other_checkpoints(tmp_path: Path):
    teachers, tasks = _tiny_teachers()
    ckpt = tmp_path / "teachers" / "t0" / "best.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    comb = Combination("calibrated_mean", ["t0"], temperatures={"coarse": [3.0]}, weights={"coarse": [1.0]},
                       hashes={"t0": "not the hash of these weights"})
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "combination.json").write_text(json.dumps({"combination": comb.to_dict()}))
    with pytest.raises(StaleCombination, match="make student"):
        attach_stored_combination(TeacherEnsemble(teachers[:1], tasks[:1]), tmp_path, [ckpt])


@torch.no_grad()
def test_validation_token_logits_skip_padding_and_line_up_with_the_reference():
    from deploy.vocab import PAD_ID
    from train.calibrate import validation_logits

    teachers, tasks = _text_teachers()
    refs = torch.tensor([[4, 5, 2, PAD_ID, PAD_ID, PAD_ID], [6, 7, 8, 9, 2, PAD_ID], [PAD_ID] * 6])  # 3rd: no text
    rows = [{"image": torch.randn(3, 32, 32), "diagnosis": r} for r in refs]
    logits, labels, images_of = validation_logits(TeacherEnsemble(teachers, tasks).eval(), rows,
                                                  torch.device("cpu"))["diagnosis"]
    keep = refs != PAD_ID
    assert labels.tolist() == refs[keep].tolist()  # 3 + 5 reference tokens, <eos> included
    assert images_of.tolist() == [0] * 3 + [1] * 5  # each token knows its sentence (cross-validation folds)
    images = torch.stack([r["image"] for r in rows])
    for i, teacher in enumerate(teachers):  # step j is the teacher-forced prediction of token j
        forced = teacher(images, text_targets=refs)["diagnosis"]
        assert torch.allclose(logits[i], forced[keep], atol=1e-5)


# --- on a tiny trained run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Two tiny teachers trained for 2 epochs, then the student + baseline + summary (in process)."""
    import train.teachers as teachers_mod
    from train.distributed import DistInfo

    root = tmp_path_factory.mktemp("ens")
    data = make_tiny_dataset(root / "data")
    cfg_path = write_tiny_config(root / "cfg.yaml", data, root / "runs", **{
        "teachers.train.epochs": 2, "student.train.epochs": 1, "teachers.ensemble_weighting": "quality_weighted"})
    cfg = load_experiment(cfg_path)
    splits = load_splits(cfg)
    for spec in cfg.teachers.members:
        teachers_mod.train_teacher(cfg, spec, splits, torch.device("cpu"), DistInfo())
    student_mod.run(cfg, DistInfo(), torch.device("cpu"))
    return cfg_path


def test_weights_are_reported_and_used_by_soft_targets(tiny_run: Path):
    run = tiny_run.parent / "runs" / "tiny"
    record = json.loads((run / "ensemble" / "combination.json").read_text())
    assert record["combination"]["weighting"] == "quality_weighted"
    for task in ("coarse", "fine"):
        rep = record["report"][task]
        assert rep["teachers"] == ["t_cls", "t_all"] and sum(rep["weight"]) == pytest.approx(1.0)
    assert "| t_cls |" in (run / "ensemble" / "combination.md").read_text()
    cfg = load_experiment(tiny_run)
    soft = student_mod.teacher_soft_targets(cfg, load_splits(cfg), torch.device("cpu"), student_mod.DistInfo())
    assert soft.combination.to_dict() == record["combination"]


@torch.no_grad()
def test_the_text_task_is_fitted_on_the_teacher_forced_reference_tokens(tiny_run: Path):
    """The diagnosis gets a temperature and weight like the classification tasks, fitted on every
    reference token of validation (step j scored against token j, padding left out)."""
    from deploy.vocab import PAD_ID
    from train.experiment import role_preprocessing
    from train.models.saved import load_model
    from train.stage import image_set

    run = tiny_run.parent / "runs" / "tiny"
    rep = json.loads((run / "ensemble" / "combination.json").read_text())["report"]["diagnosis"]
    assert rep["teachers"] == ["t_all"] and rep["unit"] == "tokens" and rep["weight"] == [1.0]
    assert "shrinkage" not in rep  # one teacher: nothing to cross-validate, no shrinkage line in the report
    cfg = load_experiment(tiny_run)
    splits = load_splits(cfg)
    val = image_set(splits, splits.val, splits.data.spec.tasks, role_preprocessing(cfg, "teachers"))
    refs = torch.stack([val[i]["diagnosis"] for i in range(len(val))])
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    model, _ = load_model(run / "teachers" / "t_all" / "best.safetensors")
    logits = model.eval()(images, text_targets=refs)["diagnosis"]  # teacher-forced [N, L, V]
    keep = refs != PAD_ID
    assert rep["validation_rows"] == int(keep.sum())
    assert rep["accuracy"][0] == pytest.approx(float((logits.argmax(-1) == refs)[keep].float().mean()))
    assert rep["nll_raw"][0] == pytest.approx(nll(logits[keep].softmax(-1), refs[keep]), rel=1e-4)


def test_soft_target_cache_is_invalidated_when_the_weighting_changes(tiny_run: Path, monkeypatch):
    calls = []
    real = student_mod.compute_soft_targets
    monkeypatch.setattr(student_mod, "compute_soft_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    cpu, info = torch.device("cpu"), student_mod.DistInfo()
    cfg = load_experiment(tiny_run)
    splits = load_splits(cfg)
    student_mod.teacher_soft_targets(cfg, splits, cpu, info)
    assert calls == []  # same teachers, rows and combination: the cache is reused
    other = load_experiment(tiny_run, ["teachers.ensemble_weighting=calibrated_mean"])
    soft = student_mod.teacher_soft_targets(other, splits, cpu, info)
    assert calls == [1]  # other weights: recomputed
    assert soft.combination.weighting == "calibrated_mean"
    assert set(soft.combination.weights["coarse"]) == {0.5}
    ensemble, comb = teacher_ensemble(other, splits, cpu)
    assert comb.to_dict() == soft.combination.to_dict()
    assert torch.allclose(ensemble.weight[0], torch.tensor([0.5, 0.5]))


def test_exported_ensemble_carries_the_fitted_combination(tiny_run: Path):
    from compress.export import export_all
    from compress.onnx_eval import open_onnx, run_onnx
    from train.experiment import role_preprocessing
    from train.stage import image_set

    cfg = load_experiment(tiny_run)
    splits = load_splits(cfg)
    ensemble, comb = teacher_ensemble(cfg, splits, torch.device("cpu"))  # writes combination.json
    assert comb.weighting == "quality_weighted" and any(t != 1.0 for t in comb.temperatures["coarse"])
    export_all(str(tiny_run), ["compress.models=[ensemble]"])
    data = image_set(splits, splits.val, splits.data.spec.tasks, role_preprocessing(cfg, "teachers"))
    onnx_out = run_onnx(open_onnx(cfg.layout.onnx("ensemble")), data)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        expected = ensemble(images)["coarse"].numpy()
    assert abs(onnx_out["coarse"] - expected).max() < 1e-4


def test_a_student_from_other_ensemble_weights_is_not_reused(tiny_run: Path):
    from train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(tiny_run.parent / "runs" / "tiny" / "student" / "last.safetensors")
    assert json.loads(meta["fingerprint"])["ensemble"]["weighting"] == "quality_weighted"
    cfg = load_experiment(tiny_run, ["teachers.ensemble_weighting=calibrated_mean"])
    splits = load_splits(cfg)
    soft = student_mod.teacher_soft_targets(cfg, splits, torch.device("cpu"), student_mod.DistInfo())
    with pytest.raises(StaleCheckpoint, match="another config"):  # not silently "resumed" as finished
        student_mod.fit_student(cfg, splits, "student", torch.device("cpu"), student_mod.DistInfo(), soft)


def test_retuning_kd_retrains_the_student_but_not_the_baseline(tiny_run: Path):
    """The baseline never sees KD, so a KD key is not part of its fingerprint (a user retuning the
    temperature should not pay for the baseline again); the student's fingerprint has it."""
    from train.checkpoint import load_checkpoint

    run = tiny_run.parent / "runs" / "tiny"
    student = json.loads(load_checkpoint(run / "student" / "last.safetensors")[1]["fingerprint"])
    baseline = json.loads(load_checkpoint(run / "baseline" / "last.safetensors")[1]["fingerprint"])
    assert "kd" in student and "kd" not in baseline

"""Clinical numbers with uncertainty: the patient bootstrap against the binomial case, the weighted
metrics against train.metrics, per-class sensitivity / specificity, the operating point chosen on
validation and applied to test, and the dataset's `normal:` declaration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deploy.contract import TaskSpec
from deploy.vocab import Vocabulary
from train import bootstrap as B
from train import metrics as M
from train.clinical import ClinicalError, any_disease, auroc, choose_threshold, one_vs_rest, rates
from train.config import ConfigError
from train.data.manifest import DatasetError, DatasetSpec
from train.experiment import load_experiment


def _wald(p: float, n: int) -> tuple[float, float]:
    half = 1.959964 * np.sqrt(p * (1 - p) / n)
    return p - half, p + half


def test_accuracy_interval_of_independent_patients_matches_the_binomial_one():
    """400 patients, one image each, 80 % right: the percentile interval is the normal one (±3.9 points)."""
    correct = np.r_[np.ones(320), np.zeros(80)]
    lo, hi = B.bootstrap_ci(B.mean_of(correct), [f"P{i}" for i in range(400)], n_resamples=2000, seed=1)
    wald = _wald(0.8, 400)
    assert lo == pytest.approx(wald[0], abs=0.006) and hi == pytest.approx(wald[1], abs=0.006)


def test_clustered_images_widen_the_interval():
    """200 patients whose two eyes share the outcome carry the information of 200 images, not 400: the
    interval is ~sqrt(2) wider than for 400 independent images with the same accuracy."""
    correct = np.repeat(np.r_[np.ones(160), np.zeros(40)], 2)
    independent = B.bootstrap_ci(B.mean_of(correct), [f"P{i}" for i in range(400)], seed=0)
    paired_eyes = B.bootstrap_ci(B.mean_of(correct), [f"P{i // 2}" for i in range(400)], seed=0)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(paired_eyes) / width(independent) == pytest.approx(np.sqrt(2), rel=0.15)
    assert paired_eyes[0] == pytest.approx(_wald(0.8, 200)[0], abs=0.01)


def test_seeded_and_chunked_resampling_give_the_same_interval():
    correct = np.random.default_rng(0).random(150) < 0.7
    groups = [i // 3 for i in range(150)]
    assert B.bootstrap_ci(B.mean_of(correct), groups, seed=3) == B.bootstrap_ci(B.mean_of(correct), groups, seed=3)
    weights = [np.concatenate(list(B.resample_weights(groups, 50, seed=3, chunk=c))) for c in (7, 50)]
    assert np.array_equal(*weights)
    assert weights[0].sum(axis=1).tolist() == [150.0] * 50  # as many patients drawn as there are


def test_paired_interval_of_a_difference():
    """Two models on the same images: identical outputs give [0, 0]; eight extra mistakes on eight of 200
    patients give an interval above 0 (beyond noise), one extra mistake one that includes 0."""
    base = (np.arange(200) % 10 < 7).astype(float)  # 70 % right
    groups = list(range(200))
    assert B.paired_bootstrap_ci(B.mean_of(base), B.mean_of(base), groups) == (0.0, 0.0)
    worse8, worse1 = base.copy(), base.copy()
    worse8[np.flatnonzero(base)[:8]] = 0
    worse1[np.flatnonzero(base)[:1]] = 0
    lo8, _ = B.paired_bootstrap_ci(B.mean_of(base), B.mean_of(worse8), groups)
    lo1, hi1 = B.paired_bootstrap_ci(B.mean_of(base), B.mean_of(worse1), groups)
    assert lo8 > 0 and lo1 <= 0 <= hi1
    assert hi1 <= 0.02  # paired: the 199 shared images cancel (unpaired, each accuracy alone is ±6 points)


def test_bootstrap_standard_error_of_an_accuracy_and_of_a_paired_difference():
    """400 independent patients at 80 %: the standard error is the binomial sqrt(p(1-p)/n) = 2 points; two
    models differing on 8 of 400 images: the paired difference's error is ~sqrt(8)/400, not ~2.8 points."""
    correct = np.r_[np.ones(320), np.zeros(80)]
    groups = [f"P{i}" for i in range(400)]
    values = B.resampled_values({"acc": B.mean_of(correct)}, groups, n_resamples=2000, seed=1)["acc"]
    assert B.standard_error(values) == pytest.approx(np.sqrt(0.8 * 0.2 / 400), rel=0.08)
    worse = correct.copy()
    worse[:8] = 0
    diff = B.resampled_values({"d": lambda w: B.mean_of(correct)(w) - B.mean_of(worse)(w)}, groups, 2000, 1)["d"]
    assert B.standard_error(diff) == pytest.approx(np.sqrt(8) / 400, rel=0.15)
    assert B.standard_error(np.array([0.5, np.nan])) is None  # one finite value has no spread


def _outputs(rng, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    probs = rng.dirichlet(np.ones(classes) * 0.7, size=n)
    labels = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, classes, n))
    labels[rng.random(n) < 0.05] = -1  # unlabelled images are left out, as in train.metrics
    return probs, labels


def _three_tasks(rng):
    """Outputs and targets of an ordinal, a nominal and a text task on 60 images, with the vocabulary."""
    tasks = [TaskSpec("grade", "classification", tuple("abcde"), ordinal=True),
             TaskSpec("fine", "classification", tuple("abcdefgh")), TaskSpec("diagnosis", "text")]
    words = ["mild", "moderate", "severe", "retinopathy", "left", "right", "eye", "with", "edema"]
    refs = [" ".join(rng.choice(words, size=rng.integers(3, 8))) for _ in range(60)]
    vocab = Vocabulary.build(refs, max_len=10)
    hyps = [r if rng.random() < 0.3 else " ".join(rng.choice(words, size=rng.integers(2, 8))) for r in refs]
    tokens = np.array([vocab.encode_padded(h) for h in hyps])
    refs[3] = ""  # no reference: excluded
    outputs, targets = {"diagnosis": tokens}, {"diagnosis": refs}
    for t in tasks[:2]:
        outputs[t.name], targets[t.name] = _outputs(rng, 60, t.num_classes)
    return tasks, outputs, targets, vocab


JOINT = [("grade", "fine")]


def test_every_weighted_metric_equals_train_metrics_at_unit_weights():
    """One rule per metric: at weights 1 the bootstrap's metrics are train.metrics.headline's numbers."""
    tasks, outputs, targets, vocab = _three_tasks(np.random.default_rng(0))
    expected = M.headline(M.evaluate(outputs, targets, tasks, vocab, joint=JOINT), tasks)
    weighted = B.headline_metrics(outputs, targets, tasks, vocab, JOINT)
    assert set(weighted) == set(expected)
    for key, value in expected.items():
        assert B.point(weighted[key], 60) == pytest.approx(value, abs=1e-9), key


def test_a_resample_scores_like_its_images_repeated():
    """A resample's weights are image counts: each metric (BLEU from summed sentence statistics included)
    equals train.metrics on the images repeated that often."""
    tasks, outputs, targets, vocab = _three_tasks(np.random.default_rng(1))
    weights = next(B.resample_weights([i // 2 for i in range(60)], 3, seed=5))
    weighted = B.headline_metrics(outputs, targets, tasks, vocab, JOINT)
    for row in weights:
        idx = np.repeat(np.arange(60), row.astype(int))
        repeated = {k: (np.asarray(v)[idx] if not isinstance(v, list) else [v[i] for i in idx])
                    for k, v in targets.items()}
        expected = M.headline(M.evaluate({k: v[idx] for k, v in outputs.items()}, repeated, tasks, vocab,
                                         joint=JOINT), tasks)
        for key, value in expected.items():
            assert weighted[key](row[None, :])[0] == pytest.approx(value, abs=1e-9), key


def test_auroc_counts_pairs_with_ties_half():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 6, 40) / 5.0  # many ties
    sick = rng.random(40) < 0.5
    pairs = [(1.0 if s > t else 0.5 if s == t else 0.0) for s, t in itertools.product(scores[sick], scores[~sick])]
    assert auroc(scores, sick) == pytest.approx(np.mean(pairs))


def test_sensitivity_and_specificity_per_class_from_a_confusion_matrix():
    cm = [[50, 3, 2],  # true normal
          [4, 30, 6],  # true dr
          [1, 0, 4]]  # true glaucoma
    out = one_vs_rest(cm, ("normal", "dr", "glaucoma"))
    assert out["dr"] == {"sensitivity": 75.0, "specificity": 95.0, "support": 40}  # 3 of 60 others called dr
    assert out["normal"]["sensitivity"] == round(100 * 50 / 55, 2)
    assert out["normal"]["specificity"] == round(100 * 40 / 45, 2)  # 45 diseased, 5 of them called normal
    assert out["glaucoma"]["specificity"] == round(100 * 87 / 95, 2)
    assert one_vs_rest([[3, 0], [0, 0]], ("a", "b"))["b"]["sensitivity"] is None


def test_operating_point_is_chosen_on_validation_and_applied_to_test():
    """Validation: diseased score 0.2..0.9, normal 0.05..0.45; 90 % sensitivity needs threshold 0.3.
    The test split's own best threshold would differ; the reported numbers use 0.3."""
    val_sick = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.2])
    val_normal = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.28, 0.32, 0.34, 0.4, 0.45])
    scores, sick = np.r_[val_sick, val_normal], np.r_[np.ones(10, bool), np.zeros(10, bool)]
    assert choose_threshold(scores, sick, "sensitivity", 0.9) == 0.3
    assert rates(scores, sick, 0.3) == (0.9, 0.6)
    youden = choose_threshold(scores, sick, "youden")
    sens, spec = rates(scores, sick, youden)
    assert sens + spec == max(sum(rates(scores, sick, t)) for t in scores)
    # as probabilities of a 2-class task with normal = class 0 (score = 1 - p(normal))
    to_probs = lambda s: np.c_[1 - s, s]  # noqa: E731
    labels = lambda sick_: np.where(sick_, 1, 0)  # noqa: E731
    test_scores = np.array([0.95, 0.31, 0.29, 0.1, 0.33, 0.2])
    test_sick = np.array([True, True, True, False, False, False])
    out = any_disease(to_probs(scores), labels(sick), to_probs(test_scores), labels(test_sick),
                      ["p0", "p1", "p2", "p3", "p4", "p5"], 0, "sensitivity", 0.9, n_resamples=200)
    assert out["threshold"] == pytest.approx(0.3)
    assert out["sensitivity"] == pytest.approx(200 / 3, abs=0.01)  # 0.29 is missed at 0.3
    assert out["specificity"] == pytest.approx(200 / 3, abs=0.01)  # 0.33 is referred
    assert out["validation"] == {"sensitivity": 90.0, "specificity": 60.0}
    assert set(out["ci95"]) == {"sensitivity", "specificity", "auroc"}
    lo, hi = out["ci95"]["sensitivity"]
    assert 0 <= lo <= out["sensitivity"] <= hi <= 100
    with pytest.raises(ClinicalError, match="diseased and normal"):
        choose_threshold(val_sick, np.ones(10, bool))


def test_normal_class_must_be_one_of_the_task_classes():
    task = {"name": "coarse", "kind": "classification", "classes": ["normal", "dr"], "normal": "healthy"}
    with pytest.raises(DatasetError, match="normal class 'healthy' is not one of its classes"):
        DatasetSpec.from_dict({"name": "d", "tasks": [task]})
    ok = DatasetSpec.from_dict({"name": "d", "tasks": [{**task, "normal": "normal"}]})
    assert ok.tasks[0].normal == "normal" and ok.to_dict()["tasks"][0]["normal"] == "normal"
    assert "normal" not in TaskSpec("c", "classification", ("a", "b")).to_dict()  # old contracts unchanged
    with pytest.raises(DatasetError, match="no normal class"):
        DatasetSpec.from_dict({"name": "d", "tasks": [{"name": "t", "kind": "text", "normal": "x"}]})


def test_declaring_normal_later_retrains_nothing(tmp_path):
    from types import SimpleNamespace

    from train.fit_check import dataset_fingerprint

    def fingerprint(normal):
        spec = SimpleNamespace(tasks=[TaskSpec("c", "classification", ("normal", "dr"), normal=normal)])
        return dataset_fingerprint(SimpleNamespace(spec=spec, vocabulary=None))

    assert fingerprint("normal") == fingerprint(None)


def test_the_synthetic_dataset_declares_its_normal_class():
    from train.data.synth.config import SynthConfig
    from train.data.synth.generate import dataset_spec

    assert dataset_spec(SynthConfig()).task("coarse").normal == "normal"


@pytest.mark.parametrize("override, message", [("clinical.target_sensitivity=90", "fraction in"),
                                               ("clinical.operating_point=best", "operating_point"),
                                               ("clinical.bootstrap_resamples=10", ">= 100")])
def test_clinical_config_is_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("configs/default.yaml", [override])


def test_the_summary_keeps_intervals_and_clinical_numbers(trained_run):
    """train.student's summary (the session's tiny run, whose coarse task declares `normal: red`)."""
    import json

    from train.experiment import load_experiment as load

    cfg = load(trained_run.config)
    summary = json.loads(cfg.layout.summary("json").read_text())
    assert set(summary["ci95"]) == {"ensemble", "student", "baseline"}
    se = summary["paired_se_points"]["baseline"]  # student - baseline on the same test images
    assert set(se) >= {"coarse/accuracy", "diagnosis/bleu"} and all(v is None or v >= 0 for v in se.values())
    for key, floors in summary["level_with_floor"].items():
        gap, err = floors["baseline"]
        assert -err <= gap < 0 and err == se[key]
    for key, floors in summary["below_floor"].items():  # a real gap to the baseline is beyond one error
        assert "baseline" not in floors or se.get(key) is None or -floors["baseline"] > se[key]
    for row, cis in summary["ci95"].items():
        assert "coarse/accuracy" in cis and "diagnosis/bleu" in cis
        lo, hi = cis["coarse/accuracy"]
        assert 0 <= lo - 0.006 <= 100 * summary["rows"][row]["coarse/accuracy"] <= hi + 0.006 <= 100.006
    clinical = summary["clinical"]
    assert clinical["model"] == "student" and set(clinical["per_class"]["coarse"]) == {"red", "green", "blue"}
    anyd = clinical["any_disease"]["coarse"]
    assert anyd["normal"] == "red" and set(anyd["rows"]) == {"ensemble", "student", "baseline"}
    student = anyd["rows"]["student"]
    assert {"threshold", "sensitivity", "specificity", "auroc", "ci95", "validation"} <= set(student)
    md = cfg.layout.summary("md").read_text()
    assert "95 % confidence intervals" in md and "Any disease vs `red`" in md


def test_the_summary_compares_the_ensemble_with_the_teacher_validation_picks(trained_run):
    """summary.json's ensemble_vs_validation_pick: per column the teacher best on validation (its kept checkpoint's
    record), the ensemble minus it on test, and every negative gap split into behind / level."""
    import json

    from train.experiment import load_experiment as load
    from train.experiment import teacher_specs
    from train.history import kept_validation
    from train.metrics import to_points

    cfg = load(trained_run.config)
    summary = json.loads(cfg.layout.summary("json").read_text())
    rows, picks = summary["rows"], summary["ensemble_vs_validation_pick"]
    teachers = [s.name for s in teacher_specs(cfg, [t["name"] for t in summary["tasks"]])]
    validation = {t: kept_validation(cfg.layout.teacher_dir(t)) for t in teachers}
    assert {"coarse/accuracy", "diagnosis/bleu"} <= set(picks)
    for key, p in picks.items():
        best = max(v[key] for v in validation.values() if key in v)
        assert p["versus"] in p["teachers"] and validation[p["versus"]][key] == best
        assert p["validation"] == pytest.approx(to_points(key, best))
        assert p["ensemble_minus"] == pytest.approx(to_points(key, rows["ensemble"][key] - rows[p["versus"]][key]))
    negative = {k for k, p in picks.items() if p["ensemble_minus"] < 0}
    split = set(summary["ensemble_behind_validation_pick"]) | set(summary["ensemble_level_with_validation_pick"])
    assert split == negative and summary["teachers_without_validation_record"] == []
    assert "Ensemble against the teacher validation picks" in cfg.layout.summary("md").read_text()


def _rewrite_validation(cfg, name: str, values: dict[str, float]) -> None:
    """Set `values` (validation metrics) in every history record of a teacher's resume-point sidecar."""
    import json

    from train.layout import LAST_CHECKPOINT, meta_sidecar

    sidecar = meta_sidecar(cfg.layout.teacher_dir(name) / LAST_CHECKPOINT)
    meta = json.loads(sidecar.read_text())
    for record in meta["history"]:
        record.update({f"val/{k}": v for k, v in values.items()})
    sidecar.write_text(json.dumps(meta))


def test_the_summary_follows_the_teachers_validation_records_not_test(trained_run, tmp_path):
    """With the teachers' validation records rewritten (coarse accuracy ranked against their order on
    test, fine accuracy tied), the rewritten summary compares the ensemble with the validation pick, the
    better on test of the tied ones, and splits the gaps against those teachers; a teacher without a
    validation record is left out of the picks and named."""
    import json

    import torch

    from train.distributed import DistInfo
    from train.experiment import load_experiment as load
    from train.experiment import teacher_specs
    from train.layout import LAST_CHECKPOINT, meta_sidecar
    from train.metrics import to_points
    from train.models.saved import load_model
    from train.stage import load_splits
    from train.student import summarize
    from train.summary import versus_validation_picks

    cfg = load(trained_run.copy(tmp_path))
    before = json.loads(cfg.layout.summary("json").read_text())
    rows, specs = before["rows"], teacher_specs(cfg, [t["name"] for t in before["tasks"]])
    coarse = sorted((s.name for s in specs if "coarse" in s.tasks), key=lambda t: rows[t]["coarse/accuracy"])
    fine = [s.name for s in specs if "fine" in s.tasks]
    assert len(coarse) >= 2 and len(fine) >= 2
    for rank, name in enumerate(coarse):  # the worst on test is the best on validation
        _rewrite_validation(cfg, name, {"coarse/accuracy": (len(coarse) - rank) / 10})
    for name in fine:
        _rewrite_validation(cfg, name, {"fine/accuracy": 0.5})
    models = {role: load_model(cfg.layout.checkpoint(role))[0].eval() for role in ("student", "baseline")}
    summarize(cfg, load_splits(cfg), models, torch.device("cpu"), DistInfo())
    summary = json.loads(cfg.layout.summary("json").read_text())
    picks, rows = summary["ensemble_vs_validation_pick"], summary["rows"]
    assert picks["coarse/accuracy"]["teachers"] == [coarse[0]] and picks["coarse/accuracy"]["versus"] == coarse[0]
    assert picks["coarse/accuracy"]["validation"] == pytest.approx(10.0 * len(coarse))
    tied = picks["fine/accuracy"]
    assert tied["teachers"] == fine and rows[tied["versus"]]["fine/accuracy"] == max(rows[t]["fine/accuracy"] for t in fine)
    for key, p in picks.items():
        assert p["ensemble_minus"] == pytest.approx(to_points(key, rows["ensemble"][key] - rows[p["versus"]][key]))
        behind = summary["ensemble_behind_validation_pick"].get(key)
        level = summary["ensemble_level_with_validation_pick"].get(key, {})
        assert (behind is not None or bool(level)) == (p["ensemble_minus"] < 0)
        assert (behind is None or behind[0] == p["versus"]) and set(level) <= {p["versus"]}
    meta_sidecar(cfg.layout.teacher_dir(coarse[0]) / LAST_CHECKPOINT).unlink()
    picks, unrecorded = versus_validation_picks(cfg, rows, [s.name for s in specs], [], [])
    assert unrecorded == [coarse[0]]


def test_an_ensemble_gap_within_one_paired_error_is_level_and_a_large_one_is_behind(trained_run):
    """The ensemble-behind-a-teacher check uses the floors' tie rule: the named teacher is run on test and
    the paired error of ensemble minus teacher decides (train.summary.ensemble_gaps)."""
    import torch

    from train.experiment import load_experiment as load
    from train.experiment import role_preprocessing, teacher_specs
    from train.stage import image_set, load_splits
    from train.summary import comparison_lines, ensemble_gaps, evaluate_ensemble

    cfg = load(trained_run.config)
    splits = load_splits(cfg)
    tasks = splits.data.spec.tasks
    _, ensemble, _ = evaluate_ensemble(cfg, splits, torch.device("cpu"))
    teacher = next(s.name for s in teacher_specs(cfg, splits.data.spec.task_names) if "coarse" in s.tasks)
    test = image_set(splits, splits.test, tasks, role_preprocessing(cfg, "student"))
    behind = {"coarse/accuracy": (teacher, -1e-6), "coarse/balanced_accuracy": (teacher, -99.0)}
    gaps, ties = ensemble_gaps(cfg, splits, behind, ensemble.test, test, torch.device("cpu"))
    assert gaps == {"coarse/balanced_accuracy": (teacher, -99.0)}
    gap, se = ties["coarse/accuracy"][teacher]
    assert gap == -1e-6 and 0 < se < 99
    summary = {"deltas_points": {}, "below_floor": {}, "ensemble_behind_teacher": gaps,
               "ensemble_level_with_teacher": ties}
    lines = "\n".join(comparison_lines(summary))
    assert f"ENSEMBLE BEHIND {teacher} on coarse/balanced_accuracy" in lines
    assert f"level with {teacher} on coarse/accuracy" in lines

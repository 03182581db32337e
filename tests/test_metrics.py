"""Tests of train/metrics.py on small hand-computed cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from deploy.contract import TaskSpec
from deploy.vocab import Vocabulary
from train.evaluate import selection_score
from train.metrics import (
    agreement,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    headline,
    primary_metric,
    quadratic_kappa,
    text_metrics,
)

CLASSES = ["a", "b", "c"]
# Four labelled samples and one without a label (-1), worked out by hand below.
PROBS = np.array([
    [0.7, 0.2, 0.1],  # true a, pred a
    [0.2, 0.5, 0.3],  # true a, pred b; a is 3rd -> only in top-3
    [0.1, 0.6, 0.3],  # true b, pred b
    [0.5, 0.1, 0.4],  # true c, pred a; c is 2nd -> in top-2
    [0.1, 0.1, 0.8],  # no label: must not count anywhere
])
LABELS = np.array([0, 0, 1, 2, -1])


def test_hand_computed_classification_metrics():
    m = classification_metrics(PROBS, LABELS, CLASSES)
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["top1"] == pytest.approx(0.5)
    assert m["top2"] == pytest.approx(0.75)
    assert "top3" not in m and "top5" not in m  # k >= C = 3: 100 % for any model, so not reported
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert m["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # F1 = 2TP / (support + predicted): a 2/4, b 2/3, c 0/1.
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert m["support"] == {"a": 2, "b": 1, "c": 1}
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.7, 0.2, 0.6, 0.4])))


def test_absent_classes_are_left_out_of_balanced_accuracy_but_predicted_ones_count_in_f1():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([0, 1, 1])  # class c is never true but is predicted once
    m = classification_metrics(probs, labels, CLASSES)
    assert m["per_class_recall"]["c"] is None
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    # a: 2/2 = 1, b: 2/(2+1) = 2/3, c: 0 (predicted, never true).
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_no_labelled_sample_gives_none_and_zero_count():
    m = classification_metrics(PROBS[:2], np.array([-1, -1]), CLASSES)
    assert m["n"] == 0 and m["accuracy"] is None and m["top2"] is None


def test_logits_and_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="not logits"):
        classification_metrics(np.array([[2.0, -1.0, 0.5]]), np.array([0]), CLASSES)
    with pytest.raises(ValueError, match="labels must be"):
        classification_metrics(PROBS[:1], np.array([3]), CLASSES)


def test_ece_perfectly_calibrated_and_overconfident():
    calibrated = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)  # 80 % right at confidence 0.8
    assert expected_calibration_error(calibrated, labels) == pytest.approx(0.0)
    overconfident = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)  # 50 % right at confidence 0.9
    assert expected_calibration_error(overconfident, labels) == pytest.approx(0.4)
    # Two bins: 4 samples at 0.6 all right (gap 0.4), 6 at 1.0 with 3 right (gap 0.5).
    mixed = np.array([[0.6, 0.4]] * 4 + [[1.0, 0.0]] * 6)
    labels = np.array([0] * 4 + [0, 0, 0, 1, 1, 1])
    assert expected_calibration_error(mixed, labels) == pytest.approx(0.4 * 0.4 + 0.6 * 0.5)


def test_one_pass_differs_from_the_papers_per_batch_average():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1, 0])  # right, wrong, wrong, right, right
    whole = classification_metrics(probs, labels, ["x", "y"])["accuracy"]
    assert whole == pytest.approx(3 / 5)
    # Batches of 4 and 1: their mean is (2/4 + 1/1) / 2 = 0.75, and drop_last would give 0.5.
    batches = [classification_metrics(probs[s], labels[s], ["x", "y"])["accuracy"]
               for s in (slice(0, 4), slice(4, 5))]
    assert np.mean(batches) == pytest.approx(0.75)
    assert whole != pytest.approx(np.mean(batches)) and whole != pytest.approx(batches[0])


def test_bleu_equals_sacrebleu_and_excludes_missing_references():
    hyps = ["mild diabetic retinopathy", "", "normal fundus", "glaucoma suspect"]
    refs = ["mild diabetic retinopathy in both eyes", "cataract", "normal fundus", ""]
    m = text_metrics(hyps, refs)
    expected = sacrebleu.corpus_bleu(hyps[:3], [refs[:3]], tokenize="13a").score
    assert m["bleu"] == pytest.approx(expected)
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert text_metrics([], [])["bleu"] is None


def test_per_group_bleu():
    hyps = ["a b c d e", "a b x d e", "f g h i j", "k l m n o"]
    refs = ["a b c d e", "a b c d e", "f g h i j", "k l m n p"]
    groups = ["dr", "dr", "normal", None]
    m = text_metrics(hyps, refs, groups)
    assert set(m["per_group"]) == {"dr", "normal"}
    dr = sacrebleu.corpus_bleu(hyps[:2], [refs[:2]]).score
    assert m["per_group"]["dr"]["bleu"] == pytest.approx(dr)
    assert m["per_group"]["dr"]["n"] == 2 and m["per_group"]["dr"]["exact_match"] == pytest.approx(0.5)
    assert m["per_group"]["normal"]["bleu"] == pytest.approx(100.0)
    assert m["n"] == 4  # the ungrouped pair still counts overall


def _tasks() -> list[TaskSpec]:
    return [TaskSpec("coarse", "classification", ("normal", "dr", "glaucoma")),
            TaskSpec("fine", "classification", tuple(f"f{i}" for i in range(6))),
            TaskSpec("text", "text")]


def _vocab() -> Vocabulary:
    return Vocabulary.build(["normal fundus", "mild retinopathy", "glaucoma"], max_len=6)


def test_evaluate_decodes_normalizes_groups_and_is_json(tmp_path):
    vocab, tasks = _vocab(), _tasks()
    rng = np.random.default_rng(0)
    fine = rng.dirichlet(np.ones(6), size=3)
    ids = np.array([vocab.encode_padded(t) for t in ["normal fundus", "mild retinopathy", "glaucoma"]])
    outputs = {"coarse": np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2]]), "fine": fine,
               "text": ids}
    targets = {"coarse": np.array([0, 1, -1]), "text": ["Normal Fundus", "mild  retinopathy", ""]}
    m = evaluate(outputs, targets, tasks, vocab, group_task="coarse")
    assert "fine" not in m  # no labels for it in this data set
    assert m["coarse"]["accuracy"] == pytest.approx(1.0) and m["coarse"]["n"] == 2
    assert m["text"]["n"] == 2 and m["text"]["exact_match"] == pytest.approx(1.0)
    assert set(m["text"]["per_group"]) == {"normal", "dr"}
    (tmp_path / "m.json").write_text(json.dumps(m, allow_nan=False))
    flat = headline(m, tasks)
    assert flat == {"coarse/accuracy": 1.0, "coarse/balanced_accuracy": 1.0, "coarse/macro_f1": 1.0,
                    "coarse/top1": 1.0, "text/bleu": pytest.approx(m["text"]["bleu"]), "text/exact_match": 1.0}
    with pytest.raises(ValueError, match="no output for task 'fine'"):
        evaluate({"coarse": outputs["coarse"], "text": ids}, targets, tasks, vocab)
    with pytest.raises(ValueError, match="pass the vocabulary"):
        evaluate(outputs, targets, tasks, None)


def test_agreement_classification_and_text():
    tasks, vocab = [_tasks()[0], _tasks()[2]], _vocab()
    ref = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    stu = np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]])
    eos = 2
    w = vocab.encode("normal fundus")[:-1]
    ref_ids = np.array([[*w, eos, 0, 0, 0], [*w, eos, 0, 0, 0]])
    stu_ids = np.array([[*w, eos, 7, 7, 7], [w[0], eos, 0, 0, 0, 0]])  # same up to <eos> / differs
    a = agreement({"coarse": stu, "text": stu_ids}, {"coarse": ref, "text": ref_ids}, tasks, vocab)
    assert a["coarse"]["top1_agreement"] == pytest.approx(0.5)
    kl0 = 0.5 * np.log(0.5 / 0.25) + 0.25 * np.log(0.25 / 0.5) + 0.0
    assert a["coarse"]["mean_kl"] == pytest.approx(kl0 / 2)
    assert a["coarse"]["max_abs_diff"] == pytest.approx(0.25)
    assert a["text"]["sequence_agreement"] == pytest.approx(0.5)
    raw = agreement({"text": stu_ids}, {"text": ref_ids}, [tasks[1]], None)
    assert raw["text"]["sequence_agreement"] == pytest.approx(0.5)


def test_metrics_module_does_not_import_torch():
    # Benchmarks score ONNX/TensorRT outputs with it where torch may be absent.
    code = "import sys, train.metrics; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_topk_only_where_it_can_fail():
    probs = np.random.default_rng(0).dirichlet(np.ones(7), size=20)
    labels = np.arange(20) % 7
    m = classification_metrics(probs, labels, [f"c{i}" for i in range(7)])
    assert {k for k in m if k.startswith("top")} == {"top1", "top2", "top3", "top4", "top5"}
    m = classification_metrics(probs[:, :5] / probs[:, :5].sum(1, keepdims=True), labels % 5, list("abcde"))
    assert {k for k in m if k.startswith("top")} == {"top1", "top2", "top3", "top4"}  # top5 of 5 classes: 100 %


def test_quadratic_kappa_by_hand():
    # 3 grades; labels/preds below give O = [[2,0,0],[1,1,0],[0,1,1]], N = 6.
    labels, preds = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 2])
    # W = (i-j)^2/4: W01 = W12 = 0.25, W02 = 1. sum(W*O) = 0.25*(1 + 1) = 0.5.
    # Histograms: true [2,2,2], pred [3,2,1]; E = outer/6 -> E[i][j] = true_i*pred_j/6.
    e = np.outer([2, 2, 2], [3, 2, 1]) / 6
    w = np.array([[0, .25, 1], [.25, 0, .25], [1, .25, 0]])
    assert quadratic_kappa(labels, preds, 3) == pytest.approx(1 - 0.5 / (w * e).sum())
    assert quadratic_kappa(labels, labels, 3) == pytest.approx(1.0)
    assert quadratic_kappa(np.zeros(4, int), np.zeros(4, int), 3) is None  # undefined, not 1 or 0


def test_ordinal_tasks_get_kappa_and_grade_error_and_joint_accuracy():
    grade = TaskSpec("grade", "classification", ("0", "1", "2", "3", "4"), ordinal=True)
    risk = TaskSpec("risk", "classification", ("0", "1", "2"), ordinal=True)
    g_probs = np.eye(5)[[0, 1, 4, 2]] * 0.9 + 0.02
    r_probs = np.eye(3)[[0, 2, 2, 1]] * 0.9 + 0.1 / 3
    targets = {"grade": np.array([0, 1, 2, 2]), "risk": np.array([0, 1, 2, -1])}
    m = evaluate({"grade": g_probs, "risk": r_probs}, targets, [grade, risk], None, joint=[("grade", "risk")])
    assert m["grade"]["mae"] == pytest.approx((0 + 0 + 2 + 0) / 4)
    assert m["grade"]["kappa"] == pytest.approx(quadratic_kappa(np.array([0, 1, 2, 2]), np.array([0, 1, 4, 2]), 5))
    # Both right on image 0 only, of the 3 images labelled for both tasks.
    assert m["grade+risk"] == {"joint_accuracy": pytest.approx(1 / 3), "n": 3}
    flat = headline(m, [grade, risk])
    assert flat["grade+risk/joint_accuracy"] == pytest.approx(1 / 3) and "grade/top5" not in flat
    assert primary_metric(grade) == "grade/kappa"


def test_selection_prefers_a_model_that_sees_the_minority_class():
    """On a skewed 3-class task the majority-class model has higher accuracy but must not be selected."""
    task = TaskSpec("dme", "classification", ("none", "mild", "severe"))
    labels = np.array([0] * 8 + [1, 2])
    majority = np.tile([0.9, 0.05, 0.05], (10, 1))
    seeing = np.eye(3)[[0] * 6 + [1, 1, 1, 2]] * 0.9 + 0.1 / 3
    scores = {}
    for name, probs in (("majority", majority), ("seeing", seeing)):
        metrics = evaluate({"dme": probs}, {"dme": labels}, [task], None)
        assert metrics["dme"]["accuracy"] == pytest.approx(0.8 if name == "majority" else 0.8)
        scores[name] = selection_score(metrics, [task])
    assert scores["seeing"] > scores["majority"]
    assert selection_score(evaluate({"dme": majority}, {"dme": labels}, [task], None), [task], "dme/accuracy") == 0.8


def test_kappa_uses_both_histograms_and_mae_counts_every_grade_off():
    labels, preds = np.array([0, 0, 0, 1, 2]), np.array([0, 1, 2, 2, 2])
    o = np.array([[1, 1, 1], [0, 0, 1], [0, 0, 1]], float)
    w = np.array([[0, .25, 1], [.25, 0, .25], [1, .25, 0]])
    e = np.outer([3, 1, 1], [1, 1, 3]) / 5  # true x predicted histograms, not true x true
    assert quadratic_kappa(labels, preds, 3) == pytest.approx(1 - (w * o).sum() / (w * e).sum())
    task = TaskSpec("g", "classification", ("0", "1", "2"), ordinal=True)
    m = classification_metrics(np.eye(3)[[0, 2]] * 0.9 + 0.1 / 3, np.array([1, 1]), task.classes, ordinal=True)
    assert m["mae"] == pytest.approx(1.0)  # one under, one over: both count


def test_selection_score_is_the_mean_of_primary_metrics_with_bleu_scaled():
    vocab, tasks = _vocab(), [_tasks()[0], _tasks()[2]]
    ids = np.array([vocab.encode_padded(t) for t in ["normal fundus", "glaucoma"]])
    outputs = {"coarse": np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1]]), "text": ids}
    m = evaluate(outputs, {"coarse": np.array([0, 1]), "text": ["normal fundus", "mild retinopathy"]}, tasks, vocab)
    heads = headline(m, tasks)
    expected = (heads["coarse/balanced_accuracy"] + heads["text/bleu"] / 100) / 2
    assert selection_score(m, tasks) == pytest.approx(expected)
    # top5 named for a 3-class task (no top5): its primary metric stands in, never 0.
    assert selection_score(m, tasks, "top5") == pytest.approx(expected)
    assert selection_score(m, tasks, "coarse/kappa") == 0.0  # not computed here: a score of 0, no crash

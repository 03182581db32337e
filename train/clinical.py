"""Numbers a screening clinic reads (numpy, no torch): per-class sensitivity and specificity, and for a
task that declares its `normal` class (dataset.yaml), any-disease-vs-normal sensitivity, specificity
and AUROC with 95 % patient-bootstrap intervals (train.bootstrap).

The any-disease score of an image is 1 - p(normal). Its operating point (the threshold above which an
image is referred) is chosen on the *validation* split (`clinical.operating_point`: the highest
threshold that reaches `target_sensitivity`, or Youden's J) and then applied unchanged to test, so the
test numbers are not tuned on the test images. Every rate is in percent points, AUROC too (x100).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from train.bootstrap import DEFAULT_RESAMPLES, Metric, bootstrap_cis, point, ratio_of

OPERATING_POINTS = ("sensitivity", "youden")


class ClinicalError(ValueError):
    """The split cannot give an operating point (no diseased or no normal image)."""


def one_vs_rest(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> dict[str, dict]:
    """Per class from a confusion matrix (rows = true class): sensitivity = TP / (TP + FN), specificity
    = TN / (TN + FP) with every other class as the negatives, in points (None when undefined), and the
    class's support."""
    cm = np.asarray(confusion, dtype=np.float64)
    total, tp = cm.sum(), np.diag(cm)
    positives, flagged = cm.sum(axis=1), cm.sum(axis=0)
    out = {}
    for c, name in enumerate(classes):
        negatives = total - positives[c]
        tn = negatives - (flagged[c] - tp[c])
        out[name] = {"sensitivity": _pct(tp[c], positives[c]), "specificity": _pct(tn, negatives),
                     "support": int(positives[c])}
    return out


def _pct(num: float, den: float) -> float | None:
    return round(100.0 * float(num) / float(den), 2) if den else None


def disease_score(probs: np.ndarray, normal_index: int) -> np.ndarray:
    """Any-disease score per image: 1 - p(normal)."""
    return 1.0 - np.asarray(probs, dtype=np.float64)[:, normal_index]


def auroc_of(scores: np.ndarray, diseased: np.ndarray) -> Metric:
    """Weighted AUROC: the chance that a diseased image scores above a normal one (ties count half),
    computed for every resample at once from one sort of the scores."""
    _, level = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    onehot = np.zeros((len(level), int(level.max()) + 1 if level.size else 0))
    onehot[np.arange(len(level)), level] = 1.0
    pos, neg = np.asarray(diseased, dtype=bool), ~np.asarray(diseased, dtype=bool)

    def metric(w: np.ndarray) -> np.ndarray:
        wp, wn = (w * pos) @ onehot, (w * neg) @ onehot  # weight of diseased / normal images per score level
        below = np.cumsum(wn, axis=1) - wn  # normal weight strictly below each level
        num = (wp * (below + 0.5 * wn)).sum(axis=1)
        den = wp.sum(axis=1) * wn.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    return metric


def auroc(scores: np.ndarray, diseased: np.ndarray) -> float | None:
    value = point(auroc_of(scores, diseased), len(scores))
    return None if np.isnan(value) else value


def rates(scores: np.ndarray, diseased: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) as fractions when images scoring >= threshold are referred."""
    flagged, diseased = np.asarray(scores) >= threshold, np.asarray(diseased, dtype=bool)
    return float(flagged[diseased].mean()), float((~flagged[~diseased]).mean())


def choose_threshold(scores: np.ndarray, diseased: np.ndarray, rule: str = "sensitivity",
                     target_sensitivity: float = 0.9) -> float:
    """The operating point on validation scores. `sensitivity`: the highest threshold whose sensitivity
    reaches the target (the most specific such point); `youden`: the threshold maximising sensitivity +
    specificity - 1 (the highest one on a tie). Candidates are the observed scores."""
    scores, diseased = np.asarray(scores, dtype=np.float64), np.asarray(diseased, dtype=bool)
    if rule not in OPERATING_POINTS:
        raise ClinicalError(f"operating point {rule!r}: choose one of {OPERATING_POINTS}")
    if diseased.all() or not diseased.any():
        raise ClinicalError("an operating point needs diseased and normal images in the validation split")
    candidates = np.unique(scores)[::-1]  # highest first
    sens = np.array([(scores[diseased] >= t).mean() for t in candidates])
    spec = np.array([(scores[~diseased] < t).mean() for t in candidates])
    if rule == "sensitivity":
        return float(candidates[np.flatnonzero(sens >= target_sensitivity - 1e-12)[0]])
    return float(candidates[int(np.argmax(sens + spec))])


def any_disease(val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray, test_labels: np.ndarray,
                test_groups: Sequence, normal_index: int, rule: str = "sensitivity", target_sensitivity: float = 0.9,
                n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Any-disease-vs-normal on test at the operating point chosen on validation, in points, with 95 %
    patient-bootstrap intervals (`ci95`). Labels are class ids (-1 = unlabelled, left out)."""
    val_labels, test_labels = np.asarray(val_labels), np.asarray(test_labels)
    vk, tk = val_labels >= 0, test_labels >= 0
    val_score = disease_score(np.asarray(val_probs)[vk], normal_index)
    val_sick = val_labels[vk] != normal_index
    threshold = choose_threshold(val_score, val_sick, rule, target_sensitivity)
    score = disease_score(np.asarray(test_probs)[tk], normal_index)
    sick = test_labels[tk] != normal_index
    flagged = score >= threshold
    metrics = {"sensitivity": ratio_of(flagged & sick, sick), "specificity": ratio_of(~flagged & ~sick, ~sick),
               "auroc": auroc_of(score, sick)}
    groups = [g for g, k in zip(test_groups, tk) if k]
    cis = bootstrap_cis(metrics, groups, n_resamples, seed)
    val_sens, val_spec = rates(val_score, val_sick, threshold)
    out: dict = {"threshold": round(threshold, 6), "n": int(tk.sum()), "diseased": int(sick.sum())}
    for key, metric in metrics.items():
        value = point(metric, len(score))
        out[key] = None if np.isnan(value) else round(100.0 * value, 2)
    out["ci95"] = {k: None if ci is None else [round(100.0 * ci[0], 2), round(100.0 * ci[1], 2)]
                   for k, ci in cis.items()}
    out["validation"] = {"sensitivity": round(100.0 * val_sens, 2), "specificity": round(100.0 * val_spec, 2)}
    return out

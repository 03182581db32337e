"""95 % confidence intervals by a patient-level (cluster) bootstrap (numpy + sacrebleu, no torch).

A patient's two eyes share their disease, camera and often the model's mistake, so images are not
independent draws: resampling images would make intervals too narrow. Each resample draws *patients*
with replacement and brings all their images along; the metric is recomputed on every resample and the
interval is the 2.5th-97.5th percentile of those values.

Resamples are image weights (how often each image was drawn), and every metric here is a function of a
weight matrix [B, N] -> values [B], so 1,000 resamples cost a few matrix products, not 1,000 metric
calls. BLEU sums sacrebleu's per-sentence sufficient statistics under the weights: no re-tokenising.
With all weights 1 each metric equals train.metrics' number (tests/test_clinical.py holds that).

    cis = bootstrap_cis(headline_metrics(outputs, targets, tasks, vocab), patient_ids)
    cis["coarse/accuracy"]                      # (0.91, 0.97): fractions, like train.metrics
    paired_bootstrap_ci(fp32, int8, patient_ids)  # the interval of fp32 - int8 on the same resamples
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from sacrebleu.metrics import BLEU

from deploy.contract import TaskSpec
from deploy.vocab import Vocabulary
from train import metrics as M

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
_CHUNK_CELLS = 4_000_000  # resamples x images held at once (32 MB of float64)

# image weights [B, N] -> metric value per resample [B] (NaN where undefined, e.g. no image of a class)
Metric = Callable[[np.ndarray], np.ndarray]
Interval = tuple[float, float]


# --- resampling -----------------------------------------------------------------------------------
def resample_weights(groups: Sequence, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     chunk: int | None = None) -> Iterator[np.ndarray]:
    """Image weights [b, N] of `n_resamples` patient resamples, in chunks: weight = how many times the
    image's patient (`groups[i]`) was drawn. Each resample draws as many patients as there are."""
    _, ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_patients = int(ids.max()) + 1 if ids.size else 0
    if n_patients == 0:
        return
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, _CHUNK_CELLS // max(len(ids), n_patients))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        draws = rng.integers(0, n_patients, size=(b, n_patients)) + n_patients * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_patients).reshape(b, n_patients)
        yield counts[:, ids].astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> Interval | None:
    """The central `confidence` percentile interval of the finite values; None when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def resampled_values(metrics: dict[str, Metric], groups: Sequence, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Each metric's value on the same `n_resamples` patient resamples (empty without patients)."""
    values: dict[str, list[np.ndarray]] = {k: [] for k in metrics}
    for weights in resample_weights(groups, n_resamples, seed):
        for key, metric in metrics.items():
            values[key].append(metric(weights))
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in values.items()}


def bootstrap_cis(metrics: dict[str, Metric], groups: Sequence, n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Interval | None]:
    """Percentile interval of each metric over the same patient resamples."""
    values = resampled_values(metrics, groups, n_resamples, seed)
    return {k: percentile_interval(v, confidence) for k, v in values.items()}


def standard_error(values: np.ndarray) -> float | None:
    """The bootstrap standard error: the spread (std) of a metric's finite resampled values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if values.size > 1 else None


def bootstrap_ci(metric: Metric, groups: Sequence, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> Interval | None:
    """Percentile interval of one metric over patient resamples."""
    return bootstrap_cis({"m": metric}, groups, n_resamples, seed, confidence)["m"]


def paired_bootstrap_ci(metric_a: Metric, metric_b: Metric, groups: Sequence,
                        n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                        confidence: float = CONFIDENCE) -> Interval | None:
    """Interval of metric_a - metric_b, both computed on the *same* resamples of the same images (two
    models on one split): the shared images cancel, so the interval is much tighter than two separate
    ones."""
    return bootstrap_ci(lambda w: metric_a(w) - metric_b(w), groups, n_resamples, seed, confidence)


def point(metric: Metric, n: int) -> float:
    """The metric on the sample itself (every weight 1)."""
    return float(metric(np.ones((1, n)))[0])


# --- weighted metrics (each equals train.metrics' number at weights 1) ------------------------------
def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Row means over the defined (non-NaN) entries; NaN for a row with none."""
    defined = np.isfinite(values)
    return _div(np.where(defined, values, 0.0).sum(axis=1), defined.sum(axis=1))


def on_subset(metric: Metric, keep: np.ndarray) -> Metric:
    """`metric` over the images where `keep` is true (e.g. the labelled ones)."""
    idx = np.flatnonzero(keep)
    return lambda w: metric(w[:, idx])


def mean_of(values: np.ndarray) -> Metric:
    """Weighted mean of a per-image value: accuracy (correct 0/1), top-k, exact match, grade error."""
    values = np.asarray(values, dtype=np.float64)
    return lambda w: _div(w @ values, w.sum(axis=1))


def ratio_of(numerator: np.ndarray, denominator: np.ndarray) -> Metric:
    """sum(w * numerator) / sum(w * denominator): a sensitivity is (diseased & flagged) / diseased."""
    num, den = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    return lambda w: _div(w @ num, w @ den)


def _one_hot(index: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(index), size))
    out[np.arange(len(index)), index] = 1.0
    return out


def balanced_accuracy_of(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> Metric:
    """Mean recall over the classes present in the resample."""
    hit = _one_hot(labels, num_classes) * (labels == preds)[:, None]
    true = _one_hot(labels, num_classes)
    return lambda w: _nanmean(_div(w @ hit, w @ true))


def macro_f1_of(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> Metric:
    """Mean F1 = 2TP / (support + predicted) over the classes true or predicted in the resample."""
    true, pred = _one_hot(labels, num_classes), _one_hot(preds, num_classes)
    hit = true * pred

    def metric(w: np.ndarray) -> np.ndarray:
        return _nanmean(_div(2.0 * (w @ hit), w @ true + w @ pred))

    return metric


def kappa_of(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> Metric:
    """Quadratic-weighted Cohen's kappa (train.metrics.quadratic_kappa) of each resample."""
    cells = _one_hot(labels * num_classes + preds, num_classes * num_classes)
    grades = np.arange(num_classes)
    penalty = ((grades[:, None] - grades[None, :]) ** 2 / max(num_classes - 1, 1) ** 2).ravel()

    def metric(w: np.ndarray) -> np.ndarray:
        observed = (w @ cells).reshape(-1, num_classes, num_classes)
        expected = np.einsum("bi,bj->bij", observed.sum(2), observed.sum(1)) / np.maximum(
            observed.sum((1, 2)), 1.0)[:, None, None]
        chance = expected.reshape(len(w), -1) @ penalty
        return 1.0 - _div(observed.reshape(len(w), -1) @ penalty, chance)

    return metric


def bleu_of(hypotheses: Sequence[str], references: Sequence[str]) -> Metric:
    """Corpus BLEU (train.metrics' sacrebleu settings) of each resample, from per-sentence statistics."""
    bleu = BLEU(tokenize=M.BLEU_TOKENIZER)
    stats = np.asarray(bleu._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=np.float64)

    def metric(w: np.ndarray) -> np.ndarray:
        summed = np.rint(w @ stats).astype(np.int64)  # integer weights: the counts stay exact
        return np.array([bleu._compute_score_from_stats(list(row)).score if row[0] or row[1] else np.nan
                         for row in summed.tolist()])

    return metric


def headline_metrics(outputs: dict[str, np.ndarray], targets: dict, tasks: Sequence[TaskSpec],
                     vocab: Vocabulary | None, joint: Sequence[Sequence[str]] = ()) -> dict[str, Metric]:
    """A weighted metric per headline key of train.metrics.headline (same keys, same units: fractions,
    BLEU 0-100, mae in grades), for the tasks with outputs and targets."""
    out: dict[str, Metric] = {}
    for task in tasks:
        if task.name not in outputs or task.name not in targets:
            continue
        if task.kind == "text":
            hyps = M._decode_all(outputs[task.name], vocab, task.name)
            refs = [M.normalize_reference(r) if r else "" for r in targets[task.name]]
            keep = np.array([r != "" for r in refs], dtype=bool)
            kept_h = [h for h, k in zip(hyps, keep) if k]
            kept_r = [r for r, k in zip(refs, keep) if k]
            exact = np.array([h.strip() == r.strip() for h, r in zip(kept_h, kept_r)], dtype=np.float64)
            out[f"{task.name}/bleu"] = on_subset(bleu_of(kept_h, kept_r), keep)
            out[f"{task.name}/exact_match"] = on_subset(mean_of(exact), keep)
            continue
        probs = np.asarray(outputs[task.name], dtype=np.float64)
        labels = np.asarray(targets[task.name]).astype(np.int64).reshape(-1)
        keep = labels >= 0
        probs, y = probs[keep], labels[keep]
        pred, c = probs.argmax(axis=1), task.num_classes
        metrics = {"accuracy": mean_of(pred == y), "balanced_accuracy": balanced_accuracy_of(y, pred, c),
                   "macro_f1": macro_f1_of(y, pred, c)}
        metrics.update({f"top{k}": mean_of(M.topk_correct(probs, y, k)) for k in M.present_ks(c)})
        if task.ordinal:
            metrics.update({"kappa": kappa_of(y, pred, c), "mae": mean_of(np.abs(pred - y))})
        out.update({f"{task.name}/{k}": on_subset(m, keep) for k, m in metrics.items()
                    if k in M.HEADLINE_KEYS["classification"]})
    for group in joint:
        if all(n in outputs and n in targets for n in group):
            ys = [np.asarray(targets[n]).astype(np.int64).reshape(-1) for n in group]
            keep = np.all([y >= 0 for y in ys], axis=0)
            right = np.all([np.asarray(outputs[n]).argmax(1) == y for n, y in zip(group, ys)], axis=0)
            out[f"{M.joint_key(group)}/joint_accuracy"] = on_subset(mean_of(right[keep]), keep)
    return out


def in_points(key: str, interval: Interval | None) -> list[float] | None:
    """An interval of headline key `key` in report units (train.metrics.to_points), rounded, as a list."""
    if interval is None:
        return None
    return [round(M.to_points(key, interval[0]), 2), round(M.to_points(key, interval[1]), 2)]

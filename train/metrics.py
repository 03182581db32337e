"""Evaluation metrics shared by training, compression and benchmarks (numpy + sacrebleu, no torch).

Every metric is computed over the whole evaluation set in one pass: callers collect all outputs first
and call these functions once. (The paper's code averaged per-batch metrics with `drop_last=True`, which
weights small batches wrongly and silently drops samples.) Results are plain Python floats/ints/lists so
they can be written to JSON as they are; a metric that cannot be computed (nothing to score) is None.

    probs = ...                                   # [N, C] softmax outputs, e.g. from ONNX Runtime
    m = evaluate({"coarse": probs}, {"coarse": labels}, contract.tasks, contract.vocabulary)
    headline(m, contract.tasks)                   # {"coarse/accuracy": 0.83, ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu

from deploy.contract import TaskSpec
from deploy.vocab import EOS_ID, Vocabulary, detokenize, tokenize

BLEU_TOKENIZER = "13a"  # sacrebleu's default (the WMT standard); hypotheses and references both pass it
KL_EPS = 1e-8
# A row of "probabilities" further than this from summing to 1 is almost surely logits; INT8 outputs
# are dequantized floats and may be a little off, hence not a tight tolerance.
_PROB_SUM_TOL = 0.02
TOP_KS = (1, 2, 3, 4, 5)
LOWER_IS_BETTER = ("ece", "nll", "mean_kl", "mae")


def _check_probs(probs: np.ndarray, where: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"{where}: expected probabilities of shape [N, C], got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"{where}: probabilities contain NaN or inf")
    if probs.size and np.max(np.abs(probs.sum(axis=1) - 1.0)) > _PROB_SUM_TOL:
        raise ValueError(f"{where}: rows do not sum to 1; pass softmax probabilities, not logits")
    return probs


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def topk_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean [N]: true label among the k most probable classes (ties broken by lower class index,
    the same rule as argmax, so top-1 always equals accuracy)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE on the max probability with `n_bins` equal-width bins (lo, hi]; the first bin includes 0.
    Sum over bins of |accuracy - mean confidence| weighted by the fraction of samples in the bin."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def quadratic_kappa(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float | None:
    """Cohen's kappa with quadratic weights (the DR-grading standard: APTOS, EyePACS).

    1 - sum(W*O) / sum(W*E) with W[i, j] = (i - j)^2 / (C - 1)^2, O the confusion matrix and E the
    outer product of the true and predicted class histograms over N. None when chance agreement is
    already perfect (every label and prediction in one class): kappa is undefined there."""
    observed = confusion_matrix(labels, preds, num_classes).astype(np.float64)
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2 / max(num_classes - 1, 1) ** 2
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1.0)
    chance = float((weights * expected).sum())
    return None if chance == 0 else 1.0 - float((weights * observed).sum()) / chance


def present_ks(num_classes: int, ks: Sequence[int] = TOP_KS) -> tuple[int, ...]:
    """The k of top-k that can fail: k = 1 always, larger k only while k < C (top-C is always 100 %)."""
    return tuple(k for k in ks if k == 1 or k < num_classes)


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    ks: Sequence[int] = TOP_KS,
    n_bins: int = 15,
    ordinal: bool = False,
) -> dict:
    """Metrics of one classification head over a whole evaluation set.

    probs [N, C] softmax outputs; labels [N] int with -1 = no label (excluded everywhere).
    - accuracy, top{k} for each k in `ks` with k < C (top-C and beyond would be 100 % for any model);
    - balanced_accuracy: mean recall over the classes present among the labels;
    - macro_f1: mean F1 over the classes present among the labels *or* the predictions (a class that is
      predicted but never true has F1 0 and counts; one neither true nor predicted is left out — the
      same rule as scikit-learn's default);
    - with `ordinal` (graded classes): kappa (quadratic-weighted) and mae (mean absolute grade error);
    - per_class_recall {class: recall or None when the class has no labelled sample}, support {class: n};
    - confusion_matrix: C x C list of lists over all classes, rows = true class;
    - ece (15 equal-width bins on the max probability), nll (mean -log p(true), clipped at 1e-8), n.
    """
    probs = _check_probs(probs, "classification_metrics")
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    num_classes = len(class_names)
    ks = present_ks(num_classes, ks)
    if probs.shape != (labels.shape[0], num_classes):
        raise ValueError(f"probs shape {probs.shape} does not match {labels.shape[0]} labels x "
                         f"{num_classes} classes")
    if np.any(labels < -1) or np.any(labels >= num_classes):
        raise ValueError(f"labels must be -1 (missing) or in [0, {num_classes}), got {np.unique(labels)}")
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    n = int(labels.shape[0])
    out: dict = {"n": n}
    if n == 0:
        out.update({"accuracy": None, "balanced_accuracy": None, "macro_f1": None, "ece": None, "nll": None,
                    "per_class_recall": dict.fromkeys(class_names), "support": dict.fromkeys(class_names, 0),
                    "confusion_matrix": np.zeros((num_classes, num_classes), int).tolist()})
        out.update({f"top{k}": None for k in ks})
        if ordinal:
            out.update({"kappa": None, "mae": None})
        return out

    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    recalls = [_ratio(tp[c], support[c]) for c in range(num_classes)]
    f1_classes = np.flatnonzero((support + predicted) > 0)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); never 0/0 on the classes kept.
    f1 = 2.0 * tp[f1_classes] / (support[f1_classes] + predicted[f1_classes])
    p_true = probs[np.arange(n), labels]
    out.update({
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": float(np.mean([r for r in recalls if r is not None])),
        "macro_f1": float(np.mean(f1)),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": float(np.mean(-np.log(np.clip(p_true, KL_EPS, None)))),
        "per_class_recall": dict(zip(class_names, recalls)),
        "support": {name: int(s) for name, s in zip(class_names, support)},
        "confusion_matrix": cm.tolist(),
    })
    out.update({f"top{k}": float(np.mean(topk_correct(probs, labels, k))) for k in ks})
    if ordinal:
        out.update({"kappa": quadratic_kappa(labels, preds, num_classes),
                    "mae": float(np.mean(np.abs(preds - labels)))})
    return out


def joint_accuracy(outputs: dict[str, np.ndarray], targets: dict, group: Sequence[str]) -> dict:
    """Share of images on which every task of `group` is right, over the images labelled for all of them
    (IDRiD's "DR grade and macular-oedema risk both right")."""
    labels = [np.asarray(targets[name]).astype(np.int64).reshape(-1) for name in group]
    preds = [np.asarray(outputs[name]).argmax(axis=1) for name in group]
    keep = np.all([y >= 0 for y in labels], axis=0)
    right = np.all([p == y for p, y in zip(preds, labels)], axis=0)[keep]
    return {"joint_accuracy": float(right.mean()) if right.size else None, "n": int(keep.sum())}


def joint_key(group: Sequence[str]) -> str:
    return "+".join(group)


def _bleu(hyps: list[str], refs: list[str]) -> float | None:
    if not hyps:
        return None
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize=BLEU_TOKENIZER).score)


def text_metrics(
    hypotheses: Sequence[str], references: Sequence[str], groups: Sequence[str | None] | None = None
) -> dict:
    """Corpus BLEU (sacrebleu, tokenizer "13a", case-sensitive, 0-100), exact-match rate and n.

    Pairs whose reference is '' have no reference and are excluded; empty hypotheses are scored (they
    count as misses). With `groups` (one name per pair, e.g. the coarse class; None = no group), also
    `per_group` {group: {"bleu", "exact_match", "n"}} over the groups' own pairs.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if groups is not None and len(groups) != len(references):
        raise ValueError(f"{len(groups)} groups but {len(references)} references")
    keep = [i for i, r in enumerate(references) if r != ""]
    hyps = [hypotheses[i] for i in keep]
    refs = [references[i] for i in keep]
    exact = [h.strip() == r.strip() for h, r in zip(hyps, refs)]
    out: dict = {"n": len(keep), "bleu": _bleu(hyps, refs),
                 "exact_match": float(np.mean(exact)) if exact else None}
    if groups is not None:
        kept_groups = [groups[i] for i in keep]
        per_group = {}
        for name in sorted({g for g in kept_groups if g is not None}):
            idx = [j for j, g in enumerate(kept_groups) if g == name]
            per_group[name] = {"bleu": _bleu([hyps[j] for j in idx], [refs[j] for j in idx]),
                               "exact_match": float(np.mean([exact[j] for j in idx])), "n": len(idx)}
        out["per_group"] = per_group
    return out


def normalize_reference(text: str) -> str:
    """A reference sentence passed through the vocabulary's tokenizer (lower case, same spacing).

    The model can only emit lower-case vocabulary words joined by `detokenize`, so references get the
    same treatment; otherwise BLEU would measure casing and spacing. Out-of-vocabulary words stay (a
    model that cannot say them is rightly penalized)."""
    return detokenize(tokenize(text))


def _decode_all(tokens: np.ndarray, vocab: Vocabulary | None, task: str) -> list[str]:
    if vocab is None:
        raise ValueError(f"task {task!r} is a text task: pass the vocabulary to decode its token ids")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"task {task!r}: expected token ids of shape [N, L], got {tokens.shape}")
    return [vocab.decode(row) for row in tokens]


def evaluate(
    outputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray | list[str]],
    tasks: Sequence[TaskSpec],
    vocab: Vocabulary | None,
    group_task: str | None = None,
    joint: Sequence[Sequence[str]] = (),
) -> dict[str, dict]:
    """Metrics of every task: {task: classification_metrics(...) or text_metrics(...)}.

    outputs[task]: probabilities [N, C] (classification) or generated token ids [N, L] (text, decoded
    with `vocab.decode`, i.e. up to the first <eos>). targets[task]: int labels [N] (-1 = missing) or
    reference strings ('' = missing; normalized with `normalize_reference`). Every task must have an
    output; a task without a targets entry has no labels in this data set and is left out. With
    `group_task` (a classification task), text metrics are also broken down by its true class name.
    Each `joint` group of classification tasks adds `{joint_key(group)}: joint_accuracy(...)`.
    """
    groups = None
    if group_task is not None:
        spec = next((t for t in tasks if t.name == group_task), None)
        if spec is None or spec.kind != "classification" or group_task not in targets:
            raise ValueError(f"group_task {group_task!r} must be a classification task with targets")
        labels = np.asarray(targets[group_task]).astype(np.int64).reshape(-1)
        groups = [spec.classes[y] if y >= 0 else None for y in labels]
    results: dict[str, dict] = {}
    for task in tasks:
        if task.name not in outputs:
            raise ValueError(f"no output for task {task.name!r}; outputs have {sorted(outputs)}")
        if task.name not in targets:
            continue
        if task.kind == "classification":
            results[task.name] = classification_metrics(outputs[task.name], np.asarray(targets[task.name]),
                                                        task.classes, ordinal=task.ordinal)
        else:
            hyps = _decode_all(outputs[task.name], vocab, task.name)
            refs = [normalize_reference(r) if r else "" for r in targets[task.name]]
            results[task.name] = text_metrics(hyps, refs, groups)
    for group in joint:
        if all(name in targets and name in outputs for name in group):
            results[joint_key(group)] = joint_accuracy(outputs, targets, group)
    return results


HEADLINE_KEYS = {"classification": ("accuracy", "balanced_accuracy", "macro_f1", "top1", "top5", "kappa", "mae"),
                 "text": ("bleu", "exact_match")}
# Values reported as they are (BLEU is 0-100, mae is in grades); every other metric is a fraction
# reported in percent points.
NATIVE_UNITS = ("bleu", "mae")


def headline(metrics: dict[str, dict], tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """The headline numbers, flat: `{task}/accuracy`, `/balanced_accuracy`, `/macro_f1`, `/top1`,
    `/top5` (only where 5 < C), `/kappa` and `/mae` (ordinal tasks) for classification, `{task}/bleu`,
    `/exact_match` for text, and `{a+b}/joint_accuracy` for joint task groups. Tasks not in `metrics`
    and metrics that are None (nothing to score) are left out."""
    flat: dict[str, float] = {}
    for task in tasks:
        for key in HEADLINE_KEYS[task.kind] if task.name in metrics else ():
            value = metrics[task.name].get(key)
            if value is not None:
                flat[f"{task.name}/{key}"] = float(value)
    for name, values in metrics.items():
        if "+" in name and values.get("joint_accuracy") is not None:
            flat[f"{name}/joint_accuracy"] = float(values["joint_accuracy"])
    return flat


def primary_metric(task: TaskSpec, select: str = "auto") -> str:
    """The one headline key per task that selects checkpoints, is guarded through INT8 and leads the
    reports. `auto`: BLEU for text; quadratic kappa for ordinal tasks; balanced accuracy otherwise —
    metrics that a model predicting the majority class (or anything, for top-k with k >= C) cannot pass.
    Another name (`macro_f1`, `accuracy`, `top5`, ...) picks that metric for every classification task."""
    if task.kind == "text":
        return f"{task.name}/bleu"
    if select == "auto":
        return f"{task.name}/{'kappa' if task.ordinal else 'balanced_accuracy'}"
    return f"{task.name}/{select}"


def selectable_metrics() -> tuple[str, ...]:
    """Metric names `select_metric` may give: higher is better for each (mae, an error, is not one)."""
    return ("auto", *(k for k in HEADLINE_KEYS["classification"] if k not in LOWER_IS_BETTER))


def to_points(key: str, value: float) -> float:
    """A headline value in the unit the reports print: percent points, except BLEU (0-100) and mae."""
    return value if key.endswith(NATIVE_UNITS) else 100.0 * value


def fraction_scale(key: str) -> float:
    """What divides a headline value onto the 0-1 scale of the accuracies: 100 for BLEU (0-100), else 1."""
    return 100.0 if key.endswith("/bleu") else 1.0


def to_fraction(key: str, value: float) -> float:
    """A headline value on the 0-1 scale of the accuracies (BLEU / 100), to average or plot it with them."""
    return value / fraction_scale(key)


def points_label(key: str) -> str:
    """An axis/column label for a headline key in report units: `coarse/accuracy (%)`, `diagnosis/bleu`."""
    return key if key.endswith(NATIVE_UNITS) else f"{key} (%)"


def _until_eos(row: np.ndarray) -> tuple[int, ...]:
    ids = [int(i) for i in row]
    return tuple(ids[: ids.index(EOS_ID) + 1]) if EOS_ID in ids else tuple(ids)


def agreement(
    student: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    tasks: Sequence[TaskSpec],
    vocab: Vocabulary | None = None,
) -> dict[str, dict]:
    """How closely a student/compressed model follows a reference model on the same inputs (no labels).

    Classification: top1_agreement (same argmax), mean_kl = mean over samples of KL(reference || student)
    with both clipped at 1e-8, max_abs_diff of probabilities. Text: sequence_agreement = fraction of
    samples whose decoded strings are equal (decoding stops at the first <eos>; without a vocabulary the
    raw ids up to and including the first <eos> are compared).
    """
    out: dict[str, dict] = {}
    for task in tasks:
        if task.name not in student or task.name not in reference:
            raise ValueError(f"task {task.name!r} is missing from the student or the reference outputs")
        s, r = np.asarray(student[task.name]), np.asarray(reference[task.name])
        if s.shape[0] != r.shape[0]:
            raise ValueError(f"task {task.name!r}: {s.shape[0]} student vs {r.shape[0]} reference samples")
        if task.kind == "classification":
            s, r = _check_probs(s, f"{task.name} (student)"), _check_probs(r, f"{task.name} (reference)")
            if s.shape != r.shape:
                raise ValueError(f"task {task.name!r}: shapes {s.shape} and {r.shape} differ")
            ps, pr = np.clip(s, KL_EPS, None), np.clip(r, KL_EPS, None)
            kl = np.sum(pr * (np.log(pr) - np.log(ps)), axis=1)
            out[task.name] = {
                "top1_agreement": float(np.mean(s.argmax(1) == r.argmax(1))) if len(s) else None,
                "mean_kl": float(np.mean(kl)) if len(s) else None,
                "max_abs_diff": float(np.max(np.abs(s - r))) if s.size else None,
                "n": int(s.shape[0]),
            }
        else:
            if vocab is not None:
                same = [a == b for a, b in zip(_decode_all(s, vocab, task.name), _decode_all(r, vocab, task.name))]
            else:
                same = [_until_eos(a) == _until_eos(b) for a, b in zip(s, r)]
            out[task.name] = {"sequence_agreement": float(np.mean(same)) if same else None, "n": len(same)}
    return out

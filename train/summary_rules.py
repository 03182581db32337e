"""The summary's comparisons, torch-free so that readers of summary.json (benchmarks.verdict) need no
torch: its columns (the headline metrics that can fail on each task), its row names, and the rules
that flag the KD student below a floor and the ensemble behind a teacher. train/summary.py applies them.
"""

from __future__ import annotations

import math

from deploy.contract import TaskSpec
from train.metrics import joint_key, present_ks, primary_metric, to_points

PROBE_ROW = "linear probe"
FLOOR_ROWS = ("baseline", PROBE_ROW)  # rows that need no teacher: the KD student must not fall below them


def summary_columns(tasks: list[TaskSpec], joint: list[tuple[str, ...]] | tuple = ()) -> list[tuple[str, str]]:
    """(headline key, column title) per task, only metrics that can fail on it: accuracy and the primary
    metric (balanced accuracy, or kappa for ordinal tasks) of every classification task, top-5 where it
    has more than 5 classes, macro-F1 of the first; BLEU of a text task; joint accuracy of task groups."""
    cols: list[tuple[str, str]] = []
    first = True
    for t in tasks:
        if t.kind == "text":
            cols.append((f"{t.name}/bleu", f"{t.name} BLEU"))
            continue
        cols.append((f"{t.name}/accuracy", f"{t.name} acc"))
        cols.append((primary_metric(t), f"{t.name} {'kappa' if t.ordinal else 'bal. acc'}"))
        if first:
            cols.append((f"{t.name}/macro_f1", f"{t.name} macro-F1"))
        if 5 in present_ks(t.num_classes):
            cols.append((f"{t.name}/top5", f"{t.name} top-5"))
        first = False
    cols += [(f"{joint_key(g)}/joint_accuracy", f"{' + '.join(g)} joint acc") for g in joint]
    return cols


def below_floors(rows: dict[str, dict], tasks: list[TaskSpec],
                 joint: list[tuple[str, ...]] | tuple = ()) -> dict[str, dict[str, float]]:
    """Column -> {floor row: student minus floor (points)} where the KD student is below a floor row
    (baseline, linear probe) that has the column. Empty when the student is at or above every floor."""
    below: dict[str, dict[str, float]] = {}
    student = rows.get("student", {})
    for key, _ in summary_columns(tasks, joint):
        for floor in FLOOR_ROWS:
            s, f = student.get(key), rows.get(floor, {}).get(key)
            if s is not None and f is not None and s < f:
                below.setdefault(key, {})[floor] = to_points(key, s - f)
    return below


def split_ties(gaps_by_key: dict[str, dict[str, float]], standard_errors: dict[str, dict[str, float | None]]
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """(real gaps, ties) of a comparison's negative gaps, {column: {other row: gap in points}}: the KD
    student below a floor (`below_floors`), or the ensemble behind a teacher. A gap no larger than one
    standard error of the paired difference on the test split (`standard_errors[other row][column]`,
    points; patients resampled) is a tie: the test set cannot tell the two apart. Ties map to
    [gap, standard error]; a row without a standard error (the probe keeps no per-image outputs) is
    always a real gap."""
    gaps: dict[str, dict[str, float]] = {}
    ties: dict[str, dict[str, list[float]]] = {}
    for key, others in gaps_by_key.items():
        for other, gap in others.items():
            se = standard_errors.get(other, {}).get(key)
            if se is not None and -gap <= se:
                ties.setdefault(key, {})[other] = [gap, se]
            else:
                gaps.setdefault(key, {})[other] = gap
    return gaps, ties


def ensemble_versus(rows: dict[str, dict], candidates: dict[str, list[str]]) -> dict[str, tuple[str, float]]:
    """Column -> (the candidate teacher best on test, ensemble minus it in points), for every column where
    the ensemble and one of the column's candidate teachers have a value."""
    versus: dict[str, tuple[str, float]] = {}
    ensemble = rows.get("ensemble", {})
    for key, names in candidates.items():
        scored = [(rows[t][key], t) for t in names if rows.get(t, {}).get(key) is not None]
        e = ensemble.get(key)
        if scored and e is not None:
            best, name = max(scored)
            versus[key] = (name, to_points(key, e - best))
    return versus


def ensemble_behind_teachers(rows: dict[str, dict], teachers: list[str], tasks: list[TaskSpec],
                             joint: list[tuple[str, ...]] | tuple = ()) -> dict[str, tuple[str, float]]:
    """Column -> (best teacher, ensemble minus it in points) where a single teacher beats the ensemble."""
    everyone = {key: teachers for key, _ in summary_columns(tasks, joint)}
    return behind_only(ensemble_versus(rows, everyone))


def behind_only(versus: dict[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """The columns of `ensemble_versus`' result where the ensemble is behind (a negative gap)."""
    return {key: (name, gap) for key, (name, gap) in versus.items() if gap < 0}


def validation_picks(validation: dict[str, dict], teachers: list[str], tasks: list[TaskSpec],
                     joint: list[tuple[str, ...]] | tuple = ()) -> dict[str, list[str]]:
    """Column -> the teachers best on it on validation (`validation`: teacher -> its kept checkpoint's
    validation metrics): the one a user without the ensemble would deploy. A tie keeps every tied
    teacher, since validation cannot choose between them. The best teacher on test is chosen after
    seeing test, which favours it: the maximum of several noisy scores is above each one's true value."""
    picks: dict[str, list[str]] = {}
    for key, _ in summary_columns(tasks, joint):
        values = {t: validation.get(t, {}).get(key) for t in teachers}
        scored = {t: v for t, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if scored:
            best = max(scored.values())
            picks[key] = [t for t, v in scored.items() if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-12)]
    return picks

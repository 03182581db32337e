"""Patient-level, stratified, seeded splits and the paper's label-fraction subsets.

A patient's two eyes are strongly correlated, so splitting images at random leaks patients between
train and test (a defect of the paper's released code). Every function here moves whole patients.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

from train.data.manifest import Row

DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
PAPER_LABEL_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.70)


def _patients(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.patient_id].append(r)
    return groups


def _stratum(rows: list[Row], task: str, freq: Counter) -> str:
    """A patient's stratum: the rarest label among their eyes, so rare diseases spread over splits."""
    labels = [r.labels.get(task, "") for r in rows if r.labels.get(task, "")]
    if not labels:
        return ""
    return min(labels, key=lambda lab: (freq[lab], lab))


def _strata(rows: list[Row], task: str) -> dict[str, list[str]]:
    """Patient ids grouped by stratum, each group in sorted (deterministic) order."""
    groups = _patients(rows)
    freq = Counter(r.labels.get(task, "") for r in rows)
    strata: dict[str, list[str]] = defaultdict(list)
    for pid in sorted(groups):
        strata[_stratum(groups[pid], task, freq)].append(pid)
    return strata


def _allocate(n: int, fractions: dict[str, float]) -> list[str]:
    """Split n items by fractions with the largest-remainder rule (sums exactly to n)."""
    total = sum(fractions.values())
    quotas = {k: n * v / total for k, v in fractions.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: quotas[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in fractions for _ in range(counts[k])]


def assign_splits(rows: list[Row], stratify_task: str, fractions: dict[str, float] | None = None,
                  seed: int = 0) -> list[Row]:
    """Return rows with `split` set by patient, stratified by `stratify_task`, deterministic from `seed`.

    Patients with no labelled image go to "unlabeled"; rows already marked "unlabeled" stay there.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    if set(fractions) - {"train", "val", "test"} or any(v < 0 for v in fractions.values()):
        raise ValueError(f"fractions must be non-negative values for train/val/test, got {fractions}")
    strata = _strata([r for r in rows if r.split != "unlabeled"], stratify_task)
    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    for stratum in sorted(strata):
        pids = strata[stratum]
        if stratum == "":
            split_of.update({pid: "unlabeled" for pid in pids})
            continue
        rng.shuffle(pids)
        for pid, split in zip(pids, _allocate(len(pids), fractions)):
            split_of[pid] = split
    return [replace(r, split=split_of.get(r.patient_id, r.split)) if r.split != "unlabeled" else replace(r)
            for r in rows]


def label_fraction(rows: list[Row], fraction: float, stratify_task: str, seed: int = 0) -> list[Row]:
    """Keep `fraction` of the labelled *training patients*; move the rest to "unlabeled" (labels cleared).

    Validation and test are untouched, so results at different fractions are comparable.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    strata = _strata([r for r in rows if r.split == "train"], stratify_task)
    rng = random.Random(seed)
    keep: set[str] = set()
    for stratum in sorted(strata):
        pids = strata[stratum]
        rng.shuffle(pids)
        # At least one patient per class stays labelled, so no class vanishes from training.
        keep.update(pids[: max(1, round(fraction * len(pids)))])
    out = []
    for r in rows:
        if r.split == "train" and r.patient_id not in keep:
            out.append(replace(r, split="unlabeled", labels={k: "" for k in r.labels}))
        else:
            out.append(replace(r))
    return out


def leaking_patients(rows: list[Row]) -> dict[str, set[str]]:
    """Patients that appear in more than one of train/val/test (should be empty)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.split in ("train", "val", "test"):
            seen[r.patient_id].add(r.split)
    return {pid: s for pid, s in seen.items() if len(s) > 1}

"""Predictions next to the truth: images from a dataset manifest, per-task accuracy, and heads that disagree.

Torch-free (csv + the contract), so it runs on a device. A manifest is the dataset folder's CSV
(`path, patient_id, eye, split, <one column per task>`; paths relative to the CSV). `deploy.predict
--manifest` uses it to pick images of one split (the test split by default: never training images
for a demo), to print the true labels next to the predictions and to report accuracy per task.

Heads that disagree. A model with a coarse task (disease) and a fine one (sub-category) can say
"glaucoma" with one head and "normal_clean" with the other. Whether that is a contradiction needs to
know which fine class belongs to which coarse class: the *hierarchy* `{fine: {"parent": "coarse",
"classes": {fine class: coarse class}}}`. Export writes it into the contract's `extra` from the
dataset: an explicit `<child>_to_<parent>` mapping in dataset.yaml's `extra`, or else derived from
the labelled rows when every fine class seen (at least MIN_SUPPORT times) comes with one coarse class
only. Without a hierarchy in the contract, `--manifest` derives it from the manifest the same way;
with neither, no disagreement is flagged (two unrelated tasks, like DR grade and oedema risk, cannot
contradict each other). The text head is not checked: a sentence has no class to compare.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.contract import Contract, TaskSpec
from deploy.errors import UserError

MIN_SUPPORT = 2  # labelled rows a fine class needs before its coarse class is trusted


class ManifestError(UserError):
    """A manifest CSV that cannot be read as one; the message names the file/row and the fix."""


@dataclass
class LabelledImage:
    path: Path
    labels: dict[str, str] = field(default_factory=dict)  # task -> true label ('' = unlabelled)
    split: str = ""


def read_manifest(path: str | Path, tasks: Sequence[TaskSpec], split: str | None = "test") -> list[LabelledImage]:
    """The rows of `split` (None: all rows) with their labels for the contract's tasks."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc}); give the dataset's manifest.csv") from exc
    if not rows or "path" not in rows[0]:
        raise ManifestError(f"{path}: not a manifest (no 'path' column or no rows); give the dataset's manifest.csv")
    if split is not None and "split" not in rows[0]:
        raise ManifestError(f"{path}: no 'split' column; pass --split all to use every row")
    chosen = [r for r in rows if split is None or r.get("split") == split]
    if not chosen:
        splits = sorted({r.get("split", "") for r in rows})
        raise ManifestError(f"{path}: no rows in split {split!r}; splits present: {splits}")
    return [LabelledImage(_resolve(path, r["path"]), {t.name: (r.get(t.name) or "").strip() for t in tasks},
                          r.get("split", "")) for r in chosen]


def _resolve(manifest: Path, item: str) -> Path:
    p = Path(item)
    return p if p.is_absolute() else manifest.parent / p


def spread(images: list[LabelledImage], task: str | None, limit: int | None) -> list[LabelledImage]:
    """At most `limit` images, taken in turn from each true class of `task` (manifest order within a
    class), so a short demo shows several diseases rather than the first rows' one."""
    if limit is None or limit >= len(images):
        return images
    by_class: dict[str, list[LabelledImage]] = {}
    for image in images:
        by_class.setdefault(image.labels.get(task, "") if task else "", []).append(image)
    queues = list(by_class.values())
    picked: list[LabelledImage] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


# --- the hierarchy between two classification tasks ----------------------------------------------------
def derive_hierarchy(tasks: Sequence[TaskSpec], labels: Sequence[Mapping[str, str]],
                     explicit: Mapping | None = None) -> dict:
    """{child task: {"parent": task, "classes": {child class: parent class}}} for each pair of
    classification tasks where the child refines the parent (see the module doc)."""
    explicit = explicit or {}
    classification = [t for t in tasks if t.kind == "classification"]
    found: dict = {}
    for child in classification:
        for parent in classification:
            if child.num_classes <= parent.num_classes or child.name in found:
                continue
            given = explicit.get(f"{child.name}_to_{parent.name}")
            mapping = dict(given) if isinstance(given, Mapping) else _nested(child.name, parent.name, labels)
            if mapping:
                found[child.name] = {"parent": parent.name, "classes": {str(k): str(v) for k, v in mapping.items()}}
    return found


def _nested(child: str, parent: str, labels: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """child class -> parent class when the labels nest (each child class with one parent), else {}."""
    seen: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for row in labels:
        c, p = row.get(child) or "", row.get(parent) or ""
        if c and p:
            seen.setdefault(c, set()).add(p)
            count[c] = count.get(c, 0) + 1
    if not seen or any(len(parents) > 1 for parents in seen.values()):
        return {}
    trusted = {c: next(iter(parents)) for c, parents in seen.items() if count[c] >= MIN_SUPPORT}
    return trusted if len(set(trusted.values())) > 1 else {}


def disagreements(tasks: Mapping[str, object], hierarchy: Mapping) -> list[str]:
    """Why the heads of one prediction contradict each other (empty when they agree)."""
    found = []
    for child, rule in hierarchy.items():
        child_result, parent_result = tasks.get(child), tasks.get(rule["parent"])
        label, parent_label = getattr(child_result, "label", None), getattr(parent_result, "label", None)
        expected = rule["classes"].get(label)
        if expected is not None and parent_label is not None and expected != parent_label:
            found.append(f"{rule['parent']} says {parent_label} but {child} top-1 {label} belongs to {expected}")
    return found


# --- accuracy against the truth -------------------------------------------------------------------
def verdict(task: TaskSpec, result: object, truth: str) -> str:
    """'ok', 'WRONG', 'in top-5 (#2)', 'not in top-5' or '' (no label / no result)."""
    if not truth or result is None:
        return ""
    if task.kind == "text":
        return "exact" if getattr(result, "text", None) == truth else ""
    if result.label == truth:
        return "ok"
    ranked = [c for c, _ in result.top5]
    if task.num_classes > 5:
        return f"in top-5 (#{ranked.index(truth) + 1})" if truth in ranked else "not in top-5"
    return "WRONG"


def accuracy(contract: Contract, results: Sequence[tuple[Mapping[str, object], Mapping[str, str]]]) -> dict:
    """Per task over (predicted tasks, true labels) pairs of the images that have a label: n and top-1
    (classification; top-5 too above 5 classes) or exact-match rate (text), as fractions."""
    report: dict[str, dict] = {}
    for task in contract.tasks:
        pairs = [(pred[task.name], truth[task.name]) for pred, truth in results
                 if truth.get(task.name) and task.name in pred]
        if not pairs:
            continue
        if task.kind == "text":
            report[task.name] = {"n": len(pairs), "exact_match": _share(r.text == t for r, t in pairs)}
            continue
        entry = {"n": len(pairs), "top1": _share(r.label == t for r, t in pairs)}
        if task.num_classes > 5:
            entry["top5"] = _share(t in [c for c, _ in r.top5] for r, t in pairs)
        report[task.name] = entry
    return report


def _share(hits) -> float:
    hits = list(hits)
    return sum(hits) / len(hits)


def accuracy_line(report: dict) -> str:
    """'coarse top-1 87.5 % (8), fine top-1 62.5 % top-5 100.0 % (8), diagnosis exact 12.5 % (8)'."""
    parts = []
    for task, entry in report.items():
        metrics = " ".join(f"{k.replace('exact_match', 'exact').replace('top', 'top-')} {100 * v:.1f} %"
                           for k, v in entry.items() if k != "n")
        parts.append(f"{task} {metrics} (n={entry['n']})")
    return ", ".join(parts)

"""IDRiD disease-grading adapter (Indian Diabetic Retinopathy Image Dataset, part B).

Tasks: `dr_grade` (T1, retinopathy grade 0-4), `edema_risk` (T2, risk of macular edema 0-2) and
`diagnosis` (T3, a sentence built from both). The official test set stays the test split; the
training set is split into train/val by seed.

IDRiD has no patient ids, so each image is its own "patient" (prefixed by its set: the test images
reuse the names IDRiD_001... of the training images). Eyes are unknown.
"""

from __future__ import annotations

import csv
from pathlib import Path

from deploy.contract import TaskSpec
from train.data.adapters.common import Adapted, ImageResolver, Sample, nothing_left
from train.data.manifest import DatasetError

GRADES = ("no_dr", "mild", "moderate", "severe", "proliferative")
RISKS = ("no_risk", "low", "high")
GRADE_TEXT = ("no diabetic retinopathy", "mild non proliferative diabetic retinopathy",
              "moderate non proliferative diabetic retinopathy", "severe non proliferative diabetic retinopathy",
              "proliferative diabetic retinopathy")
RISK_TEXT = ("no risk of macular edema", "low risk of macular edema", "high risk of macular edema")
COLUMNS = {"name": "image name", "grade": "retinopathy grade", "risk": "risk of macular edema"}


def _normal(header: str) -> str:
    return " ".join(header.strip().lower().split())


def _find_file(src: Path, needle: str) -> Path | None:
    found = sorted(p for p in src.rglob("*.csv") if needle in _normal(p.name))
    return found[0] if found else None


def _find_dir(src: Path, suffixes: tuple[str, ...]) -> Path | None:
    found = [p for p in src.rglob("*") if p.is_dir() and _normal(p.name).endswith(suffixes)]
    # The full IDRiD release also has segmentation/localization parts with "a. Training Set" folders.
    found.sort(key=lambda p: ("grading" not in str(p).lower(), str(p)))
    return found[0] if found else None


def discover(src: Path) -> dict[str, Path | None]:
    """Label files and image folders below the release root, by their release names."""
    return {"train_labels": _find_file(src, "training labels"), "test_labels": _find_file(src, "testing labels"),
            "train_images": _find_dir(src, ("training set", "train")),
            "test_images": _find_dir(src, ("testing set", "test"))}


def _grade(value: str, limit: int) -> int | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() and 0 <= number < limit else None


def read_labels(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, image name, grade, risk) rows; tolerant of trailing spaces, BOMs and empty columns."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    header = [_normal(h) for h in rows[0]] if rows else []
    index = {}
    for key, wanted in COLUMNS.items():
        if wanted not in header:
            raise DatasetError(f"{path}: column {wanted!r} not found in header {[h for h in header if h]}; "
                               "is this an IDRiD disease-grading label file?")
        index[key] = header.index(wanted)
    out = []
    for line, values in enumerate(rows[1:], start=2):
        values = values + [""] * (len(header) - len(values))
        if not any(v.strip() for v in values):
            continue
        out.append((line, *(values[index[k]].strip() for k in ("name", "grade", "risk"))))
    return out


def _samples(labels: Path, images: Path, split: str, skipped: list[str]) -> list[Sample]:
    resolver = ImageResolver(images)
    out = []
    for line, name, grade_text, risk_text in read_labels(labels):
        origin = f"{labels.name} line {line}"
        grade, risk = _grade(grade_text, len(GRADES)), _grade(risk_text, len(RISKS))
        if grade is None or risk is None:
            skipped.append(f"{origin}: bad grade {grade_text!r} (0-4) or risk {risk_text!r} (0-2)")
            continue
        source = resolver.find(name)
        if source is None:
            skipped.append(f"{origin}: image {name} not found in {images}")
            continue
        out.append(Sample(source=source, patient_id=f"{'test' if split == 'test' else 'train'}/{Path(name).stem}",
                          split=split, origin=f"{origin} ({name})",
                          labels={"dr_grade": GRADES[grade], "edema_risk": RISKS[risk],
                                  "diagnosis": f"{GRADE_TEXT[grade]}, {RISK_TEXT[risk]}."}))
    return out


def read_idrid(train_labels: Path, train_images: Path, test_labels: Path | None = None,
               test_images: Path | None = None, val_frac: float = 0.15, name: str = "idrid") -> Adapted:
    """Read IDRiD grading labels; without a test set the training set is split train/val/test."""
    if not 0.0 < val_frac < 0.5:
        raise DatasetError(f"--val-frac must be in (0, 0.5), got {val_frac}")
    skipped: list[str] = []
    warnings: list[str] = []
    samples = _samples(train_labels, train_images, "", skipped)
    fractions = {"train": 1.0 - val_frac, "val": val_frac, "test": 0.0}
    if test_labels is not None and test_images is not None:
        samples += _samples(test_labels, test_images, "test", skipped)
    else:
        warnings.append("no official test set found (labels or images); the training set is split "
                        "train/val/test instead, so results are not comparable with published ones")
        fractions = {"train": 1.0 - 2 * val_frac, "val": val_frac, "test": val_frac}
    if not samples:
        raise nothing_left(name, skipped)
    tasks = [TaskSpec("dr_grade", "classification", GRADES, "diabetic retinopathy grade (IDRiD 0-4)", ordinal=True,
                      normal=GRADES[0]),
             TaskSpec("edema_risk", "classification", RISKS, "risk of diabetic macular edema (IDRiD 0-2)",
                      ordinal=True, normal=RISKS[0]),
             TaskSpec("diagnosis", "text", description="grade and edema risk as a sentence")]
    return Adapted(name=name, tasks=tasks, samples=samples, skipped=skipped, warnings=warnings,
                   fractions=fractions, description="IDRiD disease grading; one image per patient (no ids)",
                   joint=[("dr_grade", "edema_risk")])  # the challenge's score: both right

"""ODIR-5K adapter: Kaggle `full_df.csv` or the challenge `..._Annotations(Updated)_V2.xlsx`.

Tasks: `category` (T1, the eye's ODIR category, see odir_keywords), `finding` (T2, the eye's
normalized keyword set, rare sets grouped into "other") and `diagnosis` (T3, the keywords as a
sentence). One sample per eye image; patient = ODIR `ID`, so both eyes always share a split.

Kaggle's CSV has one row per kept eye image (`filename` names it; its `filepath` is a Kaggle path and
is ignored); the challenge xlsx has one row per patient with both eyes' columns.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from deploy.contract import TaskSpec
from train.data.adapters import odir_keywords as kw
from train.data.adapters.common import Adapted, ImageResolver, Sample, eye_from_name, group_rare, nothing_left
from train.data.manifest import DatasetError

CSV_NAME = "full_df.csv"
XLSX_GLOB = "*Training_Annotations*.xlsx"
IMAGE_FOLDERS = ("preprocessed_images", "ODIR-5K_Training_Images", "Training Images")
REQUIRED = ("id", "left-fundus", "right-fundus", "left-diagnostic keywords", "right-diagnostic keywords")


def find_labels(src: Path) -> Path:
    """The label file: `src` itself, or full_df.csv / the annotations xlsx somewhere below it."""
    if src.is_file():
        return src
    for pattern in (CSV_NAME, XLSX_GLOB):
        found = sorted(src.rglob(pattern))
        if found:
            return found[0]
    raise DatasetError(f"{src}: no {CSV_NAME} or {XLSX_GLOB} found below it; pass the label file with --labels")


def find_images(labels: Path, src: Path) -> Path:
    """The image folder next to (or below) the label file or `src`, by its release name."""
    for base in dict.fromkeys((labels.parent, src if src.is_dir() else src.parent)):
        for name in IMAGE_FOLDERS:
            if (base / name).is_dir():
                return base / name
            found = sorted(p for p in base.rglob(name) if p.is_dir())
            if found:
                return found[0]
    raise DatasetError(f"{labels}: no image folder ({', '.join(IMAGE_FOLDERS)}) found near it; "
                       "pass it with --images")


def _cell(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def read_table(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with lower-cased, trimmed headers) from the CSV or the xlsx's first sheet."""
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook  # only the challenge release needs it

        book = load_workbook(path, read_only=True, data_only=True)
        try:
            rows = list(book.worksheets[0].iter_rows(values_only=True))
        finally:
            book.close()
    else:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    if not rows:
        raise DatasetError(f"{path}: empty label file")
    header = [_cell(h).lower() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing}; is this an ODIR-5K label file? "
                           f"found {[h for h in header if h]}")
    table = []
    for line, values in enumerate(rows[1:], start=2):
        rec = {h: _cell(v) for h, v in zip(header, values) if h}
        if any(rec.values()):
            table.append((line, rec))
    return table


def eye_records(path: Path, table: list[tuple[int, dict[str, str]]]) -> list[tuple[str, str, str, str, str]]:
    """(patient, eye, file name, keywords, origin) per eye image, de-duplicated by file name."""
    out, seen = [], set()
    for line, rec in table:
        origin = f"{path.name} line {line}"
        eyes = {"left": rec["left-fundus"], "right": rec["right-fundus"]}
        chosen = rec.get("filename", "")
        if chosen:  # Kaggle: this row is about one image only
            eye = next((e for e, f in eyes.items() if f.lower() == chosen.lower()), eye_from_name(chosen))
            pairs = [(eye, chosen)] if eye != "unknown" else []
        else:
            pairs = [(e, f) for e, f in eyes.items() if f]
        for eye, name in pairs:
            if name.lower() in seen:
                continue
            seen.add(name.lower())
            out.append((rec["id"], eye, name, rec[f"{eye}-diagnostic keywords"], origin))
    return out


def read_odir(labels: Path, images: Path, min_fine_count: int = 10, name: str = "odir") -> Adapted:
    """Read an ODIR-5K release into per-eye samples with category / finding / diagnosis labels."""
    table = read_table(labels)
    resolver = ImageResolver(images)
    samples: list[Sample] = []
    keyword_lists: list[list[str]] = []
    skipped: list[str] = []
    unknown: Counter[str] = Counter()
    for patient, eye, fname, text, origin in eye_records(labels, table):
        words = kw.split_keywords(text)
        reason = kw.exclusion_reason(words)
        source = resolver.find(fname)
        if source is None:
            skipped.append(f"{origin}: image {fname} not found in {images}")
            continue
        if reason:
            skipped.append(f"{origin}: {fname} excluded: {reason}")
            continue
        unknown.update(kw.unknown_keywords(words))
        samples.append(Sample(source=source, patient_id=patient, eye=eye, origin=f"{origin} ({fname})",
                              labels={"category": kw.category(words), "diagnosis": kw.sentence(words, eye)}))
        keyword_lists.append(words)
    warnings = []
    if unknown:
        warnings.append("keywords not in the ODIR table, counted as 'other' (extend train/data/adapters/"
                        "odir_keywords.py): " + ", ".join(f"{k!r} x{c}" for k, c in sorted(unknown.items())))
    if not samples:
        raise nothing_left(name, skipped)
    fine, fine_classes = group_rare([kw.finding(w) for w in keyword_lists], min_fine_count)
    if len(fine_classes) < 2:
        raise DatasetError(f"{labels}: only {len(fine_classes)} fine finding class(es) with "
                           f"--min-fine-count {min_fine_count}; lower it (fewer images than expected?)")
    for sample, value in zip(samples, fine):
        sample.labels["finding"] = value
    # Only the categories that occur (in ODIR's order): a subset of the release may lack one, and a class
    # with no image cannot be learned (the validator refuses it).
    seen = {s.labels["category"] for s in samples}
    categories = tuple(c for c in kw.CATEGORY_NAMES.values() if c in seen)
    if len(categories) < 2:
        raise DatasetError(f"{labels}: only category {list(categories)} occurs; a classifier needs two or more")
    if len(categories) < len(kw.CATEGORY_NAMES):
        warnings.append(f"categories without any image are left out of dataset.yaml: "
                        f"{[c for c in kw.CATEGORY_NAMES.values() if c not in seen]}")
    tasks = [TaskSpec("category", "classification", categories,
                      "ODIR category of this eye from its own keywords",
                      normal="normal" if "normal" in categories else None),
             TaskSpec("finding", "classification", tuple(fine_classes),
                      f"normalized keyword set; sets seen < {min_fine_count} times are 'other'"),
             TaskSpec("diagnosis", "text", description="the eye's diagnostic keywords as a sentence")]
    return Adapted(name=name, tasks=tasks, samples=samples, skipped=skipped, warnings=warnings,
                   description=f"ODIR-5K from {labels.name}, one sample per eye image")

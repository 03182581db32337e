"""Generic adapters: class-per-folder sets, a CSV of paths and labels, and folders of unlabelled images.

They cover the sets users bring (APTOS `train.csv`, EyePACS `trainLabels.csv`, RFMiD's one-hot CSV,
class folders) without writing code. None of these formats has patient ids unless the CSV has a
column for them; then every image is its own patient, which is only leak-free if each patient has a
single image — the adapters say so in a warning.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from deploy.contract import TaskSpec
from train.data.adapters.common import (
    Adapted,
    ImageResolver,
    Sample,
    eye_from_name,
    finish_dataset,
    is_image,
    make_resized_copies,
    nothing_left,
)
from train.data.manifest import MANIFEST_FILE, DatasetError, Row, load_spec, read_manifest, write_manifest

NO_PATIENTS = ("no patient ids: every image is its own patient, so if a patient has several images "
               "they may land in different splits")
_EYES = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}


def images_below(folder: Path) -> list[Path]:
    """Image files below `folder`, sorted by path (deterministic on every file system)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))


def task_name(column: str) -> str:
    """A column header as a task name: 'Retinopathy grade' -> 'retinopathy_grade'."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", column.strip()).strip("_").lower()
    return f"t_{name}" if not name or name[0].isdigit() else name


def class_order(values: set[str]) -> list[str]:
    """Numeric labels in numeric order ('2' before '10'), others alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _label(value: str) -> str:
    value = value.strip()
    return value[: value.index(".")] if re.fullmatch(r"-?\d+\.0+", value) else value  # '1.0' from a spreadsheet


def read_folders(src: Path, name: str = "folders") -> Adapted:
    """One subfolder of `src` per class; task `label`."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if src.is_dir() else []
    samples = [Sample(source=path, patient_id=path.relative_to(src).with_suffix("").as_posix(),
                      eye=eye_from_name(path.name), labels={"label": cls}, origin=str(path.relative_to(src)))
               for cls in classes for path in images_below(src / cls)]
    used = sorted({s.labels["label"] for s in samples})
    if len(used) < 2:
        raise DatasetError(f"{src}: found images in {len(used)} class folder(s) {used}; a class-per-folder "
                           "dataset needs one subfolder per class with images in at least two")
    empty = sorted(set(classes) - set(used))
    warnings = [NO_PATIENTS] + ([f"class folders without images, ignored: {empty}"] if empty else [])
    task = TaskSpec("label", "classification", tuple(used), f"class folder name under {src.name}")
    return Adapted(name=name, tasks=[task], samples=samples, warnings=warnings,
                   description=f"class-per-folder images from {src}")


def _column(header: list[str], wanted: str, path: Path) -> str:
    if wanted in header:
        return wanted
    for h in header:
        if h.strip().lower() == wanted.strip().lower():
            return h
    raise DatasetError(f"{path}: no column {wanted!r}; columns are {header}")


def read_csv(path: Path, path_column: str, label_columns: list[str], images: Path | None = None,
             patient_column: str | None = None, eye_column: str | None = None,
             text_column: str | None = None, name: str = "csv", ordinal_columns: list[str] = (),
             joint_columns: list[str] = (), patient_pattern: str | None = None) -> Adapted:
    """A CSV with an image path column, one classification task per label column, optional text task.

    Paths are relative to `images` (default: the CSV's folder) and may omit the extension. Label columns
    in `ordinal_columns` are grades (numeric labels required, so their order is the grade order); the
    `joint_columns` are scored together (all right on the same image). `patient_pattern`: a regular
    expression whose first group, searched in the path column, is the patient id (EyePACS `10_left` ->
    `10`), so both eyes of a patient stay in one split.
    """
    try:
        patient_re = re.compile(patient_pattern) if patient_pattern else None
    except re.error as exc:
        raise DatasetError(f"--patient-pattern {patient_pattern!r}: not a regular expression ({exc})") from exc
    if patient_re is not None and patient_re.groups < 1:
        raise DatasetError(f"--patient-pattern {patient_pattern!r} needs a group, e.g. '^(\\d+)_'")
    for option, columns in (("--ordinal-columns", ordinal_columns), ("--joint", joint_columns)):
        extra = sorted(set(columns) - set(label_columns))
        if extra:
            raise DatasetError(f"{option} {extra}: not among --label-columns {label_columns}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        records = list(enumerate(reader, start=2))
    names = [task_name(c) for c in [*label_columns, *([text_column] if text_column else [])]]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: label/text columns give duplicate task names {names}; rename the columns")
    col = {"path": _column(header, path_column, path)}
    labels = {task_name(c): _column(header, c, path) for c in label_columns}
    texts = {task_name(text_column): _column(header, text_column, path)} if text_column else {}
    for key, wanted in (("patient", patient_column), ("eye", eye_column)):
        if wanted:
            col[key] = _column(header, wanted, path)
    resolver = ImageResolver(images or path.parent)
    samples, skipped, seen = [], [], set()
    for line, rec in records:
        origin = f"{path.name} line {line}"
        ref = (rec.get(col["path"]) or "").strip()
        source = resolver.find(ref)
        if source is None:
            skipped.append(f"{origin}: image {ref!r} not found in {resolver.base}")
            continue
        if source in seen:
            skipped.append(f"{origin}: image {ref!r} listed twice; kept the first row")
            continue
        seen.add(source)
        if "eye" in col:
            eye = _EYES.get((rec.get(col["eye"]) or "").strip().lower(), "unknown")
        else:
            eye = eye_from_name(source.name)
        patient = (rec.get(col["patient"]) or "").strip() if "patient" in col else ""
        if patient_re is not None and (found := patient_re.search(ref)):
            patient = found.group(1)
        samples.append(Sample(source=source, patient_id=patient or Path(ref).with_suffix("").as_posix(), eye=eye,
                              origin=f"{origin} ({ref})",
                              labels={**{t: _label(rec.get(c) or "") for t, c in labels.items()},
                                      **{t: (rec.get(c) or "").strip() for t, c in texts.items()}}))
    if not samples:
        raise nothing_left(name, skipped)
    tasks = []
    for task, column in labels.items():
        values = class_order({s.labels[task] for s in samples if s.labels[task]})
        if len(values) < 2:
            raise DatasetError(f"{path}: column {column!r} has {len(values)} distinct label(s) {values}; "
                               "a classification task needs at least two")
        ordinal = column in ordinal_columns
        if ordinal and not all(_is_number(v) for v in values):
            raise DatasetError(f"{path}: column {column!r} is declared ordinal but has non-numeric labels "
                               f"{[v for v in values if not _is_number(v)][:5]}; grades must be numbers")
        tasks.append(TaskSpec(task, "classification", tuple(values), f"column {column!r} of {path.name}",
                              ordinal=ordinal))
    tasks += [TaskSpec(t, "text", description=f"column {c!r} of {path.name}") for t, c in texts.items()]
    joint = [tuple(task_name(c) for c in joint_columns)] if len(joint_columns) >= 2 else []
    return Adapted(name=name, tasks=tasks, samples=samples, skipped=skipped, joint=joint,
                   warnings=[] if patient_column or patient_pattern else [NO_PATIENTS],
                   description=f"images listed in {path}")


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_unlabeled(src: Path, name: str = "unlabeled") -> Adapted:
    """Every image below `src` as split `unlabeled` (for distillation on unlabelled data)."""
    samples = [Sample(source=p, patient_id="unlabeled/" + p.relative_to(src).with_suffix("").as_posix(),
                      eye=eye_from_name(p.name), split="unlabeled", origin=str(p.relative_to(src)))
               for p in (images_below(src) if src.is_dir() else [])]
    if not samples:
        raise DatasetError(f"{src}: no image files ({', '.join(('jpg', 'png', 'tif', 'bmp'))}) found below it")
    return Adapted(name=name, tasks=[], samples=samples, description=f"unlabelled images from {src}")


def append_unlabeled(adapted: Adapted, out: Path, resize: int | None = None, workers: int = 1) -> list[Row]:
    """Add `adapted`'s images as `unlabeled` rows to the dataset in `out` (or create one without tasks).

    Images already in the manifest are skipped (reported); the vocabulary is left as it is, because it
    comes from the training split only.
    """
    if not (out / "dataset.yaml").is_file():
        return finish_dataset(adapted, out, resize=resize, workers=workers)
    spec = load_spec(out)
    manifest = out / spec.manifest
    rows = read_manifest(manifest, spec.task_names) if manifest.is_file() else []
    present = {(Path(r.path) if Path(r.path).is_absolute() else manifest.parent / r.path).resolve() for r in rows}
    new = []
    for s in adapted.samples:
        if s.source.resolve() in present:
            adapted.skipped.append(f"{s.origin}: already in {manifest.name}; not added again")
        else:
            new.append(s)
    if resize:
        taken = {Path(r.path).name.lower() for r in rows if r.path.startswith("images/unlabeled/")}
        pairs, failed = make_resized_copies(new, out, resize, workers, folder="images/unlabeled", taken=taken)
        adapted.skipped.extend(failed)
    else:
        pairs = [(s, str(s.source.resolve())) for s in new]
    rows += [Row(path=rel, patient_id=s.patient_id, eye=s.eye, split="unlabeled",
                 labels={t: "" for t in spec.task_names}) for s, rel in pairs]
    write_manifest(out / (spec.manifest or MANIFEST_FILE), rows, spec.task_names)
    return rows

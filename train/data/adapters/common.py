"""Shared adapter machinery: find images by name, make resized copies, write the dataset folder.

Every adapter turns its label files into `Sample`s (one per image, pointing at the original file),
collects what it had to skip, and hands an `Adapted` to `finish_dataset`, which assigns splits,
writes manifest.csv / dataset.yaml / vocab.json and returns a printable summary. Images are always
joined to labels by file name, never by directory listing order (a published IDRiD re-implementation
paired `os.listdir()` order with CSV rows and trained on shuffled labels).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from deploy.contract import TaskSpec
from deploy.fileio import atomic_write
from deploy.preprocess import ImageError, load_image, to_rgb
from train.data.manifest import (
    MANIFEST_FILE,
    VOCAB_FILE,
    DatasetError,
    DatasetSpec,
    Row,
    build_vocabulary,
    save_spec,
    write_manifest,
)
from train.data.splits import DEFAULT_FRACTIONS, assign_splits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
REPORT_FILE = "adapt_report.txt"


@dataclass
class Sample:
    """One labelled (or unlabelled) image as found in the source, before splitting."""

    source: Path
    patient_id: str
    eye: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)
    split: str = ""  # "" = assign by seed; "test" for an official test set; "unlabeled"
    origin: str = ""  # where it came from, e.g. "full_df.csv line 12", for messages


@dataclass
class Adapted:
    """What an adapter read: the tasks, the usable samples, and what it skipped or noticed."""

    name: str
    tasks: list[TaskSpec]
    samples: list[Sample]
    description: str = ""
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fractions: dict[str, float] | None = None  # split fractions for samples without a preset split
    joint: list[tuple[str, ...]] = field(default_factory=list)  # tasks scored together (joint accuracy)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def eye_from_name(name: str) -> str:
    """'12_left.jpg' -> 'left'; ODIR-style names carry the eye, others give 'unknown'."""
    tokens = set(re.split(r"[^a-z]+", name.lower()))
    if "left" in tokens and "right" not in tokens:
        return "left"
    if "right" in tokens and "left" not in tokens:
        return "right"
    return "unknown"


class ImageResolver:
    """Finds an image by the name a label file gives it, inside one base folder.

    Tries the exact relative path, then the name with a known image extension added (IDRiD, APTOS
    and EyePACS label files omit it), then a case-insensitive match within the same folder.
    """

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self._listings: dict[Path, dict[str, Path]] = {}

    def _listing(self, folder: Path) -> dict[str, Path]:
        if folder not in self._listings:
            entries = {}
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if entry.is_file():
                        entries.setdefault(entry.name.lower(), Path(entry.path))
            self._listings[folder] = entries
        return self._listings[folder]

    def find(self, name: str) -> Path | None:
        name = name.strip().replace("\\", "/")
        if not name:
            return None
        candidate = Path(name) if Path(name).is_absolute() else self.base / name
        if candidate.is_file():
            return candidate
        listing = self._listing(candidate.parent)
        wanted = [candidate.name.lower()]
        if candidate.suffix.lower() not in IMAGE_EXTENSIONS:
            wanted += [candidate.name.lower() + ext for ext in IMAGE_EXTENSIONS]
        for key in wanted:
            if key in listing:
                return listing[key]
        return None


def sentence_list(items: list[str]) -> str:
    """['a'] -> 'a'; ['a', 'b', 'c'] -> 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def group_rare(values: list[str], min_count: int, other: str = "other") -> tuple[list[str], list[str]]:
    """Replace values seen fewer than `min_count` times by `other`; returns (values, class list).

    Classes are ordered by frequency (then name) with `other` last, so the list is deterministic.
    """
    counts = Counter(v for v in values if v)
    keep = {v for v, c in counts.items() if c >= min_count and v != other}
    mapped = [v if (not v or v in keep) else other for v in values]
    classes = sorted(keep, key=lambda v: (-counts[v], v))
    if any(v == other for v in mapped):
        classes.append(other)
    return mapped, classes


def _copy_name(sample: Sample, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", sample.source.stem) or "image"
    name, i = f"{stem}.jpg", 1
    while name.lower() in taken:
        name, i = f"{stem}_{i}.jpg", i + 1
    taken.add(name.lower())
    return name


def resized_copy(src: Path, dst: Path, size: int) -> str:
    """Write `src` as an RGB JPEG whose longer side is at most `size` (aspect kept, never enlarged).

    Returns '' on success or the reason the image could not be read.
    """
    try:
        with Image.open(src) as img:
            # JPEG decodes directly at 1/2..1/8 scale: a 4288 px IDRiD photo loads ~10x faster.
            img.draft("RGB", (size, size))
            img.load()
            rgb = to_rgb(img)
        rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
        atomic_write(dst, lambda p: rgb.save(p, format="JPEG", quality=95))
        return ""
    except (OSError, SyntaxError, ValueError) as exc:
        try:  # load_image words the problem the same way the validator does
            load_image(src)
        except ImageError as named:
            return str(named)
        return f"{src}: cannot be resized ({exc})"


def _resized_copy_args(args: tuple[Path, Path, int]) -> str:
    return resized_copy(*args)


def make_resized_copies(samples: list[Sample], out: Path, size: int, workers: int = 1, folder: str = "images",
                        taken: set[str] | None = None) -> tuple[list[tuple[Sample, str]], list[str]]:
    """Resized copies into `<out>/<folder>/`; returns (sample, manifest path) pairs and the failures.

    `taken`: lower-cased file names already used in that folder (appending must not overwrite them).
    """
    taken = set(taken or ())
    jobs = [(s, f"{folder}/{_copy_name(s, taken)}") for s in samples]
    args = [(s.source, out / rel, size) for s, rel in jobs]
    if workers > 1 and len(args) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            errors = list(pool.map(_resized_copy_args, args, chunksize=8))
    else:
        errors = [_resized_copy_args(a) for a in args]
    done = [(s, rel) for (s, rel), err in zip(jobs, errors) if not err]
    failed = [f"{s.origin}: {err}; skipped" for (s, _), err in zip(jobs, errors) if err]
    return done, failed


def nothing_left(name: str, skipped: list[str]) -> DatasetError:
    """The error for an adapter run that found no usable image, with the first reasons."""
    head = "\n  ".join(skipped[:10])
    return DatasetError(f"{name}: no usable image left ({len(skipped)} skipped)"
                        + (f"; first reasons:\n  {head}" if head else "; check --src and the images folder"))


def finish_dataset(adapted: Adapted, out: str | Path, seed: int = 0, resize: int | None = None,
                   workers: int = 1, fractions: dict[str, float] | None = None, min_freq: int = 1,
                   max_len: int = 24) -> list[Row]:
    """Assign splits and write the dataset folder `out`; returns the manifest rows.

    Raises DatasetError when no usable image is left (the message lists why rows were skipped).
    """
    out = Path(out)
    samples = adapted.samples
    if resize:
        pairs, failed = make_resized_copies(samples, out, resize, workers)
        adapted.skipped.extend(failed)
    else:
        pairs = [(s, str(s.source.resolve())) for s in samples]
    if not pairs:
        raise nothing_left(adapted.name, adapted.skipped)
    rows = [Row(path=rel, patient_id=s.patient_id, eye=s.eye, split=s.split, labels=dict(s.labels))
            for s, rel in pairs]
    spec = DatasetSpec(name=adapted.name, tasks=adapted.tasks, description=adapted.description, joint=adapted.joint)
    rows = _split_rows(rows, spec, seed, fractions or adapted.fractions or DEFAULT_FRACTIONS)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / MANIFEST_FILE, rows, spec.task_names)
    save_spec(spec, out)
    vocab = build_vocabulary(spec, rows, min_freq=min_freq, max_len=max_len)
    if vocab is not None:
        vocab.save(out / VOCAB_FILE)
    return rows


def stratify_task(spec: DatasetSpec) -> str:
    """Splits are stratified by the first classification task (else the first task)."""
    kinds = [t.name for t in spec.tasks if t.kind == "classification"] or spec.task_names
    return kinds[0] if kinds else ""


def _split_rows(rows: list[Row], spec: DatasetSpec, seed: int, fractions: dict[str, float]) -> list[Row]:
    todo = [i for i, r in enumerate(rows) if not r.split]
    if todo:
        assigned = assign_splits([rows[i] for i in todo], stratify_task(spec), fractions, seed=seed)
        for i, row in zip(todo, assigned):
            rows[i] = row
    return rows


def summary(rows: list[Row], spec: DatasetSpec, out: Path) -> str:
    """Images and patients per split, and images per class of each classification task (<= 12 classes)."""
    splits = ("train", "val", "test", "unlabeled")
    lines = [f"dataset {spec.name!r} -> {out}: {len(rows)} images, "
             f"{len({r.patient_id for r in rows})} patients",
             f"  {'split':<12}{'images':>8}{'patients':>10}"]
    for s in splits:
        part = [r for r in rows if r.split == s]
        lines.append(f"  {s:<12}{len(part):>8}{len({r.patient_id for r in part}):>10}")
    for task in spec.tasks:
        if task.kind != "classification":
            continue
        if len(task.classes) > 12:
            lines.append(f"  task {task.name}: {len(task.classes)} classes (see manifest.csv)")
            continue
        lines.append(f"  {task.name:<16}" + "".join(f"{s:>8}" for s in splits[:3]))
        for cls in task.classes:
            counts = [sum(1 for r in rows if r.split == s and r.labels.get(task.name) == cls) for s in splits[:3]]
            lines.append(f"  {cls:<16}" + "".join(f"{c:>8}" for c in counts))
    return "\n".join(lines)


def write_report(adapted: Adapted, out: Path) -> Path:
    """Everything skipped or noticed, one line each, into `<out>/adapt_report.txt`."""
    text = "".join(f"skipped: {s}\n" for s in adapted.skipped) + "".join(f"warning: {w}\n" for w in adapted.warnings)
    return atomic_write(out / REPORT_FILE, lambda p: p.write_text(text, encoding="utf-8"))

"""Check a dataset folder before anything trains on it, and report every problem with its line.

    python -m train.data.validate data/odir                # every problem; exit 2 if any error (data to fix)
    python -m train.data.validate data/odir --manifest manifest_frac15.csv
    python -m train.data.validate data/odir --build-vocab  # (re)build vocab.json from the train split first

Errors make training refuse the dataset (`check_dataset`); warnings do not (e.g. grayscale or 16-bit
images, which the preprocessing converts to 8-bit RGB). Decoding every image is the slow part, so it
runs in a process pool (`--workers`); `--no-images` skips it.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from deploy.errors import EXIT_OK, EXIT_USAGE, cli
from deploy.preprocess import ImageError, load_image
from deploy.vocab import Vocabulary, VocabularyError
from train.data.manifest import (
    EYES,
    SPLITS,
    VOCAB_FILE,
    Dataset,
    DatasetError,
    DatasetSpec,
    Row,
    build_vocabulary,
    load_spec,
    read_manifest,
)

LABELLED_SPLITS = ("train", "val", "test")
# Starting spawned workers costs ~1 s; below this many images one process is faster (measured here).
POOL_MIN_IMAGES = 256
_CONVERTED = {"L": "grayscale", "1": "1-bit", "P": "palette", "LA": "grayscale with alpha", "RGBA": "RGBA",
              "PA": "palette with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "I;16": "16-bit", "I;16B": "16-bit",
              "I;16L": "16-bit", "I": "32-bit integer", "F": "32-bit float"}


@dataclass(frozen=True)
class Problem:
    """One finding. `line` is the manifest line (header = 1); 0 for whole-dataset problems."""

    severity: str  # "error" or "warning"
    line: int
    path: str
    message: str
    code: str = ""  # short kind, e.g. "missing_file", to count and filter findings

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "dataset"
        return f"{self.severity}: {where}: {self.path + ': ' if self.path else ''}{self.message}"


def inspect_image(path: str, decode: bool = True) -> tuple[str, str]:
    """(error message or '', PIL mode or 'RGB' when not decoding) of one image; runs in worker processes."""
    if not decode:
        p = Path(path)
        if not p.is_file():
            return f"{path}: file not found; check the path (paths in a manifest are relative to it)", ""
        return (f"{path}: file is empty (0 bytes); re-copy it or drop its row", "") if p.stat().st_size == 0 \
            else ("", "RGB")
    try:
        load_image(path)
    except ImageError as exc:
        return str(exc), ""
    with Image.open(path) as img:
        return "", img.mode


def _row_problems(rows: list[Row], ds: Dataset) -> list[Problem]:
    problems = []
    first_line: dict[Path, int] = {}
    for r in rows:
        def add(code: str, message: str, severity: str = "error", r: Row = r) -> None:
            problems.append(Problem(severity, r.line, r.path, message, code))

        if not r.path:
            add("empty_path", "empty path; fill in the image path or delete the row")
        else:
            resolved = ds.image_path(r).resolve()
            if resolved in first_line:
                add("duplicate_path", f"same image as line {first_line[resolved]}; delete one of the rows")
            else:
                first_line[resolved] = r.line
        if not r.patient_id:
            add("empty_patient", "empty patient_id; use the image name when patients are unknown")
        if r.eye not in EYES:
            add("bad_eye", f"eye {r.eye!r} is not one of {list(EYES)}")
        if r.split not in SPLITS:
            add("bad_split", f"split {r.split!r} is not one of {list(SPLITS)}")
        for task in ds.spec.tasks:
            value = r.labels.get(task.name, "")
            if value and task.kind == "classification" and value not in task.classes:
                add("unknown_label", f"{task.name} label {value!r} is not in the class list "
                                     f"{list(task.classes)} of dataset.yaml; fix the label or add the class")
        if r.split == "unlabeled" and any(r.labels.values()):
            add("labelled_unlabeled", "row in split 'unlabeled' has labels; they are ignored", "warning")
    return problems


def _split_problems(rows: list[Row], ds: Dataset) -> list[Problem]:
    problems = []
    by_patient: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.split in LABELLED_SPLITS and r.patient_id:
            by_patient[r.patient_id].append(r)
    for pid, prs in by_patient.items():
        first = prs[0]
        other = next((r for r in prs if r.split != first.split), None)
        if other is not None:
            where = ", ".join(f"{r.split} (line {r.line})" for r in prs)
            problems.append(Problem("error", other.line, other.path, f"patient {pid!r} is in several splits: "
                                    f"{where}; put all of a patient's images in one split", "patient_leak"))
    if not any(r.is_labelled() for r in rows):
        problems.append(Problem("warning", 0, "", "no labelled image: usable for unlabelled distillation only",
                                "no_labels"))
        return problems
    for split in LABELLED_SPLITS:
        if not any(r.split == split and r.is_labelled() for r in rows):
            problems.append(Problem("error", 0, "", f"split {split!r} has no labelled image; re-run the "
                                    "adapter's split or move patients into it", "empty_split"))
    for task in ds.spec.tasks:
        if task.kind != "classification":
            continue
        seen = Counter(r.labels.get(task.name) for r in rows if r.split == "train")
        for cls in task.classes:
            if not seen[cls]:
                problems.append(Problem("error", 0, "", f"task {task.name}: class {cls!r} has no training image; "
                                        "drop the class from dataset.yaml or add images", "empty_class"))
    return problems


def _image_problems(rows: list[Row], ds: Dataset, workers: int, decode: bool) -> list[Problem]:
    todo = [r for r in rows if r.path]
    paths = [str(ds.image_path(r)) for r in todo]
    if decode and workers > 1 and len(paths) >= POOL_MIN_IMAGES:
        # spawn, not fork: training may call this after torch has started its thread pools.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(inspect_image, paths, chunksize=max(1, len(paths) // (workers * 8))))
    else:
        results = [inspect_image(p, decode) for p in paths]
    problems = []
    for r, (error, mode) in zip(todo, results):
        if error:
            code = "missing_file" if "not found" in error else "bad_image"
            problems.append(Problem("error", r.line, r.path, error, code))
        elif mode != "RGB":
            kind = _CONVERTED.get(mode, mode)
            problems.append(Problem("warning", r.line, r.path, f"{kind} image (mode {mode}); the preprocessing "
                                    "converts it to 8-bit RGB", "converted_mode"))
    return problems


def _vocabulary_problems(root: Path, spec: DatasetSpec) -> list[Problem]:
    """The text task's vocabulary must exist and load exactly as training will load it."""
    if not any(t.kind == "text" for t in spec.tasks):
        return []
    path = root / spec.vocabulary
    if not path.is_file():
        return [Problem("error", 0, spec.vocabulary, f"vocabulary missing; run `python -m train.data.validate {root} "
                        "--build-vocab`", "no_vocab")]
    try:
        Vocabulary.load(path)
    except VocabularyError as exc:
        return [Problem("error", 0, spec.vocabulary, str(exc), "bad_vocab")]
    return []


def validate_dataset(root: str | Path, manifest: str | None = None, check_images: bool = True,
                     workers: int | None = None) -> list[Problem]:
    """Every problem of a dataset folder, ordered by line; an unreadable spec/manifest is one error.

    `check_images=False` only checks that the files exist and are not empty (no decoding).
    """
    root = Path(root)
    try:
        spec = load_spec(root)
        if manifest:
            spec.manifest = manifest
        rows = read_manifest(root / spec.manifest, spec.task_names)
    except DatasetError as exc:
        return [Problem("error", 0, "", str(exc), "unreadable")]
    ds = Dataset(root=root, spec=spec, rows=rows, vocabulary=None)
    problems = _row_problems(rows, ds) + _split_problems(rows, ds)
    problems += _vocabulary_problems(root, spec)
    problems += _image_problems(rows, ds, workers or min(8, os.cpu_count() or 1), decode=check_images)
    return sorted(problems, key=lambda p: (p.line, p.severity != "error"))


def check_dataset(root: str | Path, manifest: str | None = None, check_images: bool = True,
                  workers: int | None = None, limit: int = 20) -> None:
    """Raise DatasetError listing the first `limit` errors (and the count) if the dataset has any."""
    errors = [p for p in validate_dataset(root, manifest, check_images, workers) if p.severity == "error"]
    if errors:
        lines = "\n  ".join(str(p) for p in errors[:limit])
        more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
        raise DatasetError(f"{root}: {len(errors)} error(s) in the dataset; fix them (details: "
                           f"`python -m train.data.validate {root}`):\n  {lines}{more}")


def rebuild_vocabulary(root: Path, manifest: str | None, min_freq: int, max_len: int) -> str:
    """Build vocab.json from the training split's text; returns a one-line note."""
    spec = load_spec(root)
    rows = read_manifest(root / (manifest or spec.manifest), spec.task_names)
    vocab = build_vocabulary(spec, rows, min_freq=min_freq, max_len=max_len)
    if vocab is None:
        return "no text task: no vocabulary needed"
    vocab.save(root / (spec.vocabulary or VOCAB_FILE))
    return f"vocabulary: {len(vocab)} tokens from the train split -> {root / spec.vocabulary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data.validate", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path, help="dataset folder (with dataset.yaml)")
    parser.add_argument("--manifest", help="another manifest in the folder (e.g. a label-fraction subset)")
    parser.add_argument("--build-vocab", action="store_true", help="(re)build vocab.json first")
    parser.add_argument("--min-freq", type=int, default=1, help="with --build-vocab: minimum word count")
    parser.add_argument("--max-len", type=int, default=24, help="with --build-vocab: at most this many tokens incl. <eos> (fewer when the longest training sentence is shorter)")
    parser.add_argument("--no-images", action="store_true", help="only check the files exist (no decoding)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.build_vocab:
        print(rebuild_vocabulary(args.dataset, args.manifest, args.min_freq, args.max_len))
    problems = validate_dataset(args.dataset, args.manifest, not args.no_images, args.workers)
    for p in problems:
        print(p)
    counts = Counter((p.severity, p.code) for p in problems)
    n_err = sum(c for (sev, _), c in counts.items() if sev == "error")
    print(f"{n_err} error(s), {len(problems) - n_err} warning(s)"
          + (": " + ", ".join(f"{c} {code} ({sev})" for (sev, code), c in sorted(counts.items())) if counts else ""))
    return EXIT_USAGE if n_err else EXIT_OK  # errors in the data are the user's to fix, like a bad config


if __name__ == "__main__":
    raise SystemExit(cli(main))

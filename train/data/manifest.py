"""The dataset format: a folder with `dataset.yaml`, `manifest.csv`, `vocab.json` and the images.

manifest.csv has one row per image: `path` (relative to the manifest, or absolute for adapters that
point at the original files), `patient_id`, `eye` (left/right/unknown), `split`
(train/val/test/unlabeled) and one column per task named after the task (empty = unlabelled).
dataset.yaml declares the tasks (name, kind, ordered class list). Every source — the synthetic
generator and every real-data adapter — writes exactly this, so training has one code path.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deploy.contract import TaskSpec
from deploy.errors import UserError
from deploy.fileio import atomic_write_text
from deploy.vocab import Vocabulary

SPLITS = ("train", "val", "test", "unlabeled")
EYES = ("left", "right", "unknown")
BASE_COLUMNS = ("path", "patient_id", "eye", "split")
SPEC_FILE, MANIFEST_FILE, VOCAB_FILE = "dataset.yaml", "manifest.csv", "vocab.json"


class DatasetError(UserError):
    """A dataset that cannot be used as it is; the message names the file/row and the fix."""


@dataclass
class Row:
    """One manifest row. `labels` maps task name -> raw label string ('' when unlabelled)."""

    path: str
    patient_id: str
    eye: str
    split: str
    labels: dict[str, str] = field(default_factory=dict)
    line: int = 0  # 1-based line in the CSV (header = line 1), for error messages

    def is_labelled(self, task: str | None = None) -> bool:
        if self.split == "unlabeled":
            return False
        if task is not None:
            return bool(self.labels.get(task, ""))
        return any(self.labels.values())


@dataclass
class DatasetSpec:
    """Contents of dataset.yaml."""

    name: str
    tasks: list[TaskSpec]
    description: str = ""
    manifest: str = MANIFEST_FILE
    vocabulary: str = VOCAB_FILE
    extra: dict = field(default_factory=dict)
    # Classification tasks scored together: "joint accuracy" = all of them right on the same image
    # (IDRiD's official DR grade + macular-oedema risk score).
    joint: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for group in self.joint:
            bad = [n for n in group if n not in self.task_names or self.task(n).kind != "classification"]
            if len(group) < 2 or bad:
                raise DatasetError(f"dataset {self.name!r}: joint task group {list(group)} must name >= 2 "
                                   f"classification tasks among {self.task_names}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"dataset {self.name!r} has no task {name!r}; tasks: {self.task_names}")

    def to_dict(self) -> dict:
        data = {"name": self.name, "description": self.description, "manifest": self.manifest,
                "vocabulary": self.vocabulary, "tasks": [t.to_dict() for t in self.tasks], "extra": self.extra}
        if self.joint:
            data["joint"] = [list(g) for g in self.joint]
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = SPEC_FILE) -> DatasetSpec:
        allowed = ("name", "description", "manifest", "vocabulary", "tasks", "extra", "joint")
        unknown = set(data) - set(allowed)
        if unknown:
            raise DatasetError(f"{source}: unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
        joint = data.get("joint") or []
        if not isinstance(joint, list) or not all(isinstance(g, list) for g in joint):
            raise DatasetError(f"{source}: joint must be a list of task-name lists, e.g. [[dr_grade, dme_risk]]")
        try:
            tasks = [TaskSpec.from_dict(t) for t in data["tasks"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{source}: bad task declaration ({exc})") from exc
        return cls(name=str(data.get("name", "dataset")), tasks=tasks, description=str(data.get("description", "")),
                   manifest=str(data.get("manifest", MANIFEST_FILE)),
                   vocabulary=str(data.get("vocabulary", VOCAB_FILE)), extra=dict(data.get("extra") or {}),
                   joint=[tuple(str(n) for n in g) for g in joint])


def save_spec(spec: DatasetSpec, root: str | Path) -> Path:
    return atomic_write_text(Path(root) / SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))


def load_spec(root: str | Path) -> DatasetSpec:
    path = Path(root) / SPEC_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found; a dataset folder needs dataset.yaml (run `make data` or an adapter)")
    try:
        data = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with name and tasks")
    return DatasetSpec.from_dict(data, source=str(path))


def read_utf8(path: Path) -> str:
    """A text file's contents; DatasetError naming the line and the fix when it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}; the file was probably "
                           "saved as Latin-1/Windows-1252, Excel's default); save it as 'CSV UTF-8' or convert it: "
                           f"iconv -f cp1252 -t utf-8 {path.name} > utf8.csv") from None


def manifest_text(rows: list[Row], task_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *task_names])
    for r in rows:
        writer.writerow([r.path, r.patient_id, r.eye, r.split, *(r.labels.get(t, "") for t in task_names)])
    return buf.getvalue()


def write_manifest(path: str | Path, rows: list[Row], task_names: list[str]) -> Path:
    """Write the manifest CSV atomically (a crash never leaves half a manifest)."""
    return atomic_write_text(path, manifest_text(rows, task_names))


def read_manifest(path: str | Path, task_names: list[str]) -> list[Row]:
    """Read a manifest; raises DatasetError for missing columns. Row values are checked by validate."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    rows = []
    try:
        header = reader.fieldnames or []
        missing = [c for c in (*BASE_COLUMNS, *task_names) if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing columns {missing}; the header must contain "
                               f"{list(BASE_COLUMNS) + task_names}")
        for rec in reader:
            rows.append(Row(path=(rec["path"] or "").strip(), patient_id=(rec["patient_id"] or "").strip(),
                            eye=(rec["eye"] or "").strip().lower(), split=(rec["split"] or "").strip().lower(),
                            labels={t: (rec.get(t) or "").strip() for t in task_names}, line=reader.line_num))
    except csv.Error as exc:  # e.g. a field over csv's size limit: an unclosed quote runs to the end
        raise DatasetError(f"{path}: line {reader.line_num}: not readable as CSV ({exc}); check the quotes on "
                           "that line") from exc
    return rows


@dataclass
class Dataset:
    """A loaded dataset folder: spec, rows, vocabulary (None without a text task)."""

    root: Path
    spec: DatasetSpec
    rows: list[Row]
    vocabulary: Vocabulary | None

    @property
    def manifest_path(self) -> Path:
        return self.root / self.spec.manifest

    def image_path(self, row: Row) -> Path:
        p = Path(row.path)
        return p if p.is_absolute() else self.manifest_path.parent / p

    def split(self, name: str) -> list[Row]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {SPLITS}")
        return [r for r in self.rows if r.split == name]


def load_dataset(root: str | Path, manifest: str | None = None) -> Dataset:
    """Load a dataset folder (optionally with another manifest file, e.g. a label-fraction subset)."""
    root = Path(root)
    spec = load_spec(root)
    if manifest:
        spec.manifest = manifest
    rows = read_manifest(root / spec.manifest, spec.task_names)
    vocab = None
    if any(t.kind == "text" for t in spec.tasks):
        vpath = root / spec.vocabulary
        if not vpath.is_file():
            raise DatasetError(f"{vpath}: vocabulary missing; build it with `python -m train.data.validate "
                               f"{root} --build-vocab`")
        vocab = Vocabulary.load(vpath)
    return Dataset(root=root, spec=spec, rows=rows, vocabulary=vocab)


def build_vocabulary(spec: DatasetSpec, rows: list[Row], min_freq: int = 1, max_len: int = 24) -> Vocabulary | None:
    """Vocabulary of the text task from the *training split only* (val/test words must not leak in)."""
    text_tasks = [t.name for t in spec.tasks if t.kind == "text"]
    if not text_tasks:
        return None
    task = text_tasks[0]
    return Vocabulary.build((r.labels[task] for r in rows if r.split == "train" and r.labels.get(task)),
                            min_freq=min_freq, max_len=max_len)

"""Watch-folder mode: predict every new image dropped into a folder and log one record per image.

The folder is polled (no inotify: it works the same on network shares, USB disks and every OS).
Rules:
- Candidates: *.jpg/jpeg/png/tif/tiff/bmp in the folder and its subfolders, any letter case. Hidden files
  and folders (".*") and temporary files ("*.part", "*.tmp", "*.crdownload") are ignored.
- A file is processed only once it has settled: its size and mtime have not changed for `settle`
  seconds, judged either by its mtime's age or by watching it across polls (which also works when
  the share's clock differs from ours). A half-copied file is therefore waited for, not logged.
- The log (JSONL or CSV) is the state. Each record holds the file's relative path, size and mtime_ns;
  on start the log is read and files already logged are skipped, so a restart neither reprocesses
  nor skips images. Records are flushed and fsync'ed one by one, so a crash loses at most the image
  being processed (it is redone on restart).
- A settled file that still cannot be decoded (corrupt, truncated, not an image) is logged once with
  its error and not retried. If the file is later replaced or finishes copying, its size/mtime change,
  so it counts as a new file and is predicted again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deploy.contract import Contract
from deploy.predictor import Prediction, Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload")
LOG_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
KEY_COLUMNS = ["file", "size", "mtime_ns", "logged_at"]


def is_candidate(name: str) -> bool:
    """True for an image file name the watcher should process."""
    lower = name.lower()
    return not lower.startswith(".") and not lower.endswith(TEMP_SUFFIXES) and lower.endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class FileKey:
    """Identity of one version of one file: a changed size or mtime makes it a new file."""

    rel: str
    size: int
    mtime_ns: int


def scan_folder(folder: Path) -> dict[str, os.stat_result]:
    """Candidate images under `folder` by POSIX relative path (hidden folders skipped)."""
    found: dict[str, os.stat_result] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_candidate(name):
                path = Path(root) / name
                try:
                    found[path.relative_to(folder).as_posix()] = path.stat()
                except FileNotFoundError:  # removed between listing and stat
                    continue
    return found


class RecordLog:
    """Append-only JSONL or CSV log of predictions; also the watcher's memory of what is done."""

    def __init__(self, path: str | Path, contract: Contract):
        self.path = Path(path)
        self.format = LOG_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"{self.path}: the log must end in .jsonl or .csv")
        self.contract = contract
        self.columns = KEY_COLUMNS + list(Prediction(path="").flat_dict(contract))
        self.skipped_lines = 0

    def done_keys(self) -> set[FileKey]:
        """Keys of every file already logged (unreadable lines, e.g. cut by a power loss, are skipped)."""
        if not self.path.is_file():
            return set()
        text = self.path.read_text(encoding="utf-8")
        rows = self._csv_rows(text) if self.format == "csv" else self._jsonl_rows(text)
        keys = set()
        for row in rows:
            try:
                keys.add(FileKey(str(row["file"]), int(row["size"]), int(row["mtime_ns"])))
            except (KeyError, TypeError, ValueError):
                self.skipped_lines += 1
        return keys

    def _jsonl_rows(self, text: str) -> list[dict]:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                self.skipped_lines += 1
        return rows

    def _csv_rows(self, text: str) -> list[dict]:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames and list(reader.fieldnames) != self.columns:
            raise ValueError(f"{self.path}: this CSV log has columns {reader.fieldnames}, but this model writes "
                             f"{self.columns}; it belongs to another model: use a new --log file")
        return list(reader)

    def _ends_without_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"

    def append(self, key: FileKey, prediction: Prediction) -> dict:
        """Write one record durably (flush + fsync) and return it."""
        logged_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        head = {"file": key.rel, "size": key.size, "mtime_ns": key.mtime_ns, "logged_at": logged_at}
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = not new and self._ends_without_newline()
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            if cut:  # a line cut by a crash must not swallow this record
                fh.write("\n")
            if self.format == "jsonl":
                record = {**head, **prediction.to_dict()}
                fh.write(json.dumps(record) + "\n")
            else:
                record = {**head, **prediction.flat_dict(self.contract)}
                writer = csv.DictWriter(fh, fieldnames=self.columns, lineterminator="\n")
                if new:
                    writer.writeheader()
                writer.writerow(record)
            fh.flush()
            os.fsync(fh.fileno())
        return record


@dataclass
class PollResult:
    """What one poll did: images logged, how many of them failed, files still settling."""

    processed: int = 0
    failed: int = 0
    waiting: int = 0


class Watcher:
    """Polls `folder`, predicts settled new images in batches and logs them to `log`."""

    def __init__(self, predictor: Predictor, folder: str | Path, log: str | Path, settle: float = 2.0,
                 interval: float = 1.0, batch_size: int = 8,
                 on_prediction: Callable[[Prediction], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder}: watch folder not found; create it or fix the path")
        if settle < 0 or interval <= 0 or batch_size < 1:
            raise ValueError("settle must be >= 0, interval > 0 and batch_size >= 1")
        self.predictor, self.settle, self.interval, self.batch_size = predictor, settle, interval, batch_size
        self.log = RecordLog(log, predictor.contract)
        self.done = self.log.done_keys()
        self.on_prediction = on_prediction
        self.clock, self.wall_clock = clock, wall_clock
        self._first_seen: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, clock when seen)
        self._stop = threading.Event()

    def _settled(self, rel: str, st: os.stat_result) -> bool:
        now = self.clock()
        seen = self._first_seen.get(rel)
        if seen is None or seen[:2] != (st.st_size, st.st_mtime_ns):
            self._first_seen[rel] = seen = (st.st_size, st.st_mtime_ns, now)
        mtime_age = self.wall_clock() - st.st_mtime_ns / 1e9
        return mtime_age >= self.settle or now - seen[2] >= self.settle

    def poll(self) -> PollResult:
        """One pass: find settled new files, predict and log them."""
        result = PollResult()
        found = scan_folder(self.folder)
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in found}
        ready: list[FileKey] = []
        for rel, st in found.items():
            key = FileKey(rel, st.st_size, st.st_mtime_ns)
            if key in self.done:
                continue
            if self._settled(rel, st):
                ready.append(key)
            else:
                result.waiting += 1
        for start in range(0, len(ready), self.batch_size):
            if self._stop.is_set():
                break
            self._process(ready[start:start + self.batch_size], result)
        return result

    def _process(self, keys: list[FileKey], result: PollResult) -> None:
        predictions = self.predictor.predict([self.folder / k.rel for k in keys], batch_size=self.batch_size)
        for key, prediction in zip(keys, predictions):
            try:
                st = (self.folder / key.rel).stat()
                changed = (st.st_size, st.st_mtime_ns) != (key.size, key.mtime_ns)
            except FileNotFoundError:
                changed = True
            if changed:  # written to while we read it: not settled after all, try again later
                result.waiting += 1
                continue
            self.log.append(key, prediction)
            self.done.add(key)
            result.processed += 1
            result.failed += 0 if prediction.ok else 1
            if self.on_prediction is not None:
                self.on_prediction(prediction)

    def stop(self) -> None:
        """Ask `run` to return after the current batch (signal handlers may call this)."""
        self._stop.set()

    def run(self, once: bool = False) -> PollResult:
        """Poll until stopped or Ctrl-C (or a single pass with `once`); totals over all polls."""
        total = PollResult()
        try:
            while not self._stop.is_set():
                step = self.poll()
                total.processed += step.processed
                total.failed += step.failed
                total.waiting = step.waiting
                if once:
                    break
                self._stop.wait(self.interval)
        except KeyboardInterrupt:
            pass  # every logged record is already on disk; the image in flight is redone on restart
        return total

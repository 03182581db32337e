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
  being processed: a record counts once its newline is on disk, and an incomplete last record is cut
  off when the watcher starts, so that image is redone (not lost, not logged twice).
- A settled file that still cannot be decoded (corrupt, truncated, not an image) is logged once with
  its error and not retried. If the file is later replaced or finishes copying, its size/mtime change,
  so it counts as a new file and is predicted again.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deploy.contract import Contract
from deploy.errors import UserError
from deploy.predictor import Prediction, Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload")
LOG_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
KEY_COLUMNS = ["file", "size", "mtime_ns", "logged_at"]
# File names need not be valid UTF-8 (camera exports, old Windows shares): keep their bytes as they are.
ENCODING_ERRORS = "surrogateescape"


class WatchError(UserError):
    """A watch folder, log or setting that cannot be used; the message says what to change."""


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
    """Append-only JSONL or CSV log of predictions; also the watcher's memory of what is done.

    A record counts only once its closing newline is on disk: `recover()` (called when a watcher
    starts) cuts a record left incomplete by a crash off the end of the file, so the next record never
    joins it (a CSV field cut inside its quotes would otherwise swallow every later record). Rows with
    the wrong number of fields, or lines that are not JSON objects, are skipped and counted. File names
    that are not valid UTF-8 are kept byte for byte (surrogateescape), so they are matched on restart.
    """

    def __init__(self, path: str | Path, contract: Contract):
        self.path = Path(path)
        self.format = LOG_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise WatchError(f"{self.path}: the log must end in .jsonl or .csv")
        self.contract = contract
        self.columns = KEY_COLUMNS + list(Prediction(path="").flat_dict(contract))
        self.skipped_lines = 0
        self.cut_bytes = 0  # size of the incomplete record removed by `recover`

    def _text(self) -> str:
        return self.path.read_bytes().decode("utf-8", errors=ENCODING_ERRORS)

    def done_keys(self) -> set[FileKey]:
        """Keys of every complete record (an incomplete last record and malformed rows are not done)."""
        if not self.path.is_file():
            return set()
        self.skipped_lines = 0
        rows, _ = self._records(self._text())
        keys = set()
        for row in rows:
            try:
                keys.add(FileKey(str(row["file"]), int(row["size"]), int(row["mtime_ns"])))
            except (KeyError, TypeError, ValueError):
                self.skipped_lines += 1
        return keys

    def recover(self) -> set[FileKey]:
        """Cut an incomplete last record (left by a crash) off the file, then return `done_keys()`."""
        if self.path.is_file():
            text = self._text()
            _, end = self._records(text)
            if end < len(text):
                keep = len(text[:end].encode("utf-8", errors=ENCODING_ERRORS))
                self.cut_bytes = self.path.stat().st_size - keep
                with open(self.path, "rb+") as fh:
                    fh.truncate(keep)
                    os.fsync(fh.fileno())
        return self.done_keys()

    def _records(self, text: str) -> tuple[list[dict], int]:
        """(rows of the complete records, offset in `text` where the last complete record ends)."""
        return self._csv_records(text) if self.format == "csv" else self._jsonl_records(text)

    def _jsonl_records(self, text: str) -> tuple[list[dict], int]:
        rows, end = [], 0
        for line in _lines(text, 0):
            if not line.endswith("\n"):
                break  # the incomplete last record
            end += len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                self.skipped_lines += 1
        return rows, end

    def _csv_records(self, text: str) -> tuple[list[dict], int]:
        rows, end, header = [], 0, None
        while end < len(text):
            source = _Cursor(text, end)
            reader = csv.reader(source, strict=True)  # strict: a quote still open at the end is an error
            try:
                for fields in reader:
                    if text[source.pos - 1] != "\n":
                        return rows, end  # the incomplete last record
                    end = source.pos
                    if header is None:
                        header = self._check_header(fields)
                    elif len(fields) == len(self.columns):
                        rows.append(dict(zip(self.columns, fields)))
                    else:  # e.g. a record cut by a crash before this version repaired logs on start
                        self.skipped_lines += 1
                return rows, end
            except csv.Error:
                if source.pos >= len(text):
                    return rows, end  # a quoted field cut by a crash
                self.skipped_lines += 1  # a malformed record in the middle: skip it, read on
                end = source.pos
        return rows, end

    def _check_header(self, fields: list[str]) -> list[str]:
        if fields != self.columns:
            raise WatchError(f"{self.path}: this CSV log has columns {fields}, but this model writes "
                             f"{self.columns}; it belongs to another model: use a new --log file")
        return fields

    def append(self, key: FileKey, prediction: Prediction) -> dict:
        """Write one record durably (flush + fsync) and return it."""
        logged_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        head = {"file": key.rel, "size": key.size, "mtime_ns": key.mtime_ns, "logged_at": logged_at}
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as fh:
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


def _lines(text: str, start: int):
    """Lines of `text` from `start`, each with its "\\n" (only "\\n" ends a line, unlike str.splitlines)."""
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


class _Cursor:
    """Feeds csv.reader line by line and remembers how far into the text it has read."""

    def __init__(self, text: str, start: int):
        self.pos, self._lines = start, _lines(text, start)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.pos += len(line)
        return line


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
            raise WatchError(f"{self.folder}: watch folder not found; create it or fix the path")
        if settle < 0 or interval <= 0 or batch_size < 1:
            raise WatchError("--settle must be >= 0, --interval > 0 and --batch-size >= 1")
        self.predictor, self.settle, self.interval, self.batch_size = predictor, settle, interval, batch_size
        self.log = RecordLog(log, predictor.contract)
        self.done = self.log.recover()
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

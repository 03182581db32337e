"""Watch-folder mode: settling, restart safety, ignored files, JSONL and CSV logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deploy import (  # tests/ is on sys.path (pytest rootdir-less layout)
    predict_main,
    write_image,
    write_tiny_model,
)

from deploy.predictor import Predictor
from deploy.watch import RecordLog, Watcher, is_candidate, scan_folder

REPO = Path(__file__).resolve().parents[1]
OLD = time.time() - 3600  # an mtime well past any settle time


def age(path: Path, when: float = OLD) -> Path:
    os.utime(path, (when, when))
    return path


def drop(folder: Path, name: str, color=(230, 20, 20)) -> Path:
    return age(write_image(folder / name, color))


def records(log: Path) -> list[dict]:
    if log.suffix == ".csv":
        with open(log, newline="") as fh:
            return list(csv.DictReader(fh))
    return [json.loads(line) for line in log.read_text().splitlines()]


def watch_once(model: Path, folder: Path, log: Path, *extra: str) -> int:
    return predict_main([str(model), "--watch", str(folder), "--log", str(log), "--once", *extra])


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_restart_neither_reprocesses_nor_skips(model: Path, tmp_path: Path, suffix: str, capsys):
    inbox, log = tmp_path / "inbox", tmp_path / f"log{suffix}"
    drop(inbox, "a.jpg")
    drop(inbox, "b.png", (20, 230, 20))
    assert watch_once(model, inbox, log) == 0
    assert sorted(r["file"] for r in records(log)) == ["a.jpg", "b.png"]
    drop(inbox, "c.jpg", (20, 230, 20))
    drop(inbox, "sub/d.JPG")
    assert watch_once(model, inbox, log) == 0
    rows = records(log)
    assert sorted(r["file"] for r in rows) == ["a.jpg", "b.png", "c.jpg", "sub/d.JPG"]
    by_file = {r["file"]: r for r in rows}
    if suffix == ".csv":
        assert by_file["c.jpg"]["coarse_label"] == "c1" and by_file["a.jpg"]["diagnosis_text"] == "red disc"
        assert log.read_text().count("file,size,mtime_ns") == 1
    else:
        assert by_file["c.jpg"]["tasks"]["coarse"]["label"] == "c1"
    assert watch_once(model, inbox, log) == 0
    assert len(records(log)) == 4
    assert "4 image(s) already" in capsys.readouterr().err


def test_half_written_file_is_waited_for(model: Path, tmp_path: Path):
    inbox, log = tmp_path / "inbox", tmp_path / "log.jsonl"
    full = write_image(tmp_path / "full.jpg", size=(300, 300)).read_bytes()
    partial = inbox / "scan.jpg"
    inbox.mkdir()
    partial.write_bytes(full[: len(full) // 3])  # a copy in progress: fresh mtime, cut JPEG
    assert watch_once(model, inbox, log, "--settle", "30") == 0
    assert not log.exists() or records(log) == []
    partial.write_bytes(full)  # the copy finishes and the file stays untouched past the settle time
    age(partial, time.time() - 60)
    assert watch_once(model, inbox, log, "--settle", "30") == 0
    (rec,) = records(log)
    assert rec["error"] is None and rec["tasks"]["coarse"]["label"] == "c0"


def test_settled_broken_file_is_logged_once(model: Path, tmp_path: Path):
    inbox, log = tmp_path / "inbox", tmp_path / "log.jsonl"
    inbox.mkdir()
    full = write_image(tmp_path / "full.jpg", size=(300, 300)).read_bytes()
    (inbox / "cut.jpg").write_bytes(full[:200])
    age(inbox / "cut.jpg")
    drop(inbox, "ok.jpg")
    assert watch_once(model, inbox, log) == 1
    assert watch_once(model, inbox, log) == 0  # nothing new: not retried
    rows = {r["file"]: r for r in records(log)}
    assert len(records(log)) == 2
    assert "cut.jpg" in rows["cut.jpg"]["error"] and rows["ok.jpg"]["error"] is None
    (inbox / "cut.jpg").write_bytes(full)  # replaced by a good copy: a new file
    age(inbox / "cut.jpg", OLD + 60)
    assert watch_once(model, inbox, log) == 0
    assert records(log)[-1]["file"] == "cut.jpg" and records(log)[-1]["error"] is None


def test_hidden_and_temporary_files_are_ignored(tmp_path: Path):
    names = ["a.jpg", "B.TIFF", "c.bmp", "d.jpeg", ".hidden.jpg", "e.jpg.part", "f.tmp", "g.jpg.crdownload",
             "notes.txt", ".cache/h.png", "nested/i.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert sorted(scan_folder(tmp_path)) == ["B.TIFF", "a.jpg", "c.bmp", "d.jpeg", "nested/i.png"]
    assert is_candidate("X.PNG") and not is_candidate("x.png.part") and not is_candidate(".x.png")


def test_settling_is_also_judged_across_polls(model: Path, tmp_path: Path):
    """With a share whose clock runs ahead (mtime in our future), stability is observed over polls."""
    inbox = tmp_path / "inbox"
    path = write_image(inbox / "a.jpg")
    future = time.time() + 3600
    age(path, future)
    now = [100.0]
    with Predictor(model) as predictor:
        watcher = Watcher(predictor, inbox, tmp_path / "log.jsonl", settle=2.0, clock=lambda: now[0])
        assert watcher.poll().waiting == 1
        now[0] += 1.0
        assert watcher.poll().waiting == 1
        now[0] += 1.5
        result = watcher.poll()
    assert (result.processed, result.waiting) == (1, 0)


def test_log_with_a_cut_last_line_is_repaired(model: Path, tmp_path: Path):
    inbox, log = tmp_path / "inbox", tmp_path / "log.jsonl"
    drop(inbox, "a.jpg")
    assert watch_once(model, inbox, log) == 0
    log.write_text(log.read_text() + '{"file": "b.jpg", "si')  # power loss mid-record
    drop(inbox, "b.jpg")
    assert watch_once(model, inbox, log) == 0
    lines = log.read_text().splitlines()  # the cut record was removed on start, b.jpg logged once
    assert [json.loads(line)["file"] for line in lines] == ["a.jpg", "b.jpg"]
    with Predictor(model) as predictor:
        rl = RecordLog(log, predictor.contract)
        assert {k.rel for k in rl.done_keys()} == {"a.jpg", "b.jpg"} and rl.skipped_lines == 0


def test_csv_log_of_another_model_is_refused(model: Path, tmp_path: Path, capsys):
    inbox, log = tmp_path / "inbox", tmp_path / "log.csv"
    drop(inbox, "a.jpg")
    log.write_text("file,size,mtime_ns,logged_at,path,error,other_label\n")
    assert watch_once(model, inbox, log) == 2
    assert "belongs to another model" in capsys.readouterr().err


def test_run_loop_stops_on_request(model: Path, tmp_path: Path):
    inbox = tmp_path / "inbox"
    for i in range(3):
        drop(inbox, f"{i}.jpg")
    seen = []
    with Predictor(model) as predictor:
        watcher = Watcher(predictor, inbox, tmp_path / "log.jsonl", interval=0.01, batch_size=1,
                          on_prediction=lambda p: (seen.append(p), watcher.stop()))
        total = watcher.run()
    assert total.processed == len(seen) == 1  # stopped after the first batch, not after the folder


# --- crash safety of the log (a record counts once its newline is on disk) --------------------------


def _cut(log: Path, marker: bytes, offset: int = 0) -> None:
    """Simulate a crash while the record holding `marker` was written: cut the file inside it."""
    data = log.read_bytes()
    log.write_bytes(data[: data.rindex(marker) + offset])


def _files(log: Path) -> list[str]:
    return sorted(r["file"] for r in records(log))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_record_cut_by_a_crash_is_predicted_again(model: Path, tmp_path: Path, suffix: str):
    inbox, log = tmp_path / "inbox", tmp_path / f"log{suffix}"
    drop(inbox, "a.jpg")
    drop(inbox, "b.jpg", (20, 230, 20))
    assert watch_once(model, inbox, log) == 0
    _cut(log, b"green cup cup", 5)  # b.jpg's record lost its diagnosis and timings
    assert watch_once(model, inbox, log) == 0
    assert _files(log) == ["a.jpg", "b.jpg"]  # redone once, nothing lost, no duplicate
    b = next(r for r in records(log) if r["file"] == "b.jpg")
    text = b["diagnosis_text"] if suffix == ".csv" else b["tasks"]["diagnosis"]["text"]
    assert text == "green cup cup"


def test_csv_cut_inside_a_quoted_field_does_not_swallow_later_records(model: Path, tmp_path: Path):
    inbox, log = tmp_path / "inbox", tmp_path / "log.csv"
    drop(inbox, "a.jpg")
    drop(inbox, "left, eye.jpg")  # the comma makes the CSV writer quote this name
    assert watch_once(model, inbox, log) == 0
    _cut(log, b'"left, eye.jpg"', 6)  # the crash came inside the quotes
    drop(inbox, "c.jpg")
    drop(inbox, "d.jpg")
    assert watch_once(model, inbox, log) == 0
    assert watch_once(model, inbox, log) == 0
    assert _files(log) == ["a.jpg", "c.jpg", "d.jpg", "left, eye.jpg"]  # each exactly once


def test_csv_cut_inside_a_utf8_character_is_repaired(model: Path, tmp_path: Path):
    inbox, log = tmp_path / "inbox", tmp_path / "log.csv"
    drop(inbox, "a.jpg")
    drop(inbox, "z\u00e9.jpg")
    assert watch_once(model, inbox, log) == 0
    _cut(log, "z\u00e9".encode(), 2)  # between the two bytes of "\u00e9"
    assert watch_once(model, inbox, log) == 0
    assert _files(log) == ["a.jpg", "z\u00e9.jpg"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_name_that_is_not_utf8_is_logged_and_remembered(model: Path, tmp_path: Path, suffix: str):
    inbox, log = tmp_path / "inbox", tmp_path / f"log{suffix}"
    drop(inbox, "a.jpg")
    raw = os.path.join(os.fsencode(inbox), b"scan\xff.jpg")  # Latin-1 "\xff" from an old camera share
    drop(inbox, os.fsdecode(raw))
    for _ in range(2):  # the restart must neither crash nor predict it again
        proc = subprocess.run([sys.executable, "-m", "deploy.predict", str(model), "--watch", str(inbox), "--log",
                               str(log), "--once"], cwd=REPO, capture_output=True, timeout=120,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # strict: no escapes
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with Predictor(model) as predictor:
        done = RecordLog(log, predictor.contract).done_keys()
    assert sorted(k.rel for k in done) == ["a.jpg", os.fsdecode(b"scan\xff.jpg")]
    assert len(log.read_bytes().splitlines()) == 2 + (suffix == ".csv")


def test_every_record_is_flushed_and_fsynced_before_the_next(model: Path, tmp_path: Path, monkeypatch):
    inbox, log = tmp_path / "inbox", tmp_path / "log.jsonl"
    for i in range(3):
        drop(inbox, f"{i}.jpg")
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(log.resolve()):
            synced.append(os.fstat(fd).st_size)  # what the kernel holds for the log at this moment
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    assert watch_once(model, inbox, log) == 0
    ends = [len(b"".join(log.read_bytes().splitlines(keepends=True)[: i + 1])) for i in range(3)]
    assert synced == ends  # one fsync per record, each after the whole record was written


def test_a_file_changed_while_predicted_is_not_logged_until_it_settles(model: Path, tmp_path: Path):
    inbox, log = tmp_path / "inbox", tmp_path / "log.jsonl"
    path = drop(inbox, "a.jpg")

    class Rewriting(Predictor):
        """The camera software rewrites the file while the model reads it."""

        def predict(self, paths, batch_size=8):
            out = super().predict(paths, batch_size)
            if path.stat().st_size < 10_000:
                write_image(path, (20, 230, 20), size=(300, 300))
                age(path, OLD + 60)
            return out

    with Rewriting(model) as predictor:
        watcher = Watcher(predictor, inbox, log)
        first = watcher.poll()
        assert (first.processed, first.waiting) == (0, 1) and not log.exists()
        second = watcher.poll()
    assert second.processed == 1
    (rec,) = records(log)
    assert rec["size"] == path.stat().st_size and rec["tasks"]["coarse"]["label"] == "c1"

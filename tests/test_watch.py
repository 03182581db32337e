"""Watch-folder mode: settling, restart safety, ignored files, JSONL and CSV logs."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from test_deploy import write_image, write_tiny_model  # tests/ is on sys.path (pytest rootdir-less layout)

from deploy.predict import main as predict_main
from deploy.predictor import Predictor
from deploy.watch import RecordLog, Watcher, is_candidate, scan_folder

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
    lines = log.read_text().splitlines()
    assert json.loads(lines[-1])["file"] == "b.jpg" and len(lines) == 3
    with Predictor(model) as predictor:
        rl = RecordLog(log, predictor.contract)
        assert {k.rel for k in rl.done_keys()} == {"a.jpg", "b.jpg"} and rl.skipped_lines == 1


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

"""The dataset validator: every bad input is reported with its manifest line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.contract import TaskSpec
from deploy.vocab import VocabularyError
from train.data import validate
from train.data.manifest import DatasetError, DatasetSpec, Row, load_dataset, save_spec, write_manifest
from train.data.validate import check_dataset, main, validate_dataset

TASKS = [TaskSpec("grade", "classification", ("a", "b"))]
# (file, patient, split, grade): a valid dataset; line = index + 2 (header is line 1).
BASE = [("p1.jpg", "p1", "train", "a"), ("p2.jpg", "p2", "train", "b"), ("p3.jpg", "p3", "val", "a"),
        ("p4.jpg", "p4", "test", "b"), ("p5.jpg", "p5", "unlabeled", "")]


def write_image(path: Path, mode: str = "RGB", size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16))
    elif mode == "RGB":
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    else:
        img = Image.new(mode, (size, size))
    img.save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def make_dataset(root: Path, rows=BASE, tasks=TASKS, images=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if images:
        for name, *_ in rows:
            if not (root / name).exists():
                write_image(root / name)
    save_spec(DatasetSpec(name="t", tasks=list(tasks)), root)
    write_manifest(root / "manifest.csv", [Row(path=n, patient_id=p, eye="left", split=s, labels={"grade": g})
                                           for n, p, s, g in rows], [t.name for t in tasks])
    return root


def only(problems, code):
    found = [p for p in problems if p.code == code]
    assert found, f"no {code} in {[str(p) for p in problems]}"
    return found


def test_valid_dataset_has_no_problems(tmp_path):
    root = make_dataset(tmp_path / "ds")
    assert validate_dataset(root, workers=1) == []
    check_dataset(root, workers=1)
    assert main([str(root), "--workers", "1"]) == 0


@pytest.mark.parametrize("damage,code", [("missing", "missing_file"), ("empty", "bad_image"),
                                         ("truncated", "bad_image"), ("text", "bad_image")])
def test_unusable_files(tmp_path, damage, code):
    root = make_dataset(tmp_path / "ds")
    target = root / "p3.jpg"  # line 4
    if damage == "missing":
        target.unlink()
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "truncated":
        data = write_image(tmp_path / "big.jpg", size=128).read_bytes()
        target.write_bytes(data[: len(data) // 2])
    else:
        target.write_text("not an image")
    problems = validate_dataset(root, workers=1)
    (p,) = only(problems, code)
    assert p.severity == "error" and p.line == 4 and p.path == "p3.jpg"
    expected = {"missing": "not found", "empty": "0 bytes", "truncated": "truncated", "text": "not an image"}[damage]
    assert expected in p.message


def test_converted_modes_are_warnings(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    rows = [*BASE, ("gray.png", "p6", "train", "a"), ("rgba.png", "p7", "train", "b"), ("deep.png", "p8", "val", "b")]
    for name, mode in (("gray.png", "L"), ("rgba.png", "RGBA"), ("deep.png", "I;16")):
        write_image(root / name, mode)
    make_dataset(root, rows)
    problems = validate_dataset(root, workers=1)
    assert all(p.severity == "warning" for p in problems)
    assert [(p.line, p.path) for p in only(problems, "converted_mode")] == [(7, "gray.png"), (8, "rgba.png"),
                                                                           (9, "deep.png")]
    assert "16-bit" in problems[2].message and main([str(root), "--workers", "1"]) == 0


def test_row_errors_with_lines(tmp_path):
    rows = [*BASE, ("p6.jpg", "p6", "train", "c"),  # 7: unknown label
            ("p1.jpg", "p1", "train", "a"),  # 8: duplicate path
            ("p9.jpg", "p1", "test", "a"),  # 9: patient p1 also in test
            ("p10.jpg", "", "train", "a"),  # 10: empty patient
            ("p11.jpg", "p11", "holdout", "a")]  # 11: bad split
    root = make_dataset(tmp_path / "ds", rows)
    problems = validate_dataset(root, workers=1)
    assert only(problems, "unknown_label")[0].line == 7
    dup = only(problems, "duplicate_path")[0]
    assert dup.line == 8 and "line 2" in dup.message
    leak = only(problems, "patient_leak")[0]
    assert leak.line == 9 and "train (line 2)" in leak.message and "test (line 9)" in leak.message
    assert only(problems, "empty_patient")[0].line == 10
    assert only(problems, "bad_split")[0].line == 11
    assert all(p.severity == "error" for p in problems)
    with pytest.raises(DatasetError, match=r"error\(s\).*\n.*line 7"):
        check_dataset(root, workers=1)
    assert main([str(root), "--workers", "1"]) == 2  # data to fix: a user error, like a bad config


def test_bad_eye(tmp_path):
    root = make_dataset(tmp_path / "ds")
    text = (root / "manifest.csv").read_text().replace("p2.jpg,p2,left", "p2.jpg,p2,middle")
    (root / "manifest.csv").write_text(text)
    (p,) = validate_dataset(root, workers=1)
    assert p.code == "bad_eye" and p.line == 3


def test_empty_split_and_empty_class(tmp_path):
    rows = [("p1.jpg", "p1", "train", "a"), ("p3.jpg", "p3", "val", "b"), ("p4.jpg", "p4", "val", "a")]
    problems = validate_dataset(make_dataset(tmp_path / "ds", rows), workers=1)
    (split,) = only(problems, "empty_split")
    assert split.line == 0 and "'test'" in split.message
    (cls,) = only(problems, "empty_class")
    assert cls.line == 0 and "'b'" in cls.message


def test_vocabulary_missing_then_built(tmp_path):
    tasks = [*TASKS, TaskSpec("diagnosis", "text")]
    root = make_dataset(tmp_path / "ds", tasks=tasks)
    assert only(validate_dataset(root, workers=1), "no_vocab")[0].severity == "error"
    assert main([str(root), "--build-vocab", "--workers", "1"]) == 0
    assert (root / "vocab.json").is_file()


def test_unreadable_spec_and_process_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "POOL_MIN_IMAGES", 10)
    (p,) = validate_dataset(tmp_path / "nothing")
    assert p.code == "unreadable" and "dataset.yaml" in p.message
    rows = [(f"i{i}.jpg", f"q{i}", ("train", "val", "test")[i % 3], "ab"[i % 2]) for i in range(40)]
    root = make_dataset(tmp_path / "ds", rows)
    (root / "i7.jpg").write_bytes(b"")
    (p,) = validate_dataset(root, workers=2)
    assert p.line == 9 and p.code == "bad_image"
    assert [q.line for q in validate_dataset(root, check_images=False)] == [9]


def _cli(argv: list[str]) -> int:
    from deploy.errors import cli

    return cli(main, argv)


def test_a_latin1_manifest_is_one_clear_error(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    text = (root / "manifest.csv").read_text().replace("p3,left", "Jos\u00e9,left")
    (root / "manifest.csv").write_bytes(text.encode("latin-1"))  # Excel's default "CSV" on Windows
    (p,) = validate_dataset(root, workers=1)
    assert p.code == "unreadable" and "line 4" in p.message and "UTF-8" in p.message
    assert _cli([str(root), "--workers", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"manifest.csv: line 4: not UTF-8"):
        load_dataset(root)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"tokens": ["a"], "max_len": 5}', '{"tokens": null}',
                                     '{"tokens": ["<pad>", "<bos>", "<eos>", "<unk>"], "max_len": "x"}'])
def test_a_corrupt_vocabulary_is_reported_by_validate_and_refused_by_training(tmp_path, content, capsys):
    tasks = [*TASKS, TaskSpec("diagnosis", "text")]
    root = make_dataset(tmp_path / "ds", tasks=tasks)
    (root / "vocab.json").write_text(content)
    (p,) = only(validate_dataset(root, workers=1), "bad_vocab")
    assert p.severity == "error" and "vocab.json" in p.message and "--build-vocab" in p.message
    assert _cli([str(root), "--workers", "1"]) == 2
    with pytest.raises(VocabularyError, match="vocab.json: not a valid vocabulary file"):
        load_dataset(root)
    assert _cli([str(root), "--build-vocab", "--workers", "1"]) == 0  # the advertised fix works
    load_dataset(root)

"""Real-data adapters on tiny fixtures written in the real release formats."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from deploy.errors import cli
from train.data.adapt import main as adapt_main
from train.data.adapters import odir_keywords as kw
from train.data.adapters.odir import find_labels
from train.data.manifest import DatasetError, load_dataset
from train.data.splits import leaking_patients

ODIR_HEADER = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
               "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]
# (id, left keywords, right keywords); the N..O flags written below are per patient, as in ODIR.
ODIR_PATIENTS = [
    (0, "cataract", "normal fundus"),
    (1, "moderate non proliferative retinopathy，drusen", "normal fundus，lens dust"),
    (2, "lens dust，low image quality", "glaucoma，cataract"),
    (3, "anterior segment image", "pathological myopia"),
    (4, "weird new finding", "normal fundus"),
    (5, "normal fundus", "normal fundus"),
    (6, "cataract", "cataract, lens dust"),
]
MISSING = "5_left.jpg"


def write_jpeg(path: Path, size: tuple[int, int] = (24, 16), color=(120, 40, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def _flags(left: str, right: str) -> list[int]:
    cats = {kw.category(kw.split_keywords(k)) for k in (left, right) if not kw.exclusion_reason(kw.split_keywords(k))}
    return [int(name in cats) for name in kw.CATEGORY_NAMES.values()]


def _odir_images(folder: Path) -> None:
    # Created in reverse order, each with its own width: the adapter must join by name.
    for pid, _, _ in reversed(ODIR_PATIENTS):
        for eye in ("right", "left"):
            name = f"{pid}_{eye}.jpg"
            if name != MISSING:
                write_jpeg(folder / name, size=(40 + pid, 30))


def write_kaggle_odir(root: Path) -> Path:
    _odir_images(root / "preprocessed_images")
    path = root / "full_df.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*ODIR_HEADER, "filepath", "labels", "target", "filename"])
        for pid, left, right in ODIR_PATIENTS:
            for eye in ("left", "right"):
                name = f"{pid}_{eye}.jpg"
                w.writerow([pid, 60, "Male", f"{pid}_left.jpg", f"{pid}_right.jpg", left, right,
                            *_flags(left, right), f"../input/x/{name}", "['N']", "[1]", name])
    return path


def line_of(pid: int, eye: str) -> int:
    """Line of an eye's row in the Kaggle CSV (header = 1, two rows per patient)."""
    index = [p for p, _, _ in ODIR_PATIENTS].index(pid)
    return 2 + 2 * index + (eye == "right")


def by_name(ds) -> dict[str, object]:
    return {Path(r.path).name: r for r in ds.rows}


def test_odir_kaggle_per_eye_labels(tmp_path, capsys):
    src = tmp_path / "odir"
    write_kaggle_odir(src)
    out = tmp_path / "ds"
    assert adapt_main(["odir", "--src", str(src), "--out", str(out), "--min-fine-count", "2"]) == 0
    err = capsys.readouterr().err
    ds = load_dataset(out)
    rows = by_name(ds)
    # Each eye from its own keywords, although patient flags mark both eyes of patient 0 as N and C.
    assert rows["0_left.jpg"].labels["category"] == "cataract"
    assert rows["0_right.jpg"].labels["category"] == "normal"
    assert rows["0_left.jpg"].eye == "left" and rows["0_left.jpg"].patient_id == "0"
    # Priority: diabetes over other, glaucoma over cataract.
    assert rows["1_left.jpg"].labels["category"] == "diabetes"
    assert rows["2_right.jpg"].labels["category"] == "glaucoma"
    # Quality notes ignored in category, finding and sentence.
    assert rows["1_right.jpg"].labels["category"] == "normal"
    assert rows["1_right.jpg"].labels["finding"] == "normal fundus"
    assert rows["6_right.jpg"].labels["diagnosis"] == "right eye: cataract."
    assert rows["1_left.jpg"].labels["diagnosis"] == "left eye: moderate non proliferative retinopathy and drusen."
    # Rare keyword sets (< 2) become "other"; frequent ones stay.
    assert rows["1_left.jpg"].labels["finding"] == "other"
    assert rows["0_left.jpg"].labels["finding"] == "cataract"
    assert ds.spec.task("finding").classes == ("normal fundus", "cataract", "other")
    # Unknown keyword -> other, with a warning naming it.
    assert rows["4_left.jpg"].labels["category"] == "other"
    assert "'weird new finding' x1" in err
    # Quality-only and non-fundus eyes excluded, missing image reported with its label-file line.
    assert "2_left.jpg" not in rows and "3_left.jpg" not in rows and MISSING not in rows
    assert f"full_df.csv line {line_of(2, 'left')}: 2_left.jpg excluded: no diagnostic keyword" in err
    assert f"full_df.csv line {line_of(3, 'left')}: 3_left.jpg excluded: not a fundus photograph" in err
    assert f"full_df.csv line {line_of(5, 'left')}: image {MISSING} not found" in err
    # Joined by name: each row points at the file of that name (widths differ per patient).
    for name, r in rows.items():
        assert Path(r.path).is_absolute()
        with Image.open(r.path) as img:
            assert img.width == 40 + int(name.split("_")[0])
    assert not leaking_patients(ds.rows)
    assert ds.vocabulary is not None and "cataract" in ds.vocabulary.tokens
    assert (out / "adapt_report.txt").read_text().count("skipped:") == 3


def test_odir_challenge_xlsx_matches_kaggle(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    src = tmp_path / "challenge"
    _odir_images(src / "ODIR-5K_Training_Images")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(ODIR_HEADER)
    for pid, left, right in ODIR_PATIENTS:
        sheet.append([pid, 60, "Female", f"{pid}_left.jpg", f"{pid}_right.jpg", left, right, *_flags(left, right)])
    book.save(src / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx")
    out = tmp_path / "ds"
    assert adapt_main(["odir", "--src", str(src), "--out", str(out), "--min-fine-count", "2"]) == 0
    rows = by_name(load_dataset(out))
    assert rows["0_left.jpg"].labels["category"] == "cataract"
    assert rows["2_right.jpg"].labels["category"] == "glaucoma"
    assert rows["0_right.jpg"].eye == "right"
    assert len(rows) == 11  # 14 eyes - 2 excluded (quality-only, anterior segment) - 1 missing


def test_odir_resize_writes_copies(tmp_path):
    src = tmp_path / "odir"
    write_kaggle_odir(src)
    out = tmp_path / "ds"
    args = ["odir", "--src", str(src), "--out", str(out), "--min-fine-count", "2", "--resize", "20", "--workers", "1"]
    assert adapt_main(args) == 0
    rows = by_name(load_dataset(out))
    assert all(r.path.startswith("images/") for r in rows.values())
    with Image.open(out / rows["6_left.jpg"].path) as img:
        assert img.size == (20, 13) and img.format == "JPEG"  # 46x30 -> longer side 20, aspect kept
    assert cli(adapt_main, args) == 2  # refuses to overwrite without --force
    assert adapt_main([*args, "--force"]) == 0


def test_odir_keyword_rules():
    assert kw.split_keywords(" Cataract，cataract, lens  dust ") == ["cataract", "lens dust"]
    assert kw.category(["normal fundus", "drusen"]) == "other"
    assert kw.category(["cataract", "hypertensive retinopathy"]) == "hypertension"
    assert kw.finding(["drusen", "cataract", "lens dust"]) == "cataract; drusen"
    assert kw.exclusion_reason(["normal fundus", "lens dust"]) == ""
    assert kw.exclusion_reason([]).startswith("no diagnostic keyword")
    assert len(kw.KEYWORD_CATEGORY) >= 60


def write_idrid(root: Path) -> Path:
    base = root / "B. Disease Grading"
    train_dir = base / "1. Original Images" / "a. Training Set"
    test_dir = base / "1. Original Images" / "b. Testing Set"
    grades = [0, 2] * 10
    for i in reversed(range(1, 21)):
        if i != 7:  # IDRiD_007 is missing
            write_jpeg(train_dir / f"IDRiD_{i:03d}.jpg", size=(30 + i, 20))
    for i in range(1, 4):
        write_jpeg(test_dir / f"IDRiD_{i:03d}.jpg", size=(60 + i, 20))
    labels = base / "2. Groundtruths"
    labels.mkdir(parents=True)
    # Real files: trailing space in the last header, empty trailing columns and empty trailing rows.
    text = "Image name,Retinopathy grade,Risk of macular edema ,,\n"
    text += "".join(f"IDRiD_{i:03d},{g},{i % 3},,\n" for i, g in enumerate(grades, start=1))
    text += "IDRiD_021,9,0,,\n,,,,\n"
    (labels / "a. IDRiD_Disease Grading_Training Labels.csv").write_text(text, encoding="utf-8-sig")
    test = "Image name,Retinopathy grade,Risk of macular edema \n" + "".join(
        f"IDRiD_{i:03d},4,1\n" for i in range(1, 4))
    (labels / "b. IDRiD_Disease Grading_Testing Labels.csv").write_text(test)
    return base


def test_idrid_official_test_and_seeded_val(tmp_path, capsys):
    src = write_idrid(tmp_path)
    out = tmp_path / "ds"
    assert adapt_main(["idrid", "--src", str(src), "--out", str(out), "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "Training Labels.csv line 8: image IDRiD_007 not found" in err
    assert "Training Labels.csv line 22: bad grade '9'" in err
    ds = load_dataset(out)
    test = ds.split("test")
    assert len(test) == 3 and {r.patient_id for r in test} == {"test/IDRiD_001", "test/IDRiD_002", "test/IDRiD_003"}
    assert all(r.labels["dr_grade"] == "proliferative" and r.labels["edema_risk"] == "low" for r in test)
    train_val = ds.split("train") + ds.split("val")
    assert len(train_val) == 19 and ds.split("val")
    row = next(r for r in train_val if r.patient_id == "train/IDRiD_002")
    assert Path(row.path).name == "IDRiD_002.jpg"
    assert row.labels == {"dr_grade": "moderate", "edema_risk": "high",
                          "diagnosis": "moderate non proliferative diabetic retinopathy, high risk of macular edema."}
    with Image.open(row.path) as img:
        assert img.width == 32
    assert not leaking_patients(ds.rows)
    # Deterministic from the seed.
    out2 = tmp_path / "ds2"
    assert adapt_main(["idrid", "--src", str(src), "--out", str(out2), "--seed", "3"]) == 0
    assert (out / "manifest.csv").read_text() == (out2 / "manifest.csv").read_text()


def test_folders_and_unlabeled_append(tmp_path, capsys):
    src = tmp_path / "classes"
    for i in range(6):
        write_jpeg(src / "healthy" / f"h{i}.jpg")
        write_jpeg(src / "sick" / "sub" / f"s{i}_left.jpg")
    (src / "empty").mkdir()
    out = tmp_path / "ds"
    assert adapt_main(["folders", "--src", str(src), "--out", str(out)]) == 0
    ds = load_dataset(out)
    assert ds.spec.task("label").classes == ("healthy", "sick")
    rows = by_name(ds)
    assert rows["h3.jpg"].labels["label"] == "healthy" and rows["s2_left.jpg"].labels["label"] == "sick"
    assert rows["s2_left.jpg"].eye == "left" and rows["h3.jpg"].eye == "unknown"
    assert "class folders without images, ignored: ['empty']" in capsys.readouterr().err

    extra = tmp_path / "extra"
    for i in range(3):
        write_jpeg(extra / f"u{i}.png")
    assert adapt_main(["unlabeled", "--src", str(extra), "--out", str(out)]) == 0
    ds = load_dataset(out)
    added = ds.split("unlabeled")
    assert len(added) == 3 and all(not any(r.labels.values()) for r in added)
    assert len(ds.rows) == 15
    assert adapt_main(["unlabeled", "--src", str(extra), "--out", str(out)]) == 0
    assert len(load_dataset(out).rows) == 15  # nothing added twice
    assert "already in manifest.csv" in capsys.readouterr().err


def test_csv_adapter_without_extensions_and_missing(tmp_path, capsys):
    images = tmp_path / "train_images"
    rows = [("a1", "0", "p1", "OD", "no findings"), ("a2", "2", "p1", "OS", "some haemorrhages"),
            ("a3", "1", "p2", "R", "mild changes"), ("zz", "1", "p3", "L", "gone"),
            ("a4", "10", "p4", "?", "odd"), ("a5", "2", "p5", "left", "more haemorrhages")]
    for name, *_ in reversed(rows):
        if name != "zz":
            write_jpeg(images / f"{name}.png")
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id_code", "Diagnosis Grade", "patient", "eye", "report"])
        w.writerows(rows)
    out = tmp_path / "ds"
    assert adapt_main(["csv", "--src", str(path), "--images", str(images), "--out", str(out),
                       "--path-column", "id_code", "--label-columns", "Diagnosis Grade",
                       "--patient-column", "patient", "--eye-column", "eye", "--text-column", "report"]) == 0
    assert "train.csv line 5: image 'zz' not found" in capsys.readouterr().err
    ds = load_dataset(out)
    assert ds.spec.task("diagnosis_grade").classes == ("0", "1", "2", "10")  # numeric order
    assert ds.spec.task("report").kind == "text"
    got = by_name(ds)
    assert got["a2.png"].eye == "left" and got["a3.png"].eye == "right" and got["a4.png"].eye == "unknown"
    assert got["a2.png"].patient_id == "p1" and got["a2.png"].labels["diagnosis_grade"] == "2"
    assert got["a1.png"].split == got["a2.png"].split  # one patient, one split


def test_nothing_left_is_fatal(tmp_path, capsys):
    src = tmp_path / "odir"
    write_kaggle_odir(src)
    for f in (src / "preprocessed_images").iterdir():
        f.unlink()
    assert cli(adapt_main, ["odir", "--src", str(src), "--out", str(tmp_path / "ds")]) == 2
    assert "no usable image left" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="no .*full_df.csv"):
        find_labels(tmp_path / "nowhere")

"""The dataset format: manifest round trip, patient-level splits, label fractions, vocabulary."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from deploy.contract import TaskSpec
from deploy.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocabulary
from train.data.manifest import (
    DatasetError,
    DatasetSpec,
    Row,
    build_vocabulary,
    load_dataset,
    load_spec,
    read_manifest,
    save_spec,
    write_manifest,
)
from train.data.splits import PAPER_LABEL_FRACTIONS, assign_splits, label_fraction, leaking_patients

CLASSES = ("normal", "diabetes", "glaucoma", "rare")
WEIGHTS = (55, 25, 12, 8)  # imbalanced on purpose: stratification must still spread every class


def make_rows(n_patients: int = 200, seed: int = 0) -> list[Row]:
    """Two eyes per patient; eyes of one patient usually share a label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_patients):
        label = rng.choices(CLASSES, WEIGHTS)[0]
        for eye in ("left", "right"):
            other = rng.random() < 0.2
            lab = "normal" if other and label != "normal" else label
            rows.append(Row(path=f"img/{i}_{eye}.jpg", patient_id=f"p{i}", eye=eye, split="",
                            labels={"grade": lab, "text": f"{eye} eye: {lab}."}))
    return rows


def test_assign_splits_no_leak_stratified_deterministic():
    rows = assign_splits(make_rows(), "grade", seed=5)
    assert not leaking_patients(rows)
    assert {r.split for r in rows} == {"train", "val", "test"}
    patients = {s: {r.patient_id for r in rows if r.split == s} for s in ("train", "val", "test")}
    assert abs(len(patients["train"]) / 200 - 0.7) < 0.03 and abs(len(patients["test"]) / 200 - 0.15) < 0.03
    for cls in CLASSES:  # every class, even the rare one, lands in every split in about the right share
        per_split = Counter(r.split for r in rows if r.labels["grade"] == cls)
        assert all(per_split[s] > 0 for s in ("train", "val", "test")), (cls, per_split)
        assert abs(per_split["train"] / sum(per_split.values()) - 0.7) < 0.15
    again = assign_splits(make_rows(), "grade", seed=5)
    assert [r.split for r in again] == [r.split for r in rows]
    assert [r.split for r in assign_splits(make_rows(), "grade", seed=6)] != [r.split for r in rows]


def test_assign_splits_unlabelled_patients_and_preset_rows():
    rows = make_rows(20)
    rows[0].labels = {"grade": "", "text": ""}
    rows[1].labels = {"grade": "", "text": ""}  # patient p0 has no labelled eye
    rows[2].split = "unlabeled"
    out = assign_splits(rows, "grade", seed=0)
    assert out[0].split == out[1].split == "unlabeled"
    assert out[2].split == "unlabeled"
    assert rows[4].split == ""  # input rows are not mutated
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(rows, "grade", fractions={"train": 0.8, "holdout": 0.2})


@pytest.mark.parametrize("fraction", PAPER_LABEL_FRACTIONS)
def test_label_fraction_keeps_share_of_training_patients(fraction):
    rows = assign_splits(make_rows(), "grade", seed=1)
    out = label_fraction(rows, fraction, "grade", seed=2)
    train_before = {r.patient_id for r in rows if r.split == "train"}
    kept = {r.patient_id for r in out if r.split == "train"}
    assert kept <= train_before
    # Rounding is per class stratum (4 strata), so the share is right to within a patient per stratum.
    assert abs(len(kept) - fraction * len(train_before)) <= len(CLASSES)
    moved = [r for r in out if r.patient_id in train_before - kept]
    assert moved and all(r.split == "unlabeled" and not any(r.labels.values()) for r in moved)
    assert [r for r in out if r.split in ("val", "test")] == [r for r in rows if r.split in ("val", "test")]
    assert {r.labels["grade"] for r in out if r.split == "train"} == set(CLASSES)
    assert [r.split for r in label_fraction(rows, fraction, "grade", seed=2)] == [r.split for r in out]
    assert not leaking_patients(out)



def _one_class_patients(per_class: dict[str, int], split: str = "") -> list[Row]:
    """`n` two-eyed patients per class; every patient of a class is in that class's stratum."""
    return [Row(path=f"{c}{i}_{eye}.jpg", patient_id=f"{c}{i}", eye=eye, split=split, labels={"grade": c})
            for c, n in per_class.items() for i in range(n) for eye in ("left", "right")]


def _patients_per_split(rows: list[Row]) -> dict[str, int]:
    return dict(Counter(split for _, split in {(r.patient_id, r.split) for r in rows}))


@pytest.mark.parametrize("n, fractions, expected", [
    (7, {"train": 0.6, "val": 0.2, "test": 0.2}, {"train": 4, "val": 2, "test": 1}),  # 4.2/1.4/1.4: one left
    (10, {"train": 0.7, "val": 0.15, "test": 0.15}, {"train": 7, "val": 2, "test": 1}),  # 7/1.5/1.5
    (3, {"train": 0.5, "val": 0.25, "test": 0.25}, {"train": 1, "val": 1, "test": 1}),  # 1.5/.75/.75: two left
    (9, {"train": 0.7, "val": 0.15, "test": 0.15}, {"train": 6, "val": 2, "test": 1}),  # 6.3/1.35/1.35
])
def test_split_remainders_go_to_the_largest_fractional_parts(n, fractions, expected):
    rows = assign_splits(_one_class_patients({"a": n}), "grade", fractions, seed=0)
    assert _patients_per_split(rows) == expected


@pytest.mark.parametrize("fraction, per_class, expected", [
    (0.3, {"a": 5, "b": 5}, 4),  # 1.5 per class rounds to 2 (int() would keep 1)
    (0.15, {"a": 10, "b": 7}, 3),  # 1.5 -> 2 and 1.05 -> 1
    (0.7, {"a": 5, "b": 3}, 6),  # 3.5 -> 4 and 2.1 -> 2
    (0.1, {"a": 4, "b": 2}, 2),  # 0.4 and 0.2 round to 0, but one patient per class stays labelled
])
def test_label_fraction_keeps_the_rounded_number_of_patients_per_class(fraction, per_class, expected):
    rows = _one_class_patients(per_class, split="train")
    out = label_fraction(rows, fraction, "grade", seed=3)
    assert _patients_per_split(out) == {"train": expected, "unlabeled": sum(per_class.values()) - expected}


def test_label_fraction_rejects_bad_values():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="label fraction"):
            label_fraction(make_rows(4), bad, "grade")


def test_manifest_round_trip(tmp_path):
    spec = DatasetSpec(name="t", tasks=[TaskSpec("grade", "classification", CLASSES), TaskSpec("text", "text")],
                       description="d", extra={"source": "test"})
    save_spec(spec, tmp_path)
    assert load_spec(tmp_path) == spec
    rows = assign_splits(make_rows(10), "grade", seed=0)
    rows[3].labels["text"] = 'comma, "quote" and; semicolon'
    write_manifest(tmp_path / "manifest.csv", rows, spec.task_names)
    back = read_manifest(tmp_path / "manifest.csv", spec.task_names)
    assert [r.line for r in back] == list(range(2, len(rows) + 2))
    for a, b in zip(rows, back):
        assert (a.path, a.patient_id, a.eye, a.split, a.labels) == (b.path, b.patient_id, b.eye, b.split, b.labels)
    with pytest.raises(DatasetError, match="missing columns"):
        read_manifest(tmp_path / "manifest.csv", [*spec.task_names, "extra_task"])


def test_vocabulary_round_trip_and_train_only(tmp_path):
    spec = DatasetSpec(name="t", tasks=[TaskSpec("grade", "classification", CLASSES), TaskSpec("text", "text")])
    rows = [Row("a.jpg", "p1", "left", "train", {"grade": "normal", "text": "left eye: drusen and cataract."}),
            Row("b.jpg", "p2", "left", "val", {"grade": "normal", "text": "left eye: glaucoma."}),
            Row("c.jpg", "p3", "left", "train", {"grade": "normal", "text": "right eye: cataract."})]
    vocab = build_vocabulary(spec, rows, max_len=8)
    assert "glaucoma" not in vocab.tokens  # val words never enter the vocabulary
    assert vocab.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    ids = vocab.encode("left eye: cataract.")
    assert ids[-1] == EOS_ID and vocab.decode(ids) == "left eye: cataract."
    assert vocab.encode("left eye: glaucoma.")[3] == UNK_ID
    padded = vocab.encode_padded("eye")
    assert len(padded) == 8 and padded[2:] == [PAD_ID] * 6
    assert len(vocab.encode("cataract " * 20)) == 8  # truncated to max_len including <eos>
    # max_len is a cap: the longest training sentence (7 tokens) plus <eos> when that is shorter.
    assert build_vocabulary(spec, rows, max_len=24).max_len == 8
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab

    save_spec(spec, tmp_path)
    write_manifest(tmp_path / "manifest.csv", rows, spec.task_names)
    ds = load_dataset(tmp_path)
    assert ds.vocabulary == vocab and [r.path for r in ds.split("train")] == ["a.jpg", "c.jpg"]
    assert ds.image_path(ds.rows[0]) == tmp_path / "a.jpg"
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(DatasetError, match="--build-vocab"):
        load_dataset(tmp_path)

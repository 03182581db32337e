"""The synthetic fundus generator: determinism, label/text/image consistency, splits, dataset format."""

from __future__ import annotations

from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from deploy.fileio import sha256_file
from deploy.vocab import detokenize, tokenize
from train.config import ConfigError, from_dict, load_config
from train.data.make_data import main as make_data_main
from train.data.manifest import load_dataset
from train.data.splits import leaking_patients
from train.data.synth.catalog import COARSE_CLASSES, FINE_CLASSES, FINE_NAMES, FINE_TO_COARSE, fine_of
from train.data.synth.config import SynthConfig
from train.data.synth.generate import generate, plan_jobs
from train.data.synth.grammar import DISEASE_PHRASES, MAX_TOKENS
from train.data.synth.render import EyeJob, RenderSettings, render_image, render_jpeg

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data.yaml"
SMALL = dict(patients=10, unlabeled_patients=2, size=96, seed=3, contact_sheet_samples=0)


def _cfg(**kw) -> SynthConfig:
    return from_dict(SynthConfig, {**SMALL, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(_cfg(workers=1), root)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((root / "images").glob("*.jpg"))}


def test_same_config_gives_same_bytes_serial_or_parallel(dataset, tmp_path):
    generate(_cfg(workers=2), tmp_path)
    assert _hashes(tmp_path) == _hashes(dataset)
    assert (tmp_path / "manifest.csv").read_text() == (dataset / "manifest.csv").read_text()
    assert (tmp_path / "vocab.json").read_text() == (dataset / "vocab.json").read_text()


def test_other_seed_gives_other_images(dataset, tmp_path):
    generate(_cfg(workers=1, seed=4), tmp_path)
    a, b = _hashes(dataset), _hashes(tmp_path)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_manifest_loads_with_three_tasks(dataset):
    ds = load_dataset(dataset)
    assert ds.spec.task_names == ["coarse", "fine", "diagnosis"]
    assert ds.spec.task("coarse").classes == COARSE_CLASSES
    assert ds.spec.extra["fine_to_coarse"] == FINE_TO_COARSE
    assert len(ds.rows) == 2 * (SMALL["patients"] + SMALL["unlabeled_patients"])
    for r in ds.rows:
        path = ds.image_path(r)
        assert path.name == f"{r.patient_id}_{r.eye}.jpg" and path.read_bytes()[:2] == b"\xff\xd8"
        with Image.open(path) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
    assert (dataset / "synth_config.yaml").is_file()
    assert load_config(SynthConfig, dataset / "synth_config.yaml") == _cfg(workers=1)


def test_labels_and_text_agree(dataset):
    ds = load_dataset(dataset)
    labelled = [r for r in ds.rows if r.split != "unlabeled"]
    assert len(labelled) == 2 * SMALL["patients"]
    for r in labelled:
        coarse, fine, text = r.labels["coarse"], r.labels["fine"], r.labels["diagnosis"]
        assert FINE_TO_COARSE[fine] == coarse
        assert text.startswith(f"{r.eye} eye: ")
        assert any(p in text for p in DISEASE_PHRASES[coarse]), text
        others = [p for c, ps in DISEASE_PHRASES.items() if c != coarse for p in ps]
        assert not any(p in text for p in others), text
        assert len(tokenize(text)) <= MAX_TOKENS


def test_splits_are_by_patient_and_unlabelled_rows_have_no_labels(dataset):
    ds = load_dataset(dataset)
    assert leaking_patients(ds.rows) == {}
    assert {r.split for r in ds.rows} <= {"train", "val", "test", "unlabeled"}
    for r in ds.rows:
        assert (r.split == "unlabeled") == r.patient_id.startswith("U")
        assert r.is_labelled() == (r.split != "unlabeled")


def test_vocabulary_round_trips_training_sentences(dataset):
    ds = load_dataset(dataset)
    vocab = ds.vocabulary
    longest = max(len(tokenize(r.labels["diagnosis"])) for r in ds.split("train"))
    # As long as the longest training sentence plus <eos> (the decoder's fixed step count), at most 24.
    assert vocab is not None and vocab.max_len == min(24, longest + 1)
    for r in ds.split("train"):
        text = r.labels["diagnosis"]
        assert vocab.decode(vocab.encode(text)) == detokenize(tokenize(text))


@pytest.mark.parametrize("fine", FINE_NAMES)
def test_every_fine_class_renders_with_a_short_consistent_sentence(fine):
    st = RenderSettings(size=64, seed=1, difficulty=0.5, jpeg_quality=92)
    for patient in range(3):
        for eye in ("right", "left"):
            arr, text, g = render_image(EyeJob(0, patient, "P0", eye, fine), st)
            assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
            assert len(tokenize(text)) <= MAX_TOKENS and text.startswith(f"{eye} eye: ")
            assert (g.disc[0] > g.cx) == (eye == "right")  # disc on the viewer's side of the eye
            assert (g.fovea[0] < g.disc[0]) == (eye == "right")  # macula temporal to the disc


@pytest.mark.parametrize("eye", ["right", "left"])
def test_disc_is_the_bright_spot_on_the_eye_side(eye):
    st = RenderSettings(size=128, seed=0, difficulty=0.5, jpeg_quality=92)
    for patient in range(4):
        data, _ = render_jpeg(EyeJob(0, patient, "P0", eye, "normal_clean"), st)
        lum = Image.open(BytesIO(data)).convert("L").filter(ImageFilter.BoxBlur(4))
        y, x = np.unravel_index(np.argmax(np.asarray(lum)), (128, 128))
        assert (x > 64) == (eye == "right")


def test_default_plan_gives_every_fine_class_enough_labelled_images():
    cfg = SynthConfig()
    jobs = plan_jobs(cfg)
    labelled = Counter(j.fine for j in jobs if j.stream == 0)
    assert sum(labelled.values()) == 2 * cfg.patients
    # ~70% go to training: >= 24 images per class gives >= ~15 labelled training images.
    assert set(labelled) == set(FINE_NAMES) and min(labelled.values()) >= 24, labelled
    coarse = Counter(FINE_TO_COARSE[f] for f in labelled.elements())
    assert coarse["melanoma"] == min(coarse.values())  # the rare class
    assert {f.coarse for f in FINE_CLASSES} == set(COARSE_CLASSES)
    assert all(len(fine_of(c)) >= 4 for c in COARSE_CLASSES) and 20 <= len(FINE_NAMES) <= 40


def test_rerun_removes_stale_images_and_keeps_a_valid_manifest(dataset, tmp_path):
    generate(_cfg(workers=1), tmp_path)
    (tmp_path / "images" / "P99_right.jpg").write_bytes(b"stale")
    generate(_cfg(workers=1, patients=4, unlabeled_patients=0), tmp_path)
    ds = load_dataset(tmp_path)
    names = {p.name for p in (tmp_path / "images").glob("*.jpg")}
    assert names == {Path(r.path).name for r in ds.rows} and len(names) == 8


def test_bad_config_values_are_rejected():
    with pytest.raises(ConfigError, match="difficulty"):
        from_dict(SynthConfig, {"difficulty": 1.5})
    with pytest.raises(ConfigError, match="prevalence"):
        from_dict(SynthConfig, {"prevalence": {"cataract": 1.0}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SynthConfig, {"patient": 3})


def test_make_data_entry_point(tmp_path, capsys):
    rc = make_data_main(["--config", str(CONFIG), "--out", str(tmp_path), "patients=4", "unlabeled_patients=1", "size=64", "workers=1",
                         "contact_sheet_samples=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 10 images" in out and "vocabulary:" in out and "images/s per core" in out
    assert (tmp_path / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"
    assert make_data_main(["--config", str(CONFIG), "--out", str(tmp_path), "difficulty=2"]) == 2

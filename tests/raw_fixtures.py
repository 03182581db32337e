"""Small public-dataset look-alikes in their *raw* release formats (ODIR-5K Kaggle, IDRiD grading, APTOS
2019), for end-to-end tests that start where a user starts: the downloaded folder, then our adapters.

Each label gets its own colour and a bright patch on a noisy disc, so tiny models can learn something and
the INT8 guard compares real predictions; the sizes are a few dozen images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

_HUES = [(200, 60, 40), (60, 180, 60), (50, 70, 200), (200, 190, 40), (160, 60, 190), (40, 190, 190)]


def fundus_like(path: Path, label: int, detail: int, rng: np.random.Generator, size: int = 48) -> Path:
    """A noisy disc coloured by `label`, with a bright square whose position encodes `detail`."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    arr = np.array(_HUES[label % len(_HUES)], np.float32) + rng.normal(0, 20, (size, size, 3))
    q, x0 = size // 5, 6 + (detail % 3) * (size // 4)
    arr[size // 2 - q // 2: size // 2 + q // 2, x0:x0 + q] = 250
    arr[~disc] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


ODIR_KEYWORDS = ["normal fundus", "moderate non proliferative retinopathy", "glaucoma", "cataract"]


def write_odir(root: Path, patients: int = 36, seed: int = 0) -> Path:
    """Kaggle ODIR-5K: full_df.csv (one row per eye, per-patient N..O flags) + preprocessed_images/."""
    rng = np.random.default_rng(seed)
    header = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
              "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O", "filepath", "labels",
              "target", "filename"]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "full_df.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for pid in range(patients):
            kws = [int(rng.integers(len(ODIR_KEYWORDS))) for _ in range(2)]
            flags = [int(any(ODIR_KEYWORDS[k].startswith(w) for k in kws)) for w in ("normal", "moderate", "glaucoma", "cataract")]
            for eye, k in zip(("left", "right"), kws):
                name = f"{pid}_{eye}.jpg"
                fundus_like(root / "preprocessed_images" / name, k, pid, rng)
                writer.writerow([pid, 60, "Female", f"{pid}_left.jpg", f"{pid}_right.jpg", ODIR_KEYWORDS[kws[0]],
                                 ODIR_KEYWORDS[kws[1]], flags[0], flags[1], flags[2], flags[3], 0, 0, 0, 0,
                                 f"../input/{name}", "['N']", "[1]", name])
    return root


def write_idrid(root: Path, train: int = 40, test: int = 12, seed: int = 0) -> Path:
    """IDRiD "B. Disease Grading": images + the two label CSVs (grade 0-4, oedema risk 0-2)."""
    rng = np.random.default_rng(seed)
    base = root / "B. Disease Grading"
    for count, folder, csv_name in (
            (train, "a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv"),
            (test, "b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv")):
        lines = ["Image name,Retinopathy grade,Risk of macular edema "]
        for i in range(1, count + 1):
            grade, risk = int(rng.integers(5)), int(rng.integers(3))
            fundus_like(base / "1. Original Images" / folder / f"IDRiD_{i:03d}.jpg", grade, risk, rng)
            lines.append(f"IDRiD_{i:03d},{grade},{risk}")
        path = base / "2. Groundtruths" / csv_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base


def write_aptos(root: Path, images: int = 60, seed: int = 0) -> Path:
    """APTOS 2019: train.csv (id_code, diagnosis 0-4) + train_images/<id_code>.png; no text."""
    rng = np.random.default_rng(seed)
    rows = ["id_code,diagnosis"]
    for i in range(images):
        grade = int(rng.choice(5, p=[0.5, 0.1, 0.25, 0.05, 0.1]))  # skewed, like the real set
        code = f"{i:04x}abc"
        fundus_like(root / "train_images" / f"{code}.png", grade, 0, rng)
        rows.append(f"{code},{grade}")
    (root / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "train.csv"

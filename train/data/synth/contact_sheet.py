"""A contact sheet of a generated dataset: one row per coarse class, captioned samples.

Used to eyeball that the images look like fundus photographs and the lesions are visible.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from PIL import Image  # noqa: E402

from deploy.fileio import atomic_write  # noqa: E402
from train.data.manifest import Row  # noqa: E402


def pick_samples(rows: list[Row], coarse: str, n: int) -> list[Row]:
    """Up to n labelled rows of one coarse class, cycling through its fine classes (deterministic)."""
    by_fine: dict[str, list[Row]] = {}
    for r in rows:
        if r.labels.get("coarse") == coarse:
            by_fine.setdefault(r.labels["fine"], []).append(r)
    picked: list[Row] = []
    depth = 0
    while len(picked) < n and any(len(v) > depth for v in by_fine.values()):
        picked += [v[depth] for _, v in sorted(by_fine.items()) if len(v) > depth][: n - len(picked)]
        depth += 1
    return picked


def contact_sheet(root: str | Path, rows: list[Row], classes: list[str], out: str | Path, per_class: int = 6,
                  thumb: int | None = None) -> Path:
    """Write a PNG grid (rows = coarse classes) of images under `root`, captioned with the fine label
    and the wrapped diagnosis text. `thumb` shows the images downsampled to that size first."""
    root = Path(root)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(2.7 * per_class, 3.5 * len(classes)),
                             squeeze=False)
    for i, coarse in enumerate(classes):
        samples = pick_samples(rows, coarse, per_class)
        for j, ax in enumerate(axes[i]):
            ax.axis("off")
            if j >= len(samples):
                continue
            r = samples[j]
            img = Image.open(root / r.path).convert("RGB")
            if thumb:
                img = img.resize((thumb, thumb), Image.BILINEAR)
            ax.imshow(img, interpolation="bilinear")
            caption = r.labels["fine"] + "\n" + "\n".join(textwrap.wrap(r.labels.get("diagnosis", ""), 40))
            ax.set_title(caption, fontsize=7, loc="left")
        axes[i][0].text(-0.08, 0.5, coarse, transform=axes[i][0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=10, weight="bold")
    fig.tight_layout()
    path = atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)
    return path

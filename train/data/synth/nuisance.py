"""Acquisition nuisances, applied to every eye (normal ones included) so that mild disease cannot be
told apart by image quality: uneven illumination, exposure and colour cast, flare haze, lens dust,
sensor noise, the circular field-of-view stop, defocus blur, small rotations and JPEG artefacts.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from train.data.synth.anatomy import Geometry
from train.data.synth.lesions import dust
from train.data.synth.paint import blend, crop, ellipse_alpha, grid


def strength_of(difficulty: float) -> float:
    """Nuisance strength from difficulty 0..1 (0.4 at the easiest, 1.3 at the hardest)."""
    return 0.4 + 0.9 * min(max(difficulty, 0.0), 1.0)


def _flare(img: np.ndarray, g: Geometry, rng: np.random.Generator, amount: float) -> None:
    """Whitish-blue haze entering from one edge of the field (pupil too small, lashes, reflections)."""
    a = rng.uniform(0, 2 * math.pi)
    x, y = g.cx + g.radius * math.cos(a), g.cy + g.radius * math.sin(a)
    res = ellipse_alpha(img, x, y, 0.55 * g.radius, 0.55 * g.radius, edge=0.9)
    if res is not None:
        rows, cols, alpha, _ = res
        blend(img[rows, cols], alpha, (0.85, 0.82, 0.95), amount)


def acquisition(img: np.ndarray, g: Geometry, rng: np.random.Generator, s: float, bank: dict,
                artefact: float = 0.0) -> np.ndarray:
    """Lighting, colour, haze, dust, noise and the field-of-view stop; returns the 8-bit HxWx3 array.

    The per-pixel factors (illumination tilt, vignetting, field stop, exposure, colour cast, and the
    scale to 0..255) are folded into one multiply: full-frame passes dominate the rendering time.
    """
    if artefact > 0 or rng.random() < 0.25 * s:
        _flare(img, g, rng, rng.uniform(0.15, 0.35) * max(s, artefact))
    if rng.random() < 0.5:
        n = int(rng.integers(1, 4))
        pts = [(g.cx + rng.uniform(-0.7, 0.7) * g.radius, g.cy + rng.uniform(-0.7, 0.7) * g.radius)
               for _ in range(n)]
        dust(img, g, rng, pts, strength=0.2 * s)
    img += crop(bank["white"], rng, g.size) * np.float32(rng.uniform(0.004, 0.025) * s)
    xs, ys = grid(g.size)
    dx, dy = xs - np.float32(g.cx), ys - np.float32(g.cy)
    r = np.sqrt(dx * dx + dy * dy) * np.float32(1 / g.radius)
    phi = rng.uniform(0, 2 * math.pi)
    tilt = np.float32(rng.uniform(0.0, 0.35) * s / g.radius)
    light = 1.0 + tilt * (dx * np.float32(math.cos(phi)) + dy * np.float32(math.sin(phi)))
    light -= np.float32(rng.uniform(0.0, 0.3) * s) * (r * r) ** 2  # vignetting
    light *= np.clip((1.0 - r) * np.float32(g.radius / 1.2), 0.0, 1.0)  # soft field stop
    gains = np.exp(rng.normal(0.0, 0.06 * s, size=3) + rng.normal(0.0, 0.12 * s)) * 255.0
    img *= light[..., None]
    img *= gains.astype(np.float32)
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def finish(arr: np.ndarray, g: Geometry, rng: np.random.Generator, s: float) -> Image.Image:
    """8-bit array -> PIL image with defocus, a small rotation and (sometimes) JPEG artefacts."""
    pil = Image.fromarray(arr, "RGB")
    if rng.random() < 0.5:
        # Defocus as a down-and-up resize: close to a Gaussian blur at a fraction of its cost here.
        k = 1.0 + rng.uniform(0.2, 1.3) * s
        small = max(8, round(g.size / k))
        pil = pil.resize((small, small), Image.BILINEAR, reducing_gap=None).resize(pil.size, Image.BICUBIC)
    angle = float(np.clip(rng.normal(0.0, 4.0 * s), -10, 10))
    if rng.random() < 0.7:
        pil = pil.rotate(angle, resample=Image.BILINEAR, center=(g.cx, g.cy), fillcolor=(0, 0, 0))
    if rng.random() < 0.35 * s:
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=int(rng.integers(30, 70)))
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return pil

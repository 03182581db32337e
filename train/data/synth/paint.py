"""Drawing primitives shared by the anatomy, lesion and nuisance painters.

Images are float32 HxWx3 arrays in [0, 1]. Speed matters (thousands of images per minute on two
cores), so full-frame work is kept to a few vectorised numpy operations per layer: small lesions are
painted on their bounding box only, many small shapes are drawn with Pillow into one 8-bit coverage
mask (at 2x, reduced for anti-aliasing) and composited once, and smooth noise comes from a bank of
textures computed once per process and cropped at random offsets.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BANK_TEXTURES = 6
SUPERSAMPLE = 2


@lru_cache(maxsize=4)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: xs with shape (1, size) and ys with shape (size, 1)."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :], c[:, None]


def _smooth_noise(rng: np.random.Generator, side: int, cells: tuple[int, ...]) -> np.ndarray:
    """Multi-octave value noise in [0, 1]: random grids upsampled bicubically and summed."""
    out = np.zeros((side, side), np.float32)
    for i, n in enumerate(cells):
        small = Image.fromarray(rng.random((n, n), dtype=np.float32), mode="F")
        out += np.asarray(small.resize((side, side), Image.BICUBIC), np.float32) * 0.6**i
    out -= out.min()
    return out / max(float(out.max()), 1e-6)


@lru_cache(maxsize=4)
def noise_bank(size: int, seed: int) -> dict[str, np.ndarray]:
    """Textures twice the image size, the same in every worker for a given (size, seed).

    "smooth": choroidal mottling; "ridged": a network of thin lines (choroidal vessels in a
    tessellated fundus); "white": per-pixel sensor noise, N(0, 1).
    """
    rng = np.random.default_rng([seed, 0xBA9C])
    side = 2 * size
    smooth = np.stack([_smooth_noise(rng, side, (6, 14, 34, 80, side // 3)) for _ in range(BANK_TEXTURES)])
    ridged = np.stack([1.0 - np.abs(_smooth_noise(rng, side, (18, 40)) - 0.5) * 2.0
                       for _ in range(BANK_TEXTURES)]) ** 2.5
    white = rng.standard_normal((side, side, 3), dtype=np.float32)
    return {"smooth": smooth, "ridged": ridged.astype(np.float32), "white": white}


def texture(bank: dict[str, np.ndarray], kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random window of a random texture of `kind` ("smooth" or "ridged") from the bank."""
    stack = bank[kind]
    return crop(stack[int(rng.integers(len(stack)))], rng, size)


def crop(tex: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random size x size window of a texture (HxW or HxWxC), randomly flipped (a view, no copy)."""
    y, x = (int(v) for v in rng.integers(0, tex.shape[0] - size + 1, size=2))
    out = tex[y:y + size, x:x + size]
    if rng.random() < 0.5:
        out = out[::-1]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def blend(img: np.ndarray, alpha: np.ndarray, color, strength: float = 1.0) -> None:
    """In place: img <- img + (color - img) * alpha * strength (alpha is HxW in [0, 1])."""
    a = alpha if strength == 1.0 else alpha * np.float32(strength)
    img += (np.asarray(color, np.float32) - img) * a[..., None]


def _box(img: np.ndarray, x: float, y: float, r: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    h, w = img.shape[:2]
    x0, x1 = max(int(x - r) - 1, 0), min(int(x + r) + 2, w)
    y0, y1 = max(int(y - r) - 1, 0), min(int(y + r) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return None
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - x
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - y
    return slice(y0, y1), slice(x0, x1), xs, ys


def ellipse_alpha(img: np.ndarray, x: float, y: float, rx: float, ry: float, angle: float = 0.0,
                  edge: float = 0.3, power: float = 1.0):
    """Soft elliptical coverage on the ellipse's bounding box: (rows, cols, alpha, d).

    `edge` is the soft fraction of the radius; `d` is the normalised elliptic distance (1 = border)
    for painters that shade the inside (e.g. a dome's highlight). Returns None when off-image.
    """
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    box = _box(img, x, y, max(rx, ry) * (1 + edge))
    if box is None:
        return None
    rows, cols, xs, ys = box
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xs * c + ys * s) / rx, (-xs * s + ys * c) / ry
    d = np.sqrt(u * u + v * v)
    alpha = np.clip((1.0 + edge - d) / max(edge * 2, 1e-3), 0.0, 1.0)
    alpha = alpha * alpha * (3 - 2 * alpha)  # smoothstep: no visible ring at the border
    return rows, cols, alpha**power if power != 1.0 else alpha, d


def blob(img: np.ndarray, x: float, y: float, rx: float, ry: float, color, strength: float = 1.0,
         angle: float = 0.0, edge: float = 0.3) -> None:
    """Blend a soft ellipse of `color` into img (bounding-box work only)."""
    res = ellipse_alpha(img, x, y, rx, ry, angle, edge)
    if res is not None:
        rows, cols, alpha, _ = res
        blend(img[rows, cols], alpha, color, strength)


def shade(img: np.ndarray, x: float, y: float, r: float, gain: float, sigma_px: float | None = None) -> None:
    """Multiply a Gaussian neighbourhood by up to (1 + gain) (negative gain darkens)."""
    sigma = sigma_px or r
    box = _box(img, x, y, 3 * sigma)
    if box is not None:
        rows, cols, xs, ys = box
        g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma)) * np.float32(gain) + 1.0
        img[rows, cols] *= g[..., None]


class Mask:
    """An 8-bit coverage mask drawn with Pillow at 2x and reduced, so thin strokes are anti-aliased."""

    def __init__(self, size: int):
        self.size = size
        self.image = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.empty = True

    def ellipse(self, x: float, y: float, rx: float, ry: float | None = None, value: int = 255) -> None:
        s, ry = SUPERSAMPLE, rx if ry is None else ry
        self.draw.ellipse([(x - rx) * s, (y - ry) * s, (x + rx) * s, (y + ry) * s], fill=value)
        self.empty = False

    def line(self, points: np.ndarray, width: float, value: int = 255) -> None:
        """A polyline of constant width; round joints keep curves smooth."""
        pts = [(float(px) * SUPERSAMPLE, float(py) * SUPERSAMPLE) for px, py in points]
        w = max(1, int(round(width * SUPERSAMPLE)))
        self.draw.line(pts, fill=value, width=w, joint="curve" if w > 2 else None)
        self.empty = False

    def region(self, blur: float = 0.0) -> tuple[slice, slice, np.ndarray] | None:
        """Coverage in [0, 1] on the bounding box of what was drawn (plus room for the blur), at image
        size; the box keeps compositing cheap when only a few small lesions were drawn."""
        bbox = None if self.empty else self.image.getbbox()
        if bbox is None:
            return None
        pad = SUPERSAMPLE * (int(2 * blur) + 2)
        x0, y0 = (max(0, v - pad) // SUPERSAMPLE for v in bbox[:2])
        x1, y1 = (min(self.size, -(-(v + pad) // SUPERSAMPLE)) for v in bbox[2:])
        img = self.image.crop((x0 * SUPERSAMPLE, y0 * SUPERSAMPLE, x1 * SUPERSAMPLE, y1 * SUPERSAMPLE))
        img = img.reduce(SUPERSAMPLE)
        if blur > 0:
            # Box blur on the small crop: Pillow's Gaussian blur costs milliseconds per call here.
            img = img.filter(ImageFilter.BoxBlur(blur))
        return slice(y0, y1), slice(x0, x1), np.asarray(img, np.float32) * np.float32(1 / 255)


def paint_mask(img: np.ndarray, mask: Mask, color, strength: float = 1.0, blur: float = 0.0) -> None:
    """Composite a drawn mask onto img (only on its bounding box; nothing when nothing was drawn)."""
    res = mask.region(blur)
    if res is None:
        return
    rows, cols, alpha = res
    if alpha.size < 4096:
        blend(img[rows, cols], alpha, color, strength)
        return
    # Large but sparse masks (the vessel tree): blend only the covered pixels.
    ys, xs = np.nonzero(alpha)
    region = img[rows, cols]
    px = region[ys, xs]
    px += (np.asarray(color, np.float32) - px) * (alpha[ys, xs] * np.float32(strength))[:, None]
    region[ys, xs] = px

"""Lesion painters: the visible signs of each disease, drawn onto a float RGB fundus.

Sizes are in disc diameters (g.dd pixels) so they scale with the image; `vis` (from the difficulty
knob) scales contrast and size. Lesions are drawn somewhat larger and more contrasted than real ones
so that they survive the 96-112 px training resolution.
"""

from __future__ import annotations

import math

import numpy as np

from train.data.synth.anatomy import Geometry, Vessel
from train.data.synth.paint import Mask, blend, blob, ellipse_alpha, paint_mask, shade

HAEM = (0.42, 0.03, 0.03)
EXUDATE = (1.0, 0.90, 0.42)
COTTON = (0.96, 0.91, 0.86)
DRUSEN = (0.99, 0.84, 0.45)
ORANGE = (0.98, 0.55, 0.12)


def microaneurysms(img: np.ndarray, g: Geometry, rng: np.random.Generator, points: list, vis: float) -> None:
    """Tiny round dark-red dots (one per point)."""
    mask = Mask(g.size)
    for x, y in points:
        mask.ellipse(x, y, 0.055 * g.dd * vis * rng.uniform(0.85, 1.15))
    paint_mask(img, mask, HAEM, min(1.0, 0.9 * vis))


def haemorrhages(img: np.ndarray, g: Geometry, rng: np.random.Generator, points: list, vis: float,
                 big: float = 1.0) -> None:
    """Dot-blot haemorrhages: irregular dark-red blots made of a few overlapping ellipses."""
    mask = Mask(g.size)
    for x, y in points:
        r = g.dd * rng.uniform(0.07, 0.15) * big * vis
        for _ in range(int(rng.integers(1, 4))):
            ox, oy = rng.normal(0, 0.35 * r, size=2)
            mask.ellipse(x + ox, y + oy, r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0))
    paint_mask(img, mask, HAEM, min(1.0, 0.85 * vis), blur=0.6)


def flame_haemorrhages(img: np.ndarray, g: Geometry, rng: np.random.Generator, vessels: list[Vessel],
                       n: int, vis: float) -> None:
    """Streaky haemorrhages lying along the nerve fibre layer, i.e. along a vessel."""
    big = [v for v in vessels if len(v.points) > 8]
    for _ in range(n if big else 0):
        v = big[int(rng.integers(len(big)))]
        i = int(rng.integers(3, len(v.points) - 2))
        (x0, y0), (x1, y1) = v.points[i - 1], v.points[i + 1]
        ang = math.atan2(y1 - y0, x1 - x0)
        off = rng.choice([-1, 1]) * 0.12 * g.dd
        blob(img, x1 - off * math.sin(ang), y1 + off * math.cos(ang), 0.22 * g.dd * vis, 0.06 * g.dd * vis,
             HAEM, min(1.0, 0.8 * vis), angle=ang, edge=0.5)


def exudates(img: np.ndarray, g: Geometry, rng: np.random.Generator, centre: tuple[float, float], n: int,
             spread_dd: float, vis: float, ring: bool = False) -> None:
    """Sharp waxy-yellow dots in a cluster (or a circinate ring) around `centre`."""
    mask = Mask(g.size)
    cx, cy = centre
    for _ in range(n):
        if ring:
            a = rng.uniform(0, 2 * math.pi)
            d = spread_dd * g.dd * rng.normal(1.0, 0.12)
        else:
            a, d = rng.uniform(0, 2 * math.pi), spread_dd * g.dd * math.sqrt(rng.random())
        r = g.dd * rng.uniform(0.035, 0.08) * vis
        mask.ellipse(cx + d * math.cos(a), cy + d * math.sin(a), r, r * rng.uniform(0.7, 1.0))
    paint_mask(img, mask, EXUDATE, min(1.0, 0.9 * vis))


def cotton_wool(img: np.ndarray, g: Geometry, rng: np.random.Generator, points: list, vis: float) -> None:
    """Fluffy pale-white patches with feathery edges (blurred irregular clusters)."""
    mask = Mask(g.size)
    for x, y in points:
        r = g.dd * rng.uniform(0.14, 0.22) * vis
        for _ in range(4):
            ox, oy = rng.normal(0, 0.35 * r, size=2)
            mask.ellipse(x + ox, y + oy, r * rng.uniform(0.5, 0.9), r * rng.uniform(0.4, 0.8))
    paint_mask(img, mask, COTTON, min(1.0, 0.8 * vis), blur=1.2 * g.size / 256)


def new_vessels(img: np.ndarray, g: Geometry, rng: np.random.Generator, centre: tuple[float, float],
                radius_dd: float, vis: float) -> None:
    """Neovascular frond: a tangle of fine looping red vessels with a faint fibrous veil."""
    cx, cy = centre
    blob(img, cx, cy, radius_dd * g.dd, radius_dd * g.dd, (0.92, 0.80, 0.72), 0.25 * vis, edge=0.6)
    mask = Mask(g.size)
    for _ in range(int(rng.integers(7, 12))):
        a0 = rng.uniform(0, 2 * math.pi)
        pts, a = [], a0
        x, y = cx, cy
        for _ in range(8):
            a += rng.normal(0, 0.9)
            x += math.cos(a) * 0.12 * g.dd
            y += math.sin(a) * 0.12 * g.dd
            if math.hypot(x - cx, y - cy) > radius_dd * g.dd:
                a += math.pi
            pts.append((x, y))
        mask.line(np.array(pts), max(0.6, 0.035 * g.dd * vis))
    paint_mask(img, mask, (0.55, 0.03, 0.05), min(1.0, 0.9 * vis))


def preretinal_haemorrhage(img: np.ndarray, g: Geometry, x: float, y: float, size_dd: float, vis: float) -> None:
    """Boat-shaped haemorrhage: a bright-red pool with a flat upper fluid level."""
    r = 0.5 * size_dd * g.dd
    res = ellipse_alpha(img, x, y, r * 1.2, r, edge=0.12)
    if res is not None:
        rows, cols, alpha, _ = res
        ys = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
        alpha = alpha * np.clip((ys - (y - 0.25 * r)) / 1.5, 0, 1)  # flat top: blood settles
        blend(img[rows, cols], alpha, (0.55, 0.02, 0.03), min(1.0, 0.95 * vis))


def drusen(img: np.ndarray, g: Geometry, rng: np.random.Generator, n: int, spread_dd: float,
           size_dd: tuple[float, float], vis: float) -> None:
    """Round soft yellow deposits scattered around the fovea."""
    mask = Mask(g.size)
    fx, fy = g.fovea
    for _ in range(n):
        a, d = rng.uniform(0, 2 * math.pi), spread_dd * g.dd * math.sqrt(rng.uniform(0.02, 1))
        r = g.dd * rng.uniform(*size_dd) * vis
        mask.ellipse(fx + d * math.cos(a), fy + d * math.sin(a), r)
    paint_mask(img, mask, DRUSEN, min(1.0, 0.75 * vis), blur=0.9 * g.size / 256)


def geographic_atrophy(img: np.ndarray, g: Geometry, rng: np.random.Generator, centre, size_dd: float,
                       vis: float) -> None:
    """Sharply bordered pale patch where the choroid shows through, rimmed by pigment."""
    x, y = centre
    r = 0.5 * size_dd * g.dd
    blob(img, x, y, r * 1.1, r * 1.1, (0.30, 0.16, 0.08), 0.35 * vis, edge=0.15)
    blob(img, x, y, r, r * rng.uniform(0.8, 1.0), (0.97, 0.78, 0.58), min(1.0, 0.85 * vis), edge=0.08,
         angle=rng.uniform(0, math.pi))
    for _ in range(3):
        blob(img, x + rng.normal(0, 0.4 * r), y + rng.normal(0, 0.4 * r), 0.15 * r, 0.6 * r,
             (0.85, 0.45, 0.25), 0.5, angle=rng.uniform(0, math.pi), edge=0.6)


def subretinal_haemorrhage(img: np.ndarray, g: Geometry, rng: np.random.Generator, size_dd: float,
                           vis: float) -> None:
    """Dark-red irregular haemorrhage around a grey-green membrane at the macula, with exudates."""
    fx, fy = g.fovea
    r = 0.5 * size_dd * g.dd
    for _ in range(4):
        blob(img, fx + rng.normal(0, 0.25 * r), fy + rng.normal(0, 0.25 * r), r * rng.uniform(0.6, 0.85),
             r * rng.uniform(0.5, 0.8), (0.33, 0.03, 0.03), min(1.0, 0.75 * vis), angle=rng.uniform(0, 3))
    blob(img, fx, fy, 0.35 * r, 0.3 * r, (0.48, 0.46, 0.36), 0.7 * vis, edge=0.5)
    exudates(img, g, rng, (fx, fy), int(rng.integers(6, 12)), 0.6 * size_dd, vis, ring=True)


def disciform_scar(img: np.ndarray, g: Geometry, rng: np.random.Generator, size_dd: float, vis: float) -> None:
    """White-yellow fibrous scar with black pigment clumps at the macula."""
    fx, fy = g.fovea
    r = 0.5 * size_dd * g.dd
    for _ in range(3):
        blob(img, fx + rng.normal(0, 0.2 * r), fy + rng.normal(0, 0.2 * r), r * rng.uniform(0.6, 0.9),
             r * rng.uniform(0.55, 0.8), (0.95, 0.90, 0.76), min(1.0, 0.7 * vis), angle=rng.uniform(0, 3),
             edge=0.35)
    for _ in range(int(rng.integers(3, 7))):
        a, d = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.2, 0.9)
        pr = r * rng.uniform(0.08, 0.18)
        blob(img, fx + d * math.cos(a), fy + d * math.sin(a), pr, pr * 0.7, (0.22, 0.14, 0.10), 0.6 * vis,
             angle=rng.uniform(0, 3), edge=0.6)


def pigmented_lesion(img: np.ndarray, g: Geometry, rng: np.random.Generator, centre, size_dd: float, vis: float,
                     dome: float = 0.0, orange: int = 0, fluid: bool = False) -> None:
    """Choroidal nevus (flat slate-grey) or melanoma (`dome` > 0: raised, shaded, brown)."""
    x, y = centre
    r = 0.5 * size_dd * g.dd
    ry, ang = r * rng.uniform(0.75, 1.0), rng.uniform(0, math.pi)
    if fluid:
        blob(img, x, y + 0.3 * r, r * 1.45, ry * 1.5, (0.92, 0.70, 0.45), 0.35 * vis, angle=ang, edge=0.5)
    colour = (0.34, 0.31, 0.27) if dome == 0 else (0.40, 0.30, 0.20)
    res = ellipse_alpha(img, x, y, r, ry, ang, edge=0.35 if dome == 0 else 0.15)
    if res is None:
        return
    rows, cols, alpha, d = res
    blend(img[rows, cols], alpha, colour, min(1.0, (0.6 + 0.3 * dome) * vis))
    if dome > 0:
        # A raised tumour catches the flash on its upper side and shadows its lower side.
        ys = (np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5 - y) / max(ry, 1.0)
        light = np.clip(1.0 - d, 0, 1) * (0.45 - 0.5 * ys) * dome
        img[rows, cols] *= (1.0 + alpha * light)[..., None]
    for _ in range(orange):
        a, dd = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform(0, 0.6))
        pr = g.dd * rng.uniform(0.05, 0.1) * vis
        blob(img, x + dd * math.cos(a), y + dd * math.sin(a), pr, pr * 0.8, ORANGE, min(1.0, 0.8 * vis))


def disc_haemorrhage(img: np.ndarray, g: Geometry, quadrant: str, vis: float) -> None:
    """Splinter haemorrhage crossing the disc margin, radial to the disc."""
    dx, dy = g.direction(quadrant)
    x = g.disc[0] + dx * 0.5 * g.dd
    y = g.disc[1] + dy * 0.55 * g.dd
    blob(img, x, y, 0.22 * g.dd * vis, 0.07 * g.dd * vis, HAEM, min(1.0, 0.9 * vis),
         angle=math.atan2(dy, dx), edge=0.4)


def dust(img: np.ndarray, g: Geometry, rng: np.random.Generator, points: list, strength: float) -> None:
    """Out-of-focus dust on the lens: soft grey-dark discs of varying opacity."""
    for x, y in points:
        r = g.dd * rng.uniform(0.1, 0.22)
        shade(img, x, y, 0.0, -strength * rng.uniform(0.5, 1.0), sigma_px=r)

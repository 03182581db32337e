"""The healthy fundus: field of view, retina and choroid, optic disc and cup, vessel arcades, macula.

Convention (as on every fundus camera): the photo is upright, superior at the top; in a right-eye
photo the optic disc is on the right of the image (nasal side), the macula about 2.5 disc diameters
temporal to it (to the left); mirrored for the left eye. Quadrants are named around the fovea.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from train.data.synth.paint import Mask, blob, grid, paint_mask, shade, texture

QUADRANT_SIGNS = {"superotemporal": (1, -1), "inferotemporal": (1, 1), "superonasal": (-1, -1),
                  "inferonasal": (-1, 1)}  # (temporal sign, vertical sign in image rows)


@dataclass(frozen=True)
class Traits:
    """Patient-level appearance shared by both eyes."""

    pigment: float  # 0 = blond fundus (orange, see-through choroid), 1 = dark red-brown
    tessellation: float  # 0..1 visibility of the choroidal vessel network
    vessel_tortuosity: float


def patient_traits(rng: np.random.Generator) -> Traits:
    return Traits(pigment=float(rng.beta(2.2, 2.2)), tessellation=float(rng.beta(1.0, 9.0)),
                  vessel_tortuosity=float(rng.uniform(0.04, 0.12)))


@dataclass(frozen=True)
class Geometry:
    """Where things are in one photo (pixels). side = +1 when the disc is on the right (right eye)."""

    size: int
    eye: str
    side: int
    cx: float
    cy: float
    radius: float
    dd: float  # disc diameter
    disc: tuple[float, float]
    fovea: tuple[float, float]

    def direction(self, quadrant: str) -> tuple[float, float]:
        """Unit vector from the fovea into the middle of `quadrant`."""
        t, v = QUADRANT_SIGNS[quadrant]
        return -self.side * t * math.sqrt(0.5), v * math.sqrt(0.5)

    def quadrant_of(self, x: float, y: float) -> str:
        temporal = (x - self.fovea[0]) * -self.side > 0
        superior = y < self.fovea[1]
        return ("supero" if superior else "infero") + ("temporal" if temporal else "nasal")

    def inside(self, x: float, y: float, margin: float = 0.0) -> bool:
        return math.hypot(x - self.cx, y - self.cy) < self.radius - margin

    def dist_dd(self, x: float, y: float, to: str = "fovea") -> float:
        px, py = self.fovea if to == "fovea" else self.disc
        return math.hypot(x - px, y - py) / self.dd

    def place(self, rng: np.random.Generator, quadrant: str, lo_dd: float, hi_dd: float,
              margin_px: float = 0.0) -> tuple[float, float]:
        """A random point in `quadrant` at lo..hi disc diameters from the fovea, inside the field of
        view (by margin_px) and clear of the disc; falls back to the quadrant's middle direction."""
        t, v = QUADRANT_SIGNS[quadrant]
        for _ in range(40):
            ang = rng.uniform(0.15, math.pi / 2 - 0.15)  # keep away from the quadrant borders
            d = rng.uniform(lo_dd, hi_dd) * self.dd
            x = self.fovea[0] - self.side * t * d * math.cos(ang)
            y = self.fovea[1] + v * d * math.sin(ang)
            if self.inside(x, y, margin_px) and self.dist_dd(x, y, "disc") > 0.9:
                return x, y
        dx, dy = self.direction(quadrant)
        d = lo_dd * self.dd
        return self.fovea[0] + dx * d, self.fovea[1] + dy * d


def make_geometry(rng: np.random.Generator, size: int, eye: str, shift: float) -> Geometry:
    """Random but anatomically plausible layout; `shift` (0..1) scales the off-centre framing."""
    side = 1 if eye == "right" else -1
    radius = size * rng.uniform(0.445, 0.475)
    cx, cy = size / 2 + size * 0.035 * shift * rng.uniform(-1, 1, size=2)
    dd = radius * rng.uniform(0.25, 0.29)
    fx = cx - side * radius * rng.uniform(0.06, 0.14)
    fy = cy + radius * rng.uniform(-0.04, 0.06)
    disc = (fx + side * 2.5 * dd * rng.uniform(0.93, 1.07), fy - dd * rng.uniform(0.1, 0.45))
    return Geometry(size, eye, side, float(cx), float(cy), float(radius), float(dd),
                    (float(disc[0]), float(disc[1])), (float(fx), float(fy)))


def paint_background(img: np.ndarray, g: Geometry, traits: Traits, bank: dict, rng: np.random.Generator,
                     tessellation: float | None = None) -> None:
    """Orange-red retina lit by the choroid, with mottling, optional tessellation and edge falloff."""
    p = traits.pigment
    base = np.array([0.90 - 0.30 * p, 0.47 - 0.26 * p, 0.22 - 0.13 * p], np.float32)
    base *= rng.uniform(0.94, 1.06, size=3).astype(np.float32)
    xs, ys = grid(g.size)
    r2 = ((xs - g.cx) ** 2 + (ys - g.cy) ** 2) * np.float32(1 / g.radius**2)
    mottle = texture(bank, "smooth", rng, g.size)
    factor = 1.0 + np.float32(0.16) * (mottle - np.float32(0.5)) - np.float32(0.22) * r2
    tess = traits.tessellation if tessellation is None else tessellation
    if tess > 0.05:
        # Dark pigmented spaces between bright orange choroidal vessels, stronger off the macula.
        ridges = texture(bank, "ridged", rng, g.size)
        factor -= np.float32(0.55 * tess) * (1 - ridges) * (np.float32(0.35) + r2)
    np.multiply(factor[..., None], base, out=img)


def paint_macula(img: np.ndarray, g: Geometry, traits: Traits, rng: np.random.Generator) -> None:
    """Darker macula (xanthophyll and pigment) with a darker fovea and a small bright foveal reflex."""
    fx, fy = g.fovea
    shade(img, fx, fy, 0.0, -(0.22 + 0.18 * traits.pigment) * rng.uniform(0.8, 1.1), sigma_px=0.75 * g.dd)
    shade(img, fx, fy, 0.0, -0.18, sigma_px=0.22 * g.dd)
    r = max(0.045 * g.dd, 0.7)
    blob(img, fx, fy, r, r, (1.0, 0.95, 0.85), strength=rng.uniform(0.4, 0.7), edge=0.6)


def paint_disc(img: np.ndarray, g: Geometry, rng: np.random.Generator, cdr: float, notch: float = 0.0,
               ppa: float = 0.0, crescent: float = 0.0) -> tuple[float, float, float]:
    """Optic disc (yellowish, slightly tall oval) with a paler cup of vertical cup-to-disc ratio `cdr`.

    `notch` (0..1) deepens the cup towards the inferior rim; `ppa` paints peripapillary atrophy around
    the disc, `crescent` a myopic temporal crescent. Returns the cup centre and vertical radius.
    """
    dx, dy = g.disc
    rx, ry = 0.47 * g.dd, 0.53 * g.dd
    tdir = -g.side
    if ppa > 0:
        blob(img, dx + tdir * 0.15 * g.dd, dy, rx * 1.55, ry * 1.35, (0.86, 0.72, 0.55), 0.85 * ppa, edge=0.25)
        blob(img, dx + tdir * 0.45 * g.dd, dy + 0.1 * g.dd, rx * 0.55, ry * 0.6, (0.35, 0.18, 0.1), 0.5 * ppa)
    if crescent > 0:
        blob(img, dx + tdir * 0.3 * g.dd, dy, rx * 1.05, ry * 1.02, (0.97, 0.86, 0.70), 0.9 * crescent, edge=0.12)
    shade(img, dx, dy, 0.0, 0.10, sigma_px=0.8 * g.dd)
    blob(img, dx, dy, rx, ry, (0.96, 0.60, 0.40), 0.95, edge=0.14)
    cup_ry = cdr * ry
    cup_y = dy + notch * 0.18 * ry
    cup_x = dx + tdir * 0.06 * g.dd * rng.uniform(0, 1)
    blob(img, cup_x, cup_y, min(cup_ry * rng.uniform(0.88, 0.98), rx * 0.95), cup_ry, (1.0, 0.93, 0.74),
         0.97, edge=0.18)
    return cup_x, cup_y, cup_ry


@dataclass
class Vessel:
    points: np.ndarray  # (n, 2) x, y
    widths: np.ndarray  # (n,) pixels
    vein: bool


def _walk(g: Geometry, x: float, y: float, heading: float, target: float | None, width: float,
          steps: int, rng: np.random.Generator, wiggle: float, turn: float = 0.14) -> Vessel | None:
    """Grow one vessel: heading relaxes towards `target` (if any) with noise; stops at the field edge
    or at the foveal avascular zone."""
    step = 0.22 * g.dd
    noise = rng.normal(0.0, wiggle, size=steps)
    pts, ws = [(x, y)], [width]
    for i in range(steps):
        if target is not None:
            delta = math.atan2(math.sin(target - heading), math.cos(target - heading))
            heading += max(-turn, min(turn, delta))
        heading += noise[i]
        x += step * math.cos(heading)
        y += step * math.sin(heading)
        width *= 0.982
        if not g.inside(x, y, 2.0) or g.dist_dd(x, y) < 0.45:
            break
        pts.append((x, y))
        ws.append(width)
    if len(pts) < 3:
        return None
    return Vessel(np.array(pts, np.float32), np.array(ws, np.float32), False)


def _branches(g: Geometry, parent: Vessel, rng: np.random.Generator, depth: int, wiggle: float) -> list[Vessel]:
    out: list[Vessel] = []
    i = int(rng.integers(4, 8))
    while i < len(parent.points) - 2:
        (x0, y0), (x1, y1) = parent.points[i - 1], parent.points[i]
        heading = math.atan2(y1 - y0, x1 - x0) + rng.choice([-1, 1]) * rng.uniform(0.35, 0.85)
        width = float(parent.widths[i]) * rng.uniform(0.55, 0.75)
        if width > 0.5:
            # Branches bend outwards, away from the disc, giving the radial look of a real tree.
            outward = math.atan2(float(y1) - g.disc[1], float(x1) - g.disc[0])
            child = _walk(g, float(x1), float(y1), heading, outward, width, int(rng.integers(6, 16)), rng,
                          wiggle, turn=0.05)
            if child is not None:
                child.vein = parent.vein
                out.append(child)
                if depth > 0:
                    out += _branches(g, child, rng, depth - 1, wiggle)
        i += int(rng.integers(5, 10))
    return out


def grow_vessels(g: Geometry, traits: Traits, rng: np.random.Generator) -> list[Vessel]:
    """Four arcades (superotemporal, inferotemporal, superonasal, inferonasal), each an artery and a
    vein, with tapering branches, plus small macular vessels heading straight for the fovea."""
    tx = -g.side
    vessels: list[Vessel] = []
    wig = traits.vessel_tortuosity
    for vert in (-1, 1):
        for temporal in (True, False):
            for vein in (True, False):
                off = (0.12 if vein else -0.12) * g.dd * (1 if temporal else -1)
                x0, y0 = g.disc[0] + off * tx, g.disc[1] + vert * 0.3 * g.dd
                if temporal:
                    start = math.atan2(vert * 1.0, tx * rng.uniform(0.2, 0.5))
                    target = math.atan2(vert * rng.uniform(0.15, 0.45), tx)
                else:
                    start = math.atan2(vert * 1.0, -tx * rng.uniform(0.4, 0.9))
                    target = math.atan2(vert * rng.uniform(0.3, 0.8), -tx)
                w = (0.105 if vein else 0.08) * g.dd * rng.uniform(0.9, 1.1)
                main = _walk(g, x0, y0, start, target, w, 60, rng, wig * 0.5, turn=0.085 if temporal else 0.12)
                if main is None:
                    continue
                main.vein = vein
                vessels.append(main)
                vessels += _branches(g, main, rng, 1, wig)
    for vert in (-1, 1):
        heading = math.atan2(vert * rng.uniform(0.05, 0.3), tx)
        small = _walk(g, g.disc[0] + tx * 0.3 * g.dd, g.disc[1], heading, None, 0.05 * g.dd, 8, rng, wig)
        if small is not None:
            vessels.append(small)
    return vessels


def paint_vessels(img: np.ndarray, g: Geometry, vessels: list[Vessel], contrast: float = 1.0) -> None:
    """Veins darker and wider, arteries lighter and thinner; drawn as tapering polyline chunks."""
    veins, arteries = Mask(g.size), Mask(g.size)
    for v in vessels:
        mask = veins if v.vein else arteries
        n = len(v.points)
        widths = v.widths.tolist()
        for a in range(0, n - 1, 3):
            mask.line(v.points[a:a + 4], widths[min(a + 1, n - 1)])
    paint_mask(img, arteries, (0.70, 0.17, 0.10), 0.65 * contrast)
    paint_mask(img, veins, (0.40, 0.06, 0.06), 0.85 * contrast)

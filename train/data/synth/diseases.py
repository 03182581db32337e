"""What to paint for each fine class, and the facts the diagnosis sentence reports about it.

`plan_eye` decides every text-relevant quantity first (quadrant, count, size, cup-to-disc ratio...)
and returns closures that paint exactly that, so the sentence always describes the image drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from train.data.synth import lesions as L
from train.data.synth.anatomy import Geometry, Vessel
from train.data.synth.catalog import FINE_TO_COARSE, QUADRANTS

Painter = Callable[[np.ndarray], None]
RELATIONS = {"temporal to": (1, 0), "nasal to": (-1, 0), "above": (0, -1), "below": (0, 1)}
CDR_RANGES = {"glaucoma_cup_0_6_to_0_7": (0.6, 0.65), "glaucoma_cup_0_7_to_0_8": (0.7, 0.75),
              "glaucoma_cup_over_0_8": (0.85, 0.9)}


@dataclass
class Plan:
    """Everything decided about one eye before painting."""

    fine: str
    cdr: float
    facts: dict = field(default_factory=dict)
    notch: float = 0.0  # > 0: cup extends to the inferior rim, < 0: superior
    ppa: float = 0.0
    crescent: float = 0.0
    tessellation: float | None = None  # None: the patient's own trait
    artefact: float = 0.0  # extra camera-artefact strength (lens dust, flare)
    deep: list[Painter] = field(default_factory=list)  # under the retinal vessels
    surface: list[Painter] = field(default_factory=list)  # over them


def knobs(difficulty: float) -> tuple[float, float]:
    """(visibility, count factor) from difficulty 0..1: harder = subtler, smaller and fewer lesions."""
    d = min(max(difficulty, 0.0), 1.0)
    return 1.35 - 0.6 * d, 1.35 - 0.6 * d


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _half_dd(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A size in disc diameters rounded to 0.5, as a clinician would report it."""
    return float(_pick(rng, np.arange(lo, hi + 1e-6, 0.5)))


def _count(rng: np.random.Generator, lo: int, hi: int, cm: float) -> int:
    return int(min(12, max(2, round(rng.integers(lo, hi + 1) * cm))))


def _points(g: Geometry, rng: np.random.Generator, quadrant: str, n: int, lo=1.0, hi=3.1) -> list:
    return [g.place(rng, quadrant, lo, hi, margin_px=0.15 * g.dd) for _ in range(n)]


def _exudate_site(g: Geometry, rng: np.random.Generator) -> tuple[str, tuple[float, float]]:
    rel = _pick(rng, list(RELATIONS))
    t, v = RELATIONS[rel]
    d = rng.uniform(0.55, 0.85) * g.dd
    return rel, (g.fovea[0] - g.side * t * d, g.fovea[1] + v * d)


def _normal(plan: Plan, g: Geometry, rng: np.random.Generator, vis: float, cm: float) -> None:
    if plan.fine == "normal_tessellated":
        plan.tessellation = rng.uniform(0.35, 0.55) * min(vis, 1.1)
    elif plan.fine == "normal_myopic_crescent":
        plan.crescent = min(1.0, rng.uniform(0.7, 1.0) * vis)
    elif plan.fine == "normal_camera_artefact":
        q = _pick(rng, QUADRANTS)
        plan.facts["quadrant"] = q
        plan.artefact = 1.0
        pts = _points(g, rng, q, int(rng.integers(4, 8)), 1.2, 3.2)
        plan.surface.append(partial(L.dust, g=g, rng=rng, points=pts, strength=0.45 * vis))


def _dr(plan: Plan, g: Geometry, rng: np.random.Generator, vis: float, cm: float,
        vessels: list[Vessel]) -> None:
    f, facts = plan.fine, plan.facts
    q = _pick(rng, QUADRANTS)
    if "mild" in f:
        n = _count(rng, 3, 8, cm)
        facts.update(quadrant=q, count=n)
        plan.surface.append(partial(L.microaneurysms, g=g, rng=rng, points=_points(g, rng, q, n), vis=vis))
    elif "moderate" in f:
        n_cws = int(rng.integers(0, 4))
        facts.update(quadrant=q, cws=n_cws)
        main = _points(g, rng, q, _count(rng, 6, 11, cm))
        other = [p for q2 in QUADRANTS if q2 != q for p in _points(g, rng, q2, int(rng.integers(0, 2)))]
        plan.surface.append(partial(L.haemorrhages, g=g, rng=rng, points=main + other, vis=vis))
        plan.surface.append(partial(L.microaneurysms, g=g, rng=rng, points=_points(g, rng, q, 4), vis=vis))
        cws = [g.place(rng, _pick(rng, QUADRANTS), 1.2, 2.6) for _ in range(n_cws)]
        plan.surface.append(partial(L.cotton_wool, g=g, rng=rng, points=cws, vis=vis))
    elif "severe" in f:
        n_cws = _count(rng, 2, 5, 1.0)
        facts.update(cws=n_cws)
        pts = [p for q2 in QUADRANTS for p in _points(g, rng, q2, _count(rng, 4, 7, cm))]
        plan.surface.append(partial(L.haemorrhages, g=g, rng=rng, points=pts, vis=vis, big=1.3))
        plan.surface.append(partial(L.flame_haemorrhages, g=g, rng=rng, vessels=vessels, n=3, vis=vis))
        cws = [g.place(rng, _pick(rng, QUADRANTS), 1.2, 2.6) for _ in range(n_cws)]
        plan.surface.append(partial(L.cotton_wool, g=g, rng=rng, points=cws, vis=vis))
    else:  # proliferative
        at_disc = bool(rng.random() < 0.5)
        facts.update(nv="disc" if at_disc else q, preretinal=bool(rng.random() < 0.5))
        centre = g.disc if at_disc else g.place(rng, q, 1.8, 2.9, margin_px=0.6 * g.dd)
        pts = [p for q2 in QUADRANTS for p in _points(g, rng, q2, int(rng.integers(1, 4)))]
        plan.surface.append(partial(L.haemorrhages, g=g, rng=rng, points=pts, vis=vis))
        plan.surface.append(partial(L.new_vessels, g=g, rng=rng, centre=centre, radius_dd=0.75, vis=vis))
        if facts["preretinal"]:
            x, y = centre[0] + rng.normal(0, 0.2 * g.dd), centre[1] + 0.9 * g.dd
            plan.surface.append(partial(L.preretinal_haemorrhage, g=g, x=x, y=y, size_dd=1.0, vis=vis))
    if f.endswith("_dme"):
        rel, site = _exudate_site(g, rng)
        facts["exudates"] = rel
        plan.surface.append(partial(L.exudates, g=g, rng=rng, centre=site, n=_count(rng, 9, 16, cm * 1.2),
                                    spread_dd=0.35, vis=vis, ring=bool(rng.random() < 0.4)))
        plan.surface.append(partial(L.shade, x=g.fovea[0], y=g.fovea[1], r=0.0, gain=0.12, sigma_px=0.6 * g.dd))


def _amd(plan: Plan, g: Geometry, rng: np.random.Generator, vis: float, cm: float) -> None:
    f, facts = plan.fine, plan.facts
    if f == "amd_early_drusen":
        n = _count(rng, 5, 11, cm)
        facts["count"] = n
        plan.deep.append(partial(L.drusen, g=g, rng=rng, n=n, spread_dd=1.1, size_dd=(0.06, 0.09), vis=vis))
    elif f == "amd_intermediate_drusen":
        spread = float(_pick(rng, (1.0, 1.5)))
        facts["within"] = spread
        plan.deep.append(partial(L.drusen, g=g, rng=rng, n=_count(rng, 10, 12, cm) + 6, spread_dd=spread,
                                 size_dd=(0.1, 0.17), vis=vis))
    elif f == "amd_geographic_atrophy":
        size = _half_dd(rng, 1.0, 2.5)
        involving = bool(rng.random() < 0.5)
        facts.update(size=size, fovea="involving" if involving else "sparing")
        off = 0.0 if involving else 0.5 * size + 0.3
        a = rng.uniform(0, 2 * math.pi)
        centre = (g.fovea[0] + off * g.dd * math.cos(a), g.fovea[1] + off * g.dd * math.sin(a))
        plan.deep.append(partial(L.geographic_atrophy, g=g, rng=rng, centre=centre, size_dd=size, vis=vis))
    elif f == "amd_neovascular":
        size = _half_dd(rng, 1.0, 2.5)
        facts["size"] = size
        plan.deep.append(partial(L.subretinal_haemorrhage, g=g, rng=rng, size_dd=size, vis=vis))
    else:
        size = _half_dd(rng, 1.5, 3.0)
        facts["size"] = size
        plan.deep.append(partial(L.disciform_scar, g=g, rng=rng, size_dd=size, vis=vis))


def _glaucoma(plan: Plan, g: Geometry, rng: np.random.Generator, vis: float) -> None:
    f, facts = plan.fine, plan.facts
    if f in CDR_RANGES:
        plan.cdr = float(_pick(rng, CDR_RANGES[f]))
        if rng.random() < 0.5:
            rim = _pick(rng, ("inferior", "superior"))
            facts["rim"] = rim
            plan.notch = 1.0 if rim == "inferior" else -1.0
    else:
        plan.cdr = float(_pick(rng, (0.55, 0.6, 0.65, 0.7, 0.75)))
        if f == "glaucoma_disc_haemorrhage":
            q = "inferotemporal" if rng.random() < 0.7 else "superotemporal"
            facts["quadrant"] = q
            plan.surface.append(partial(L.disc_haemorrhage, g=g, quadrant=q, vis=vis))
        else:
            plan.ppa = min(1.0, rng.uniform(0.75, 1.0) * vis)
    facts["cdr"] = plan.cdr


def _melanoma(plan: Plan, g: Geometry, rng: np.random.Generator, vis: float) -> None:
    f, facts = plan.fine, plan.facts
    fluid = bool(rng.random() < 0.5)
    if f in ("melanoma_small_nevus", "melanoma_suspicious_nevus", "melanoma_peripheral"):
        q = _pick(rng, QUADRANTS)
        small = f == "melanoma_small_nevus"
        size = _half_dd(rng, *((0.5, 1.5) if small else (1.5, 2.5) if "nevus" in f else (2.5, 4.0)))
        lo, hi = (1.3, 2.6) if "nevus" in f else (2.4, 3.0)
        centre = g.place(rng, q, lo, hi)
        facts.update(quadrant=q, size=size)
        if "nevus" in f:
            orange = 0 if small else int(rng.integers(4, 8))
            dome = 0.0 if small else 0.25
            plan.deep.append(partial(L.pigmented_lesion, g=g, rng=rng, centre=centre, size_dd=size, vis=vis,
                                     dome=dome, orange=orange))
            return
    elif f == "melanoma_juxtapapillary":
        size = _half_dd(rng, 1.5, 3.0)
        where = _pick(rng, ("superior", "inferior", "nasal", "temporal"))
        dx, dy = {"superior": (0, -1), "inferior": (0, 1), "nasal": (g.side, 0), "temporal": (-g.side, 0)}[where]
        d = (0.45 + 0.4 * size) * g.dd
        centre = (g.disc[0] + dx * d, g.disc[1] + dy * d)
        facts.update(margin=where, size=size)
    else:
        size = _half_dd(rng, 2.0, 3.5)
        centre = (g.fovea[0] + rng.normal(0, 0.3 * g.dd), g.fovea[1] + rng.normal(0, 0.3 * g.dd))
        facts["size"] = size
    if f != "melanoma_juxtapapillary":
        facts["fluid"] = fluid
    plan.deep.append(partial(L.pigmented_lesion, g=g, rng=rng, centre=centre, size_dd=size, vis=vis, dome=1.0,
                             orange=int(rng.integers(0, 5)), fluid=fluid and f != "melanoma_juxtapapillary"))


def plan_eye(fine: str, g: Geometry, vessels: list[Vessel], rng: np.random.Generator, difficulty: float) -> Plan:
    """Decide the findings of one eye of fine class `fine` and how to paint them."""
    coarse = FINE_TO_COARSE[fine]
    vis, cm = knobs(difficulty)
    plan = Plan(fine=fine, cdr=float(_pick(rng, (0.2, 0.25, 0.3, 0.35, 0.4, 0.45))))
    if coarse == "normal":
        _normal(plan, g, rng, vis, cm)
    elif coarse == "diabetic_retinopathy":
        _dr(plan, g, rng, vis, cm, vessels)
    elif coarse == "amd":
        _amd(plan, g, rng, vis, cm)
    elif coarse == "glaucoma":
        _glaucoma(plan, g, rng, vis)
    else:
        _melanoma(plan, g, rng, vis)
    if coarse == "normal":
        plan.facts["cdr"] = plan.cdr
    return plan

"""Render one eye: anatomy, lesions, nuisances, JPEG bytes and the diagnosis sentence.

Every random choice comes from generators seeded by (seed, stream, patient, eye), so an image does not
depend on which process renders it or in which order: the same config gives the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from train.data.synth import anatomy
from train.data.synth.catalog import FINE_TO_COARSE
from train.data.synth.diseases import plan_eye
from train.data.synth.grammar import sentence
from train.data.synth.nuisance import acquisition, finish, strength_of
from train.data.synth.paint import noise_bank

EYES = ("right", "left")
LABELLED, UNLABELLED = 0, 1  # seed streams: adding unlabelled patients never changes labelled images


@dataclass(frozen=True)
class EyeJob:
    """One image to render."""

    stream: int
    patient: int  # index within the stream
    patient_id: str
    eye: str
    fine: str

    @property
    def filename(self) -> str:
        return f"{self.patient_id}_{self.eye}.jpg"


@dataclass(frozen=True)
class RenderSettings:
    size: int
    seed: int
    difficulty: float
    jpeg_quality: int


def patient_rng(seed: int, stream: int, patient: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, patient])


def render_image(job: EyeJob, st: RenderSettings) -> tuple[np.ndarray, str, anatomy.Geometry]:
    """8-bit RGB array (before blur, rotation and JPEG), its diagnosis sentence, and its geometry."""
    traits = anatomy.patient_traits(patient_rng(st.seed, job.stream, job.patient))
    rng = np.random.default_rng([st.seed, job.stream, job.patient, EYES.index(job.eye) + 1])
    bank = noise_bank(st.size, st.seed)
    s = strength_of(st.difficulty)
    g = anatomy.make_geometry(rng, st.size, job.eye, shift=s)
    vessels = anatomy.grow_vessels(g, traits, rng)
    plan = plan_eye(job.fine, g, vessels, rng, st.difficulty)
    img = np.empty((st.size, st.size, 3), np.float32)
    anatomy.paint_background(img, g, traits, bank, rng, tessellation=plan.tessellation)
    anatomy.paint_macula(img, g, traits, rng)
    anatomy.paint_disc(img, g, rng, plan.cdr, notch=plan.notch, ppa=plan.ppa, crescent=plan.crescent)
    for paint in plan.deep:
        paint(img)
    anatomy.paint_vessels(img, g, vessels)
    for paint in plan.surface:
        paint(img)
    arr = acquisition(img, g, rng, s, bank, artefact=plan.artefact)
    text = sentence(job.fine, FINE_TO_COARSE[job.fine], job.eye, plan.facts)
    return arr, text, g


def render_jpeg(job: EyeJob, st: RenderSettings) -> tuple[bytes, str]:
    """JPEG bytes and diagnosis sentence of one eye."""
    img, text, g = render_image(job, st)
    rng = np.random.default_rng([st.seed, job.stream, job.patient, EYES.index(job.eye) + 1, 7])
    pil = finish(img, g, rng, strength_of(st.difficulty))
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=st.jpeg_quality, optimize=False)
    return buf.getvalue(), text

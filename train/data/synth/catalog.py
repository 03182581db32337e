"""The synthetic taxonomy: five coarse diseases (T1), their fine sub-categories (T2), and prevalence.

Every fine class belongs to exactly one coarse class and has a *visible* signature painted by
`train.data.synth.lesions`. The within-class weights are chosen so that, with the default prevalence and
the fellow-eye rules of `plan_patient`, every fine class gets enough labelled training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COARSE_CLASSES = ("normal", "diabetic_retinopathy", "amd", "glaucoma", "melanoma")

# Share of *patients* whose main (worse-eye) diagnosis is each coarse class: a clinic-like mix where
# normal and DR are common and melanoma is the rarest (still enough for each fine class to be learnt).
# Per image this gives about normal 30%, DR 30%, AMD 15%, glaucoma 14%, melanoma 11% (fellow eyes).
DEFAULT_PREVALENCE = {"normal": 0.21, "diabetic_retinopathy": 0.30, "amd": 0.17, "glaucoma": 0.15,
                      "melanoma": 0.17}

QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")


@dataclass(frozen=True)
class FineClass:
    """A fine sub-category: its coarse parent and its weight when a patient's main eye is drawn."""

    name: str
    coarse: str
    weight: float = 1.0


FINE_CLASSES: tuple[FineClass, ...] = (
    FineClass("normal_clean", "normal", 1.2),
    FineClass("normal_tessellated", "normal", 1.0),
    FineClass("normal_myopic_crescent", "normal", 0.8),
    FineClass("normal_camera_artefact", "normal", 1.0),
    FineClass("dr_mild_npdr", "diabetic_retinopathy"),
    FineClass("dr_mild_npdr_dme", "diabetic_retinopathy"),
    FineClass("dr_moderate_npdr", "diabetic_retinopathy"),
    FineClass("dr_moderate_npdr_dme", "diabetic_retinopathy"),
    FineClass("dr_severe_npdr", "diabetic_retinopathy"),
    FineClass("dr_severe_npdr_dme", "diabetic_retinopathy"),
    FineClass("dr_proliferative", "diabetic_retinopathy"),
    FineClass("dr_proliferative_dme", "diabetic_retinopathy"),
    FineClass("amd_early_drusen", "amd", 0.8),
    FineClass("amd_intermediate_drusen", "amd", 0.9),
    FineClass("amd_geographic_atrophy", "amd", 1.1),
    FineClass("amd_neovascular", "amd", 1.1),
    FineClass("amd_disciform_scar", "amd", 1.1),
    FineClass("glaucoma_cup_0_6_to_0_7", "glaucoma", 0.8),
    FineClass("glaucoma_cup_0_7_to_0_8", "glaucoma", 0.9),
    FineClass("glaucoma_cup_over_0_8", "glaucoma", 1.1),
    FineClass("glaucoma_disc_haemorrhage", "glaucoma", 1.1),
    FineClass("glaucoma_peripapillary_atrophy", "glaucoma", 1.1),
    FineClass("melanoma_small_nevus", "melanoma", 0.2),
    FineClass("melanoma_suspicious_nevus", "melanoma", 1.0),
    FineClass("melanoma_peripheral", "melanoma", 1.0),
    FineClass("melanoma_juxtapapillary", "melanoma", 1.0),
    FineClass("melanoma_macular", "melanoma", 1.0),
)

FINE_NAMES = tuple(f.name for f in FINE_CLASSES)
FINE_TO_COARSE = {f.name: f.coarse for f in FINE_CLASSES}
DR_GRADES = ("mild", "moderate", "severe", "proliferative")
GLAUCOMA_GRADES = ("glaucoma_cup_0_6_to_0_7", "glaucoma_cup_0_7_to_0_8", "glaucoma_cup_over_0_8")


def fine_of(coarse: str) -> list[FineClass]:
    """Fine classes of one coarse class, in catalogue order."""
    if coarse not in COARSE_CLASSES:
        raise KeyError(f"unknown coarse class {coarse!r}; classes are {COARSE_CLASSES}")
    return [f for f in FINE_CLASSES if f.coarse == coarse]


def check_prevalence(prevalence: dict[str, float]) -> dict[str, float]:
    """Validate a coarse prevalence mapping and normalise it to sum to 1."""
    unknown = set(prevalence) - set(COARSE_CLASSES)
    if unknown:
        raise ValueError(f"prevalence has unknown classes {sorted(unknown)}; classes are {COARSE_CLASSES}")
    values = {c: float(prevalence.get(c, 0.0)) for c in COARSE_CLASSES}
    if any(v < 0 for v in values.values()) or sum(values.values()) <= 0:
        raise ValueError(f"prevalence values must be >= 0 with a positive sum, got {prevalence}")
    total = sum(values.values())
    return {c: v / total for c, v in values.items()}


def allocate(n: int, weights: dict[str, float]) -> list[str]:
    """n labels in proportion to `weights` by the largest-remainder rule (exact, deterministic)."""
    total = sum(weights.values())
    quotas = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    order = sorted(quotas, key=lambda k: (quotas[k] - counts[k], k), reverse=True)
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in weights for _ in range(counts[k])]


def _dr_name(grade: int, dme: bool) -> str:
    base = ("dr_mild_npdr", "dr_moderate_npdr", "dr_severe_npdr", "dr_proliferative")[grade]
    return base + ("_dme" if dme else "")


def _pick(rng: np.random.Generator, classes: list[FineClass]) -> str:
    w = np.array([f.weight for f in classes])
    return classes[int(rng.choice(len(classes), p=w / w.sum()))].name


def fellow_eye(main: str, rng: np.random.Generator) -> str:
    """Fine class of the other eye given the main eye's, following clinical correlations.

    DR is bilateral with a similar grade; AMD and glaucoma are usually bilateral and asymmetric;
    melanoma is unilateral (the fellow eye is normal or carries a small nevus).
    """
    coarse = FINE_TO_COARSE[main]
    u = rng.random()
    if coarse == "normal":
        # Tessellation and myopia are traits of the patient; camera artefacts are per photograph.
        if main != "normal_camera_artefact" and u < 0.6:
            return main
        return _pick(rng, fine_of("normal"))
    if coarse == "diabetic_retinopathy":
        grade = next(i for i, g in enumerate(DR_GRADES) if g in main)
        grade = int(np.clip(grade + rng.choice([-1, 0, 0, 1]), 0, 3))
        return _dr_name(grade, bool(rng.random() < 0.45))
    if coarse == "amd":
        if u < 0.25:
            return _pick(rng, fine_of("normal"))
        if main in ("amd_early_drusen", "amd_intermediate_drusen"):
            return main if u < 0.6 else ("amd_early_drusen", "amd_intermediate_drusen")[int(rng.integers(2))]
        return ("amd_early_drusen", "amd_intermediate_drusen", main)[int(rng.integers(3))]
    if coarse == "glaucoma":
        if u < 0.2:
            return _pick(rng, fine_of("normal"))
        if main in GLAUCOMA_GRADES:
            return GLAUCOMA_GRADES[max(0, GLAUCOMA_GRADES.index(main) - int(rng.integers(2)))]
        return GLAUCOMA_GRADES[int(rng.integers(3))] if u < 0.6 else main
    return "melanoma_small_nevus" if u < 0.3 else _pick(rng, fine_of("normal"))


def main_eye_classes(n_patients: int, prevalence: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Fine class of each patient's main eye: exact quotas per coarse and fine class, shuffled."""
    prevalence = check_prevalence(prevalence)
    out: list[str] = []
    for coarse, count in _counts(allocate(n_patients, prevalence)).items():
        fines = fine_of(coarse)
        out += allocate(count, {f.name: f.weight for f in fines})
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def sample_main_eye(prevalence: dict[str, float], rng: np.random.Generator) -> str:
    """One random main-eye fine class (used for unlabelled patients, which need no exact quotas)."""
    prevalence = check_prevalence(prevalence)
    coarse = COARSE_CLASSES[int(rng.choice(len(COARSE_CLASSES), p=[prevalence[c] for c in COARSE_CLASSES]))]
    return _pick(rng, fine_of(coarse))


def _counts(labels: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    return counts

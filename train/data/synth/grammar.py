"""The diagnosis sentence (T3): a small grammar over the facts of the painted eye.

It says more than the fine class: which eye, where (quadrant, relation to the fovea, disc margin),
how big (disc diameters), how many (counts in words) and the cup-to-disc ratio, so a text model has
to read the image, not just its class. Sentences stay within MAX_TOKENS tokens (deploy.vocab
tokenization), leaving room for <eos> in the default 24-token vocabulary.
"""

from __future__ import annotations

from deploy.vocab import tokenize

MAX_TOKENS = 22
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve")

# Every sentence of a coarse class contains one of its phrases and none of the other classes' phrases.
DISEASE_PHRASES = {"normal": ("normal",), "diabetic_retinopathy": ("diabetic retinopathy",),
                   "amd": ("macular degeneration",), "glaucoma": ("glaucoma",), "melanoma": ("nevus", "melanoma")}

_DR_GRADE = {"mild": "mild non-proliferative diabetic retinopathy",
             "moderate": "moderate non-proliferative diabetic retinopathy",
             "severe": "severe non-proliferative diabetic retinopathy",
             "proliferative": "proliferative diabetic retinopathy"}
_GLAUCOMA = {"glaucoma_cup_0_6_to_0_7": "early glaucoma", "glaucoma_cup_0_7_to_0_8": "moderate glaucoma",
             "glaucoma_cup_over_0_8": "advanced glaucoma"}


def number(n: int) -> str:
    """A count in words (counts above twelve are never painted)."""
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def _dd(size: float) -> str:
    return f"{size:g} disc diameter" + ("" if size == 1 else "s")


def _ratio(cdr: float) -> str:
    return f"cup-to-disc ratio {cdr:g}"


def _normal(fine: str, f: dict) -> str:
    if fine == "normal_tessellated":
        return f"normal tessellated fundus with visible choroidal vessels, {_ratio(f['cdr'])}"
    if fine == "normal_myopic_crescent":
        return f"normal myopic fundus with a temporal crescent at the disc, {_ratio(f['cdr'])}"
    if fine == "normal_camera_artefact":
        return f"normal fundus, image degraded by lens dust in the {f['quadrant']} quadrant"
    return f"normal fundus, healthy optic disc with {_ratio(f['cdr'])}"


def _dr(fine: str, f: dict) -> str:
    grade = next(g for g in _DR_GRADE if g in fine)
    head = _DR_GRADE[grade]
    dme = f"macular oedema with exudates {f['exudates']} the fovea" if "exudates" in f else ""
    if grade == "mild":
        if dme:
            return f"{head}, {number(f['count'])} microaneurysms, {dme}"
        return f"{head} with {number(f['count'])} microaneurysms in the {f['quadrant']} quadrant"
    if grade == "moderate":
        if dme:
            return f"{head}, {f['quadrant']} haemorrhages and {dme}"
        cws = f" and {number(f['cws'])} cotton-wool spot{'s' if f['cws'] > 1 else ''}" if f["cws"] else ""
        return f"{head} with dot-blot haemorrhages mainly in the {f['quadrant']} quadrant{cws}"
    if grade == "severe":
        if dme:
            return f"{head}, haemorrhages in four quadrants and {dme}"
        return f"{head} with haemorrhages in all four quadrants and {number(f['cws'])} cotton-wool spots"
    nv = "new vessels at the disc" if f["nv"] == "disc" else f"{f['nv']} new vessels"
    if dme:
        return f"{head}, {nv} and {dme}"
    if f["nv"] != "disc":
        nv = f"new vessels in the {f['nv']} quadrant"
    return f"{head} with {nv}" + (" and preretinal haemorrhage" if f["preretinal"] else "")


def _amd(fine: str, f: dict) -> str:
    if fine == "amd_early_drusen":
        return f"early age-related macular degeneration with {number(f['count'])} small drusen at the macula"
    if fine == "amd_intermediate_drusen":
        return (f"intermediate age-related macular degeneration with large drusen within "
                f"{_dd(f['within'])} of the fovea")
    if fine == "amd_geographic_atrophy":
        return (f"dry age-related macular degeneration with geographic atrophy of {_dd(f['size'])} "
                f"{f['fovea']} the fovea")
    if fine == "amd_neovascular":
        return (f"neovascular age-related macular degeneration with subretinal haemorrhage of "
                f"{_dd(f['size'])} at the macula")
    return f"late age-related macular degeneration with a disciform scar of {_dd(f['size'])} at the macula"


def _glaucoma(fine: str, f: dict) -> str:
    if fine in _GLAUCOMA:
        rim = f" and {f['rim']} rim thinning" if "rim" in f else ""
        return f"{_GLAUCOMA[fine]} with {_ratio(f['cdr'])}{rim}"
    if fine == "glaucoma_disc_haemorrhage":
        return f"glaucoma with a disc haemorrhage at the {f['quadrant']} margin, {_ratio(f['cdr'])}"
    return f"glaucoma with peripapillary atrophy and {_ratio(f['cdr'])}"


def _melanoma(fine: str, f: dict) -> str:
    fluid = " with subretinal fluid" if f.get("fluid") else ""
    if fine == "melanoma_small_nevus":
        return f"flat choroidal nevus of {_dd(f['size'])} in the {f['quadrant']} quadrant"
    if fine == "melanoma_suspicious_nevus":
        return f"suspicious choroidal nevus with orange pigment, {_dd(f['size'])}, in the {f['quadrant']} quadrant"
    if fine == "melanoma_peripheral":
        return f"choroidal melanoma of {_dd(f['size'])} in the {f['quadrant']} periphery{fluid}"
    if fine == "melanoma_juxtapapillary":
        return f"juxtapapillary choroidal melanoma of {_dd(f['size'])} at the {f['margin']} disc margin"
    return f"choroidal melanoma of {_dd(f['size'])} involving the macula{fluid}"


def sentence(fine: str, coarse: str, eye: str, facts: dict) -> str:
    """The diagnosis sentence of one eye, e.g. "right eye: mild non-proliferative diabetic
    retinopathy with four microaneurysms in the superotemporal quadrant." Raises ValueError when a
    sentence would exceed MAX_TOKENS (a grammar bug, caught by the tests)."""
    body = {"normal": _normal, "diabetic_retinopathy": _dr, "amd": _amd, "glaucoma": _glaucoma,
            "melanoma": _melanoma}[coarse](fine, facts)
    text = f"{eye} eye: {body}."
    if len(tokenize(text)) > MAX_TOKENS:
        raise ValueError(f"diagnosis sentence for {fine} has {len(tokenize(text))} tokens (> {MAX_TOKENS}): {text}")
    return text

"""ODIR-5K diagnostic keywords -> the eight ODIR categories, and how one eye gets one category.

ODIR annotates each eye with free keywords ("moderate non proliferative retinopathy，drusen"); the
N/D/G/C/A/H/M/O flags in the label files are per *patient* (both eyes OR-ed), so per-eye truth must
come from the eye's own keywords. The rules, in order:

1. Keywords are split on the full-width comma "，" (also "," and ";"), trimmed, lower-cased and
   whitespace-collapsed.
2. Quality notes (QUALITY_NOTES) describe the photograph, not the eye: they never decide a category
   and are removed from the fine finding and the diagnosis sentence.
3. An eye with "no fundus image" or "anterior segment image" is not a fundus photograph: excluded.
   An eye left with no diagnostic keyword (only quality notes, or nothing) has no label: excluded.
   Both exclusions are reported with their label-file row.
4. Each remaining keyword maps to a category through KEYWORD_CATEGORY. Unknown keywords count as
   "other" (O) and are reported as a warning so the table can be extended.
5. Several categories on one eye: the highest in PRIORITY wins (D > A > G > H > M > C > O > N).
   Sight-threatening retinal disease first; cataract late because it is usually recorded beside the
   retinal finding seen through it; "other" only when nothing specific is present; normal last.
"""

from __future__ import annotations

import re

from train.data.adapters.common import sentence_list

# ODIR letter -> readable class name (the T1 class list, in ODIR's column order).
CATEGORY_NAMES = {"N": "normal", "D": "diabetes", "G": "glaucoma", "C": "cataract", "A": "amd",
                  "H": "hypertension", "M": "myopia", "O": "other"}
PRIORITY = ("D", "A", "G", "H", "M", "C", "O", "N")

QUALITY_NOTES = frozenset({
    "lens dust", "low image quality", "image offset", "optic disk photographically invisible",
    "no fundus image", "anterior segment image",
})
NOT_FUNDUS = frozenset({"no fundus image", "anterior segment image"})

_D = ("mild nonproliferative retinopathy", "moderate non proliferative retinopathy",
      "severe nonproliferative retinopathy", "proliferative diabetic retinopathy",
      "severe proliferative diabetic retinopathy", "diabetic retinopathy",
      "suspected diabetic retinopathy", "suspicious diabetic retinopathy",
      "suspected moderate non proliferative retinopathy", "mild non proliferative retinopathy",
      "moderate nonproliferative retinopathy", "severe non proliferative retinopathy",
      "nonproliferative diabetic retinopathy", "non proliferative diabetic retinopathy")
_G = ("glaucoma", "suspected glaucoma", "suspicious glaucoma")
_C = ("cataract", "suspected cataract")
_A = ("dry age-related macular degeneration", "wet age-related macular degeneration",
      "age-related macular degeneration", "suspected age-related macular degeneration")
_H = ("hypertensive retinopathy", "suspected hypertensive retinopathy")
_M = ("pathological myopia", "myopia retinopathy", "myopic retinopathy", "high myopia",
      "myopic maculopathy", "myopia")
_N = ("normal fundus",)
# ODIR's "other diseases/abnormalities" (O): recorded findings outside the seven named groups.
_O = ("drusen", "epiretinal membrane", "macular epiretinal membrane", "epiretinal membrane over the macula",
      "optic disk epiretinal membrane", "suspected macular epimacular membrane", "laser spot",
      "post laser photocoagulation", "post retinal laser surgery", "vitreous degeneration",
      "vitreous opacity", "retinal pigmentation", "abnormal pigment", "pigmentation disorder",
      "macular pigmentation disorder", "depigmentation of the retinal pigment epithelium",
      "myelinated nerve fibers", "refractive media opacity", "branch retinal vein occlusion",
      "central retinal vein occlusion", "old branch retinal vein occlusion",
      "old central retinal vein occlusion", "branch retinal artery occlusion",
      "central retinal artery occlusion", "chorioretinal atrophy",
      "chorioretinal atrophy with pigmentation proliferation", "diffuse chorioretinal atrophy",
      "diffuse retinal atrophy", "oval yellow-white atrophy", "peripapillary atrophy", "atrophic change",
      "maculopathy", "macular hole", "macular coloboma", "tessellated fundus", "retinitis pigmentosa",
      "spotted membranous change", "optic disc edema", "optic nerve atrophy", "optic discitis",
      "suspected abnormal color of optic disc", "retinal detachment", "rhegmatogenous retinal detachment",
      "retinochoroidal coloboma", "congenital choroidal coloboma", "retinal artery macroaneurysm",
      "retinal vascular sheathing", "suspected retinal vascular sheathing", "old chorioretinopathy",
      "central serous chorioretinopathy", "morning glory syndrome", "arteriosclerosis", "silicone oil eye",
      "vessel tortuosity", "intraretinal hemorrhage", "intraretinal microvascular abnormality",
      "suspected microvascular anomalies", "wedge-shaped change", "wedge white line change",
      "white vessel", "asteroid hyalosis", "glial remnants anterior to the optic disc",
      "punctate inner choroidopathy", "idiopathic choroidal neovascularization", "retina fold",
      "retinal pigment epithelial detachment", "choroidal nevus", "fundus laser photocoagulation spots")

KEYWORD_CATEGORY: dict[str, str] = {kw: letter for letter, group in
                                    (("D", _D), ("G", _G), ("C", _C), ("A", _A), ("H", _H), ("M", _M),
                                     ("N", _N), ("O", _O)) for kw in group}

_SEPARATORS = re.compile(r"[，,;；]")


def split_keywords(text: str) -> list[str]:
    """Normalized keywords of one eye, in their original order, without duplicates."""
    seen: list[str] = []
    for part in _SEPARATORS.split(text or ""):
        kw = " ".join(part.strip().lower().split())
        if kw and kw not in seen:
            seen.append(kw)
    return seen


def diagnostic(keywords: list[str]) -> list[str]:
    """The keywords that describe the eye (quality notes removed)."""
    return [kw for kw in keywords if kw not in QUALITY_NOTES]


def exclusion_reason(keywords: list[str]) -> str:
    """Why an eye gets no label ('' when it has one)."""
    if NOT_FUNDUS & set(keywords):
        return "not a fundus photograph (" + ", ".join(sorted(NOT_FUNDUS & set(keywords))) + ")"
    if not diagnostic(keywords):
        return "no diagnostic keyword" + (f" (only quality notes: {', '.join(keywords)})" if keywords else "")
    return ""


def unknown_keywords(keywords: list[str]) -> list[str]:
    return [kw for kw in diagnostic(keywords) if kw not in KEYWORD_CATEGORY]


def category(keywords: list[str]) -> str:
    """Readable ODIR category of one eye by PRIORITY; unknown keywords count as 'other'."""
    letters = {KEYWORD_CATEGORY.get(kw, "O") for kw in diagnostic(keywords)}
    if not letters:
        raise ValueError(f"no diagnostic keyword in {keywords}; check exclusion_reason() first")
    return CATEGORY_NAMES[next(letter for letter in PRIORITY if letter in letters)]


def finding(keywords: list[str]) -> str:
    """The fine label: diagnostic keywords sorted and joined by '; ' (order-free, so one class each)."""
    return "; ".join(sorted(diagnostic(keywords)))


def sentence(keywords: list[str], eye: str) -> str:
    """The diagnosis text, e.g. 'left eye: moderate non proliferative retinopathy and drusen.'"""
    return f"{eye} eye: {sentence_list(diagnostic(keywords))}."

"""SynthConfig: the knobs of the synthetic dataset (defaults in configs/data.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.data.synth.catalog import DEFAULT_PREVALENCE, check_prevalence


@dataclass
class SynthConfig:
    """Size, balance and difficulty of the generated dataset. Same config -> same bytes."""

    name: str = "synthetic"
    patients: int = 650  # labelled patients, two eyes each
    unlabeled_patients: int = 2600  # rendered the same way, written without labels (~4x the labelled images)
    size: int = 256
    seed: int = 0
    workers: int = 0  # processes; 0 = all CPU cores
    difficulty: float = 0.5  # 0 = obvious lesions, clean photos; 1 = subtle lesions, heavy nuisances
    prevalence: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    vocab_min_freq: int = 1
    vocab_max_len: int = 24  # a cap: the longest training sentence + <eos> when shorter (Vocabulary.build)
    jpeg_quality: int = 92
    contact_sheet_samples: int = 6  # images per coarse class on contact_sheet.png; 0 = no sheet

    def __post_init__(self) -> None:
        if self.patients < 1 or self.unlabeled_patients < 0:
            raise ValueError(f"patients must be >= 1 and unlabeled_patients >= 0, got {self.patients}, "
                             f"{self.unlabeled_patients}")
        if not 32 <= self.size <= 2048:
            raise ValueError(f"size must be in 32..2048 pixels, got {self.size}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = all cores), got {self.workers}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if set(self.split_fractions) != {"train", "val", "test"} or any(v < 0 for v in self.split_fractions.values()):
            raise ValueError(f"split_fractions needs non-negative train, val and test, got {self.split_fractions}")
        if self.vocab_max_len < 2 or self.vocab_min_freq < 1 or self.contact_sheet_samples < 0:
            raise ValueError("vocab_max_len must be >= 2, vocab_min_freq >= 1, contact_sheet_samples >= 0")
        check_prevalence(self.prevalence)

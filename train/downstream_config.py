"""The config sections of the stages after training: compress (with its INT8 guard), bench and the
clinical numbers. Part of the experiment config (train/experiment.py re-exports them); kept apart so
each module holds one group of sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from train.floors import parse_floor

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class GuardConfig:
    """Largest allowed drop of an INT8 model against its FP32 model on the validation split."""

    max_drop_accuracy_points: float = 1.0  # first classification task (T1) accuracy
    max_drop_top5_points: float = 1.0  # other classification tasks (T2) top-5
    max_drop_bleu: float = 1.0  # text task BLEU
    # A drop over its limit that the validation split cannot tell from no drop still passes, up to this
    # many points: "within noise" = the paired patient-bootstrap 95 % interval of the drop (FP32 and INT8
    # on the same resampled patients, train/bootstrap.py) includes 0. On 198 images two flipped images
    # of a 20-image class are 2 points of balanced accuracy and usually within noise; six all flipped
    # the same way are not. The cap is noise_cap_points, or noise_cap_images validation images' worth of
    # the metric where that is more: on a small real validation split one image of a rare class is many
    # points, and an INT8 flavour that no drop can pass would leave nothing to deploy. Both 0 = the
    # limits above, exactly.
    noise_cap_points: float = 3.0
    noise_cap_images: int = 2
    # Tried in order when the first attempt misses a threshold (see compress/guard.py).
    fallbacks: list[Literal["method", "more_images", "sensitive_layers"]] = field(
        default_factory=lambda: ["method", "more_images", "sensitive_layers"])
    sensitivity_candidates: int = 12  # how many layers the per-layer sensitivity pass tries
    max_float_layers: int = 4  # at most this many sensitive layers are kept in float

    def __post_init__(self) -> None:
        if self.sensitivity_candidates < 1 or self.max_float_layers < 1:
            raise ValueError("guard.sensitivity_candidates and guard.max_float_layers must be >= 1")
        if min(self.max_drop_accuracy_points, self.max_drop_top5_points, self.max_drop_bleu, self.noise_cap_points,
               self.noise_cap_images) < 0:
            raise ValueError("guard thresholds are drops in points and must be >= 0")


@dataclass
class CompressConfig:
    opset: int = 17
    models: list[str] = field(default_factory=lambda: ["student", "baseline", "ensemble", "teachers"])
    quantize: list[str] = field(default_factory=lambda: ["student", "baseline"])
    verify_images: int | None = None  # validation images for the export check (None: all)
    verify_atol: float = 1e-4  # max |p_onnx - p_torch| of FP32 probabilities
    verify_min_agreement: float = 0.995  # identical top-1 and decoded text on at least this share
    calibration_images: int = 500
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = 99.999
    calibration_batch: int = 16
    guard: GuardConfig = field(default_factory=GuardConfig)
    threads: int = 2
    # Who places Q/DQ in the int8-tensorrt flavour: ort = our ModelOpt-style rules on ONNX Runtime's
    # quantizer (compress/trt_placement.py); modelopt = NVIDIA Model Optimizer itself (optional install,
    # compress/modelopt_quantizer.py), with its float remainder in modelopt_high_precision.
    tensorrt_quantizer: Literal["ort", "modelopt"] = "ort"
    modelopt_high_precision: Literal["fp16", "fp32"] = "fp16"


@dataclass
class BenchConfig:
    """The `bench:` section of the experiment config."""

    # 10 rounds of >= 0.2 s (batch 1) and 0.15 s (larger batches) per artifact, a fresh session each:
    # two runs agreed within 7 % on every ratio; 5 rounds of 0.2 s / 0.06 s with one session disagreed
    # by up to 45 % (the rounds' median was one session's draw, and 60 ms blocks at batch 8 mostly noise).
    duration_s: float = 2.0  # minimum timed seconds at batch 1 (all rounds together)
    rounds: int = 10  # interleaved timing rounds (benchmarks/interleave.py): every ratio's spread is over them
    batch_duration_s: float = 1.5  # minimum timed seconds at each larger batch
    warmup: int = 5
    min_runs: int = 10
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    threads: int | None = None  # None: every usable core
    providers: list[str] | None = None  # onnxruntime providers; None: deploy.runtime's default
    max_test_images: int | None = None  # None: the whole test split (the summary's images); else a seeded sample
    eval_batch_size: int = 32
    floors: list[str] = field(default_factory=list)  # "ARTIFACT:METRIC=VALUE", see benchmarks.accuracy
    # Peak memory, measured in a fresh process per artifact: "deploy" = ONNX and TensorRT artifacts
    # (~0.5 s each), "all" = also PyTorch (~3-6 s each: the process imports torch), "off".
    memory: Literal["deploy", "all", "off"] = "deploy"
    stage_images: int = 16  # images timed for the preprocess stage
    only: list[str] | None = None  # glob patterns of artifact names

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.batch_duration_s <= 0 or self.warmup < 0 or self.min_runs < 1:
            raise ValueError("durations must be > 0, warmup >= 0 and min_runs >= 1")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if 1 not in self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive and include 1 (the headline batch), got {self.batch_sizes}")
        self.batch_sizes = sorted(set(self.batch_sizes))
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for floor in self.floors:
            parse_floor(floor)


@dataclass
class ClinicalConfig:
    """The `clinical:` section: how summary.md's clinical numbers and every 95 % interval are made
    (train/clinical.py, train/bootstrap.py)."""

    # The any-disease-vs-normal operating point, chosen on the validation split and applied to test:
    # `sensitivity` = the most specific threshold that reaches target_sensitivity; `youden` = the
    # threshold maximising sensitivity + specificity - 1.
    operating_point: Literal["sensitivity", "youden"] = "sensitivity"
    target_sensitivity: float = 0.9
    # Patient-level bootstrap resamples behind every 95 % interval (summary, bench, INT8 guard).
    bootstrap_resamples: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"clinical.target_sensitivity is a fraction in (0, 1], got {self.target_sensitivity}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"clinical.bootstrap_resamples must be >= 100 (a 95 % interval from fewer is "
                             f"mostly noise), got {self.bootstrap_resamples}")

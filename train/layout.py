"""Where every file of a run lives: one place for the run folder's layout (torch-free, config-free).

    runs/<name>/
      teachers/<teacher>/best.safetensors, last.safetensors, final.json, train.log
      student/ baseline/ ensemble/ probe/   the same per model (ensemble/combination.json,
                                             student/teacher_outputs.safetensors)
      onnx/<model>.onnx, <model>.<flavour>.onnx (+ contract sidecars), export_report.json,
           compress_report.json/.md, TensorRT engines (*.engine, also in engines/)
      summary.json/.md, fractions/, sweep/, bench/report.json/.md
      status.json (while training), stage_times.json (every stage's wall time), README.md (the verdict)

Training writes, compress and the benchmarks read: they all ask `RunLayout`, nobody rebuilds a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The ONNX files of one model: the FP32 export and the reduced-precision flavours of `make compress`.
ONNX_FLAVOURS: tuple[str, ...] = ("fp32", "fp16", "int8-cpu", "int8-tensorrt")
INT8_FLAVOURS: tuple[str, ...] = ("int8-cpu", "int8-tensorrt")
CHECKPOINT = "best.safetensors"  # the selected weights of a trained model
LAST_CHECKPOINT = "last.safetensors"  # the resume point
FINAL = "final.json"  # a finished model's test metrics (its presence means "trained")
RESOLVED_CONFIG = "config.yaml"  # the resolved experiment config, next to every trained model
BENCH_REPORT = "report"  # bench/report.json and report.md (in --out when the benchmark was sent elsewhere)


def meta_sidecar(checkpoint: str | Path) -> Path:
    """The JSON copy of a checkpoint's meta, next to it (run/last.safetensors -> run/last.json)."""
    return Path(checkpoint).with_suffix(".json")


# What each top-level entry of a run folder is: the index of the verdict (runs/<name>/README.md).
RUN_FOLDER_INDEX: dict[str, str] = {
    "README.md": "this verdict (python -m benchmarks.verdict)",
    "config.yaml": "the resolved experiment config",
    "teachers/": "one folder per teacher: best/last checkpoints, final.json (test metrics), train.log",
    "student/": "the KD student: checkpoints, final.json, cached teacher soft targets",
    "baseline/": "the labels-only baseline (same architecture as the student, no KD)",
    "ensemble/": "the teacher ensemble: final.json and its fitted combination",
    "probe/": "the linear-probe floor (frozen student backbone + logistic regression)",
    "onnx/": "ONNX exports and INT8/FP16 flavours with their contract sidecars, export and compress reports",
    "engines/": "TensorRT engines built on the device",
    "bench/": "benchmark report (report.md/.json) and plots",
    "bench-device/": "on-device latency/memory/energy report",
    "gpu-check/": "GPU path check report",
    "summary.json": "test-split headline metrics of every model (summary.md: the same as a table)",
    "summary.md": "the summary as Markdown, with per-class recall",
    "confusion_*.png": "confusion matrices of the KD student on test (linked from summary.md)",
    "status.json": "training progress while a stage runs (stage, step, ETA)",
    "stage_times.json": "wall time, start/end and exit status of every pipeline stage",
    "fractions/": "the label-fraction experiment",
    "sweep/": "the KD recipe sweep",
}


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run folder `root` (runs/<name>)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_teacher_checkpoint(cls, checkpoint: Path) -> RunLayout:
        """The run a teacher checkpoint (runs/<name>/teachers/<teacher>/best.safetensors) belongs to."""
        return cls(Path(checkpoint).parents[2])

    # --- trained models ---------------------------------------------------------------------------
    def teacher_dir(self, name: str) -> Path:
        return self.root / "teachers" / name

    def teacher_checkpoint(self, name: str) -> Path:
        return self.teacher_dir(name) / CHECKPOINT

    def teachers_dir(self) -> Path:
        return self.root / "teachers"

    def model_dir(self, role: str) -> Path:
        """student | baseline | ensemble | probe."""
        return self.root / role

    def checkpoint(self, role: str) -> Path:
        return self.model_dir(role) / CHECKPOINT

    def resolved_config(self, role: str) -> Path:
        """The config a model (student | baseline | ...) was trained with (train.stage.save_resolved)."""
        return self.model_dir(role) / RESOLVED_CONFIG

    def combination(self) -> Path:
        """The ensemble's fitted calibration/weights (train.calibrate)."""
        return self.model_dir("ensemble") / "combination.json"

    def teacher_outputs(self) -> Path:
        """The cached teacher soft targets the student distils from."""
        return self.model_dir("student") / "teacher_outputs.safetensors"

    # --- ONNX and engines -------------------------------------------------------------------------
    @property
    def onnx_dir(self) -> Path:
        return self.root / "onnx"

    def onnx(self, model: str, flavour: str = "fp32") -> Path:
        """onnx/<model>.onnx for FP32, onnx/<model>.<flavour>.onnx otherwise."""
        if flavour not in ONNX_FLAVOURS:
            raise ValueError(f"flavour must be one of {ONNX_FLAVOURS}, got {flavour!r}")
        suffix = "" if flavour == "fp32" else f".{flavour}"
        return self.onnx_dir / f"{model}{suffix}.onnx"

    def export_report(self) -> Path:
        return self.onnx_dir / "export_report.json"

    def compress_report(self, ext: str = "json") -> Path:
        return self.onnx_dir / f"compress_report.{ext}"

    def engines(self) -> list[Path]:
        """TensorRT engines built for this run (engines/ or next to the ONNX), sorted."""
        return sorted({*self.root.glob("engines/*.engine"), *self.onnx_dir.glob("*.engine")})

    # --- reports ----------------------------------------------------------------------------------
    def summary(self, ext: str = "json") -> Path:
        return self.root / f"summary.{ext}"

    @property
    def fractions_dir(self) -> Path:
        return self.root / "fractions"

    def fractions_report(self, ext: str = "json") -> Path:
        """The label-fraction table and plot (train.fractions: json, md, png)."""
        return self.fractions_dir / f"fractions.{ext}"

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    def sweep_report(self, ext: str = "json") -> Path:
        """The KD sweep's table, best first (train.sweep: json, md)."""
        return self.sweep_dir / f"sweep.{ext}"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    def bench_report(self, ext: str = "json") -> Path:
        """The benchmark report of the default bench folder (benchmarks.bench without --out), written by
        benchmarks.report.write_report."""
        return self.bench_dir / f"{BENCH_REPORT}.{ext}"

    def stage_times(self) -> Path:
        """Each pipeline stage's last wall time and exit status (train.stage_times)."""
        return self.root / "stage_times.json"

    def verdict(self) -> Path:
        """The run folder's README: the verdict of benchmarks.verdict."""
        return self.root / "README.md"

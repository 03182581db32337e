"""Latency of the configured architectures with RANDOM weights: the speed-up a user of a config's setup
would see, before (or without) training anything.

    python -m benchmarks.architectures --config configs/paper.yaml [--threads 2] [--rounds 10] [--duration 3]
    make bench-architectures CONFIG=configs/paper.yaml

Builds every teacher of the config (teachers.members, or one per non-empty task subset as in the paper)
with its model section at the teachers' image size, and the student at its image size, all with random
weights (no checkpoint and no pretrained weights are read: accuracy means nothing here, latency is the
architecture's). Shapes come from the dataset's spec and vocabulary (data.root; no image is read).
Each model is exported like compress.export (the same ONNX graph, decoder included); the student is
also quantized to the INT8 CPU flavour (compress.quantize_flavours.quantize_cpu: U8 activations, S8
per-channel weights, decoder left float) from a static calibration on random images. Everything runs in
ONNX Runtime on the CPU with the same threads, timed interleaved over rounds (benchmarks/interleave.py),
one run; the teacher ensemble's latency is the sum of its teachers' (run one after another, as the
ensemble graph does). Writes runs/<name>/bench-architectures/report.{md,json} and prints the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.interleave import interleaved_times, ratio_over_rounds, round_medians
from benchmarks.machine import describe_machine, pinned_cores, usable_cores
from deploy.errors import cli
from deploy.fileio import atomic_write_text
from deploy.markdown import table_lines, table_row
from deploy.preprocess import PreprocessSpec
from deploy.runtime import session_options
from train.config import ConfigError
from train.data.manifest import DatasetError, load_dataset
from train.experiment import (
    ExperimentConfig,
    add_config_args,
    config_overrides,
    load_experiment,
    role_preprocessing,
    teacher_specs,
)

CALIBRATION_IMAGES = 8
LABEL = "random weights: latency only, accuracy not measured"


@dataclass
class Arch:
    """One model to time: its name, role (teacher/student), backbone, input (size and normalisation:
    train.experiment.role_preprocessing) and ONNX file."""

    name: str
    role: str
    backbone: str
    spec: PreprocessSpec
    onnx: Path | None = None

    @property
    def size(self) -> int:
        return self.spec.size


def build_models(cfg: ExperimentConfig) -> list[tuple[Arch, object]]:
    """(Arch, ExportModel) for every teacher and the student, from random weights (pretrained: none)."""
    import torch

    from train.models.multitask import ExportModel
    from train.stage import build_model

    data = load_dataset(cfg.data.root, manifest=cfg.data.manifest)
    names = data.spec.task_names
    torch.manual_seed(cfg.seed)
    out = []
    for spec in teacher_specs(cfg, names):
        mcfg = dataclasses.replace(spec.model or cfg.teachers.model, tasks=list(spec.tasks), pretrained="none")
        model = build_model(mcfg, data, spec.tasks).eval()
        out.append((Arch(spec.name, "teacher", mcfg.backbone, role_preprocessing(cfg, "teachers")),
                    ExportModel(model)))
    scfg = dataclasses.replace(cfg.student.model, tasks=None, pretrained="none")
    student = build_model(scfg, data, names).eval()
    out.append((Arch("student", "student", scfg.backbone, role_preprocessing(cfg, "student")),
                ExportModel(student)))
    return out


def export_models(models: list[tuple[Arch, object]], cfg: ExperimentConfig, out_dir: Path) -> list[Arch]:
    """ONNX FP32 of every model (compress.export.export_onnx) and the student's INT8 CPU flavour."""
    from compress.export import export_onnx
    from deploy.contract import Contract

    data = load_dataset(cfg.data.root, manifest=cfg.data.manifest)
    archs = []
    for arch, module in models:
        tasks = module.model.tasks
        vocab = data.vocabulary if any(t.kind == "text" for t in tasks) else None
        contract = Contract(model_name=arch.name, model_version="random-weights", tasks=tasks,
                            preprocessing=arch.spec, vocabulary=vocab)
        arch.onnx = export_onnx(module, contract, out_dir / f"{arch.name}.onnx")
        print(f"[architectures] {arch.name}: {arch.backbone} at {arch.size} px -> {arch.onnx}", flush=True)
        archs.append(arch)
    student = next(a for a in archs if a.role == "student")
    archs.append(quantize_student(student, data, out_dir))
    return archs


def quantize_student(student: Arch, data, out_dir: Path) -> Arch:
    """The INT8 CPU flavour of the student, statically calibrated on random images (ranges of random
    inputs, not of photographs: the speed is that of the INT8 graph, its accuracy is unknown)."""
    from compress.calibration import calibrate
    from compress.quantize_flavours import quantize_cpu

    rng = np.random.default_rng(0)
    images = rng.standard_normal((CALIBRATION_IMAGES, 3, student.size, student.size)).astype(np.float32)
    ranges = calibrate(student.onnx, images, method="minmax")
    text = [t.name for t in data.spec.tasks if t.kind == "text"]
    out = quantize_cpu(student.onnx, out_dir / "student.int8-cpu.onnx", ranges,
                       exclude_patterns=[f"/heads/{t}/" for t in text])
    print(f"[architectures] student INT8 (cpu flavour, random calibration) -> {out}", flush=True)
    return Arch("student.int8-cpu", "student", student.backbone, student.spec, Path(out))


def time_models(archs: list[Arch], threads: int, rounds: int, duration_s: float, warmup: int = 3) -> dict:
    """Per model: per-round median ms at batch 1, all interleaved in one run with pinned threads and a
    fresh session each round (as `make bench`: benchmarks/interleave.py)."""
    import onnxruntime as ort

    sessions, runs, reopen = {}, {}, {}
    for arch in archs:
        open_session = functools.partial(ort.InferenceSession, str(arch.onnx), session_options(threads),
                                         providers=["CPUExecutionProvider"])
        sessions[arch.name] = open_session()
        feed = {sessions[arch.name].get_inputs()[0].name: np.zeros((1, 3, arch.size, arch.size), np.float32)}
        runs[arch.name] = lambda name=arch.name, feed=feed: sessions[name].run(None, feed)
        reopen[arch.name] = functools.partial(_renew, sessions, arch.name, open_session)
    with pinned_cores(threads):
        result = interleaved_times(runs, rounds, duration_s / rounds, warmup, reopen=reopen)
    if result.failed:
        raise RuntimeError(f"could not run {result.failed}")
    return {name: round_medians(blocks) for name, blocks in result.times.items()}


def _renew(sessions: dict, name: str, open_session) -> None:
    sessions[name] = None  # the old session is released before the new one is built
    sessions[name] = open_session()


def summarize(archs: list[Arch], rounds_ms: dict[str, list[float]]) -> dict:
    """Ensemble (sum of teachers, per round) over student FP32 and INT8, with spreads over rounds."""
    teachers = [a.name for a in archs if a.role == "teacher"]
    n_rounds = min(len(v) for v in rounds_ms.values())
    ensemble = [sum(rounds_ms[t][r] for t in teachers) for r in range(n_rounds)]
    return {
        "ensemble_ms": float(np.median(ensemble)),
        "models": {a.name: {"role": a.role, "backbone": a.backbone, "image_size": a.size,
                            "ms": float(np.median(rounds_ms[a.name])), "rounds_ms": rounds_ms[a.name]}
                   for a in archs},
        "ensemble_over_student_fp32": ratio_over_rounds(ensemble, rounds_ms["student"]),
        "ensemble_over_student_int8": ratio_over_rounds(ensemble, rounds_ms["student.int8-cpu"]),
        "student_fp32_over_int8": ratio_over_rounds(rounds_ms["student"], rounds_ms["student.int8-cpu"]),
    }


def _ratio_text(r: dict | None) -> str:
    if not r:
        return "—"
    return f"{r['median']:.1f}x (min {r['min']:.1f}x, max {r['max']:.1f}x over {r['rounds']} rounds)"


def render(report: dict) -> str:
    s, m = report["summary"], report["machine"]
    lines = [f"# Architecture latency: {report['experiment']} ({LABEL})", "",
             f"**Random weights.** No trained or pretrained weights were loaded; the INT8 student was "
             f"statically calibrated on {CALIBRATION_IMAGES} random images. These numbers are the speed of "
             "the architectures, not of trained models, and say nothing about accuracy.", "",
             f"Machine: {m.get('cpu')} ({m.get('usable_cores')} usable cores); ONNX Runtime "
             f"{m.get('onnxruntime')} CPUExecutionProvider, {report['threads']} intra-op threads (pinned), "
             f"batch 1, all graph optimisations; {report['rounds']} interleaved rounds, >= "
             f"{report['duration_s']} s per model in all. Ensemble = the sum of its teachers' times per round.",
             "", "## Ratios", "",
             f"- ensemble ({len([a for a in s['models'].values() if a['role'] == 'teacher'])} teachers, FP32) / "
             f"student INT8: {_ratio_text(s['ensemble_over_student_int8'])}",
             f"- ensemble FP32 / student FP32: {_ratio_text(s['ensemble_over_student_fp32'])}",
             f"- student FP32 / student INT8: {_ratio_text(s['student_fp32_over_int8'])}", "",
             "## Models", "",
             *table_lines(["Model", "Role", "Backbone", "Input (px)", "ms (batch 1, median of rounds)"],
                          ([name, v["role"], v["backbone"], v["image_size"], f"{v['ms']:.2f}"]
                           for name, v in s["models"].items()))]
    lines += [table_row(["ensemble (sum)", "teachers", "", "", f"{s['ensemble_ms']:.2f}"]), ""]
    return "\n".join(lines)


def run(cfg: ExperimentConfig, threads: int, rounds: int, duration_s: float, out_dir: Path) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory(prefix="architectures-") as tmp:
        archs = export_models(build_models(cfg), cfg, Path(tmp))
        rounds_ms = time_models(archs, threads, rounds, duration_s)
    report = {"experiment": cfg.name, "label": LABEL, "threads": threads, "rounds": rounds,
              "duration_s": duration_s, "calibration": f"static minmax on {CALIBRATION_IMAGES} random images",
              "machine": describe_machine(threads), "summary": summarize(archs, rounds_ms)}
    md = render(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write_text(out_dir / "report.md", md)
    return report, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.architectures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: every usable core)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (10)")
    parser.add_argument("--duration", type=float, default=3.0, help="minimum timed seconds per model, all rounds (3)")
    parser.add_argument("--out", type=Path, help="report folder (default runs/<name>/bench-architectures)")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.config, config_overrides(args))
        if args.rounds < 1 or args.duration <= 0 or (args.threads is not None and args.threads < 1):
            raise ConfigError("--rounds and --threads must be >= 1 and --duration > 0")
        out_dir = args.out or cfg.run_dir / "bench-architectures"
        _, md = run(cfg, args.threads or usable_cores(), args.rounds, args.duration, out_dir)
    except (ConfigError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md, flush=True)
    print(f"[architectures] wrote {out_dir / 'report.md'} and report.json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

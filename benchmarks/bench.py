"""Benchmark every artifact of a run: accuracy on the test split, agreement with the teacher ensemble,
size, parameters, MACs, latency (batch 1 and larger), per-stage times and peak memory.

    python -m benchmarks.bench --config configs/default.yaml [key=value ...] \\
        [--min-metric student.int8-cpu:coarse/accuracy=80 ...] [--threads 2] [--duration 2.0] \\
        [--batch 1 8] [--only 'student.*'] [--memory deploy|all|off] [--publish benchmarks/results]

Writes runs/<name>/bench/report.{md,json} + PNG plots (atomically) and prints the report. Each artifact
gets a status: passed; below floor (it ran but missed an accuracy floor); failed (the reason, e.g. a
corrupt file; the others still run); skipped (missing, or needs hardware/software not here).
Exit code: 0 all good, 1 a floor missed, an artifact failed or nothing could be measured, 2 bad config
or dataset.
Settings live in the config's `bench:` section (BenchConfig); the options above override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import accuracy as acc
from benchmarks import latency as lat
from benchmarks.artifacts import Artifact, discover, onnx_graph_stats, open_artifact, size_mb
from benchmarks.machine import PowerMeter, describe_machine, device_slug, probe_memory, usable_cores
from benchmarks.report import RAN, build_report, write_report
from deploy.errors import cli
from deploy.fileio import atomic_write_text
from train.config import ConfigError, from_dict
from train.data.manifest import DatasetError
from train.experiment import (
    BenchConfig,
    ExperimentConfig,
    add_config_args,
    config_overrides,
    load_experiment,
    teacher_specs,
)
from train.fit_check import check_tasks, vocabulary_sha256
from train.stage import load_splits
from train.teachers import teacher_dir

REFERENCES = ("ensemble.pytorch", "ensemble.fp32")  # agreement/retention are measured against the first that runs


def bench_config(cfg: ExperimentConfig) -> BenchConfig:
    return cfg.bench


@dataclass
class Context:
    """What every artifact's benchmark shares."""

    bench: BenchConfig
    test: acc.TestImages
    floors: list[acc.Floor]
    threads: int
    device: str
    power: PowerMeter
    preprocess_ms: dict = field(default_factory=dict)  # PreprocessSpec -> ms per image
    graph_stats: dict = field(default_factory=dict)  # ONNX path -> onnx_graph_stats


def _stats(ctx: Context, path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    if path not in ctx.graph_stats:
        ctx.graph_stats[path] = onnx_graph_stats(path)
    return ctx.graph_stats[path]


def _measure(ctx: Context, art: Artifact, record: dict) -> dict[str, np.ndarray]:
    """Fill `record` with the artifact's numbers; returns its test outputs. Raises when it cannot run."""
    b = ctx.bench
    runner = open_artifact(art, ctx.test.tasks, ctx.test.vocab, ctx.threads, b.providers, ctx.device)
    try:
        check_tasks(art.paths[0], runner.tasks, ctx.test.splits.data, vocabulary_sha256(runner.vocab))
        outputs = acc.predict_all(runner.run, ctx.test.batches(runner.spec, b.eval_batch_size))
        full = acc.score(outputs, ctx.test, runner.spec, runner.tasks)
        record["metrics"] = acc.summarize(full, runner.tasks)
        first = next((t for t in runner.tasks if t.kind == "classification"), None)
        if first and first.name in full:
            record["confusion"] = {"task": first.name, "classes": list(first.classes),
                                   "matrix": full[first.name]["confusion_matrix"]}
        record["latency"] = {}
        for n in b.batch_sizes:
            batch = ctx.test.head(runner.spec, n)
            stats = lat.measure(lambda batch=batch: runner.run(batch), n, b.warmup,
                                b.duration_s if n == 1 else b.batch_duration_s, b.min_runs, sync=runner.sync)
            record["latency"][str(n)] = stats.to_dict()
            if n == 1:
                record["power"] = ctx.power.read()
        if runner.spec not in ctx.preprocess_ms:
            ctx.preprocess_ms[runner.spec] = lat.time_preprocess(ctx.test.paths(), runner.spec, b.stage_images)
        record["stages_ms"] = {"preprocess": ctx.preprocess_ms[runner.spec],
                               "inference": record["latency"]["1"]["per_image_ms"],
                               "postprocess": lat.time_postprocess(outputs, runner.tasks, runner.vocab or ctx.test.vocab)}
        record["runtime"] = runner.info
        record["image_size"] = runner.spec.size
        graph = _stats(ctx, art.paths[0] if art.format == "onnx" else art.onnx_fp32)
        record["params"] = runner.params if runner.params is not None else graph.get("params")
        record["macs"] = graph.get("macs")
    finally:
        runner.close()
    if b.memory == "all" or (b.memory == "deploy" and art.format != "pytorch"):
        record["memory"] = probe_memory(art, ctx.test.tasks, ctx.threads, max(b.batch_sizes), b.providers, ctx.device)
    return outputs


def bench_artifact(ctx: Context, art: Artifact) -> tuple[dict, dict[str, np.ndarray] | None]:
    """(record, test outputs or None). A failure is recorded with its reason, never raised."""
    record = {"name": art.name, "model": art.model, "role": art.role, "format": art.format,
              "precision": art.precision, "paths": [str(p) for p in art.paths], "status": "skipped",
              "reason": art.skip, "size_mb": size_mb(art.paths) if art.paths and not art.skip else None,
              "metrics": {}, "latency": {}}
    if art.skip:
        return record, None
    print(f"[bench] {art.name} ...", flush=True)
    try:
        outputs = _measure(ctx, art, record)
    # One bad artifact (corrupt file, wrong contract, runtime error) must not stop the others.
    except Exception as exc:
        record.update(status="failed", reason=f"failed: {type(exc).__name__}: {str(exc).strip()[:400]}")
        print(f"[bench] {art.name}: {record['reason']}", file=sys.stderr, flush=True)
        return record, None
    missed = acc.floor_violations(ctx.floors, art.name, record["metrics"])
    record.update(status="below floor" if missed else "passed", reason="; ".join(missed) or None)
    return record, outputs


def _reference(ctx: Context, arts: list[Artifact], outputs: dict[str, dict]) -> tuple[str | None, dict | None]:
    """The teacher ensemble's test outputs: from this run's records, else evaluated now (eval only)."""
    for name in REFERENCES:
        if name in outputs:
            return name, outputs[name]
    for art in arts:
        if art.name in REFERENCES and not art.skip:
            try:
                runner = open_artifact(art, ctx.test.tasks, ctx.test.vocab, ctx.threads, ctx.bench.providers, ctx.device)
                try:
                    return art.name, acc.predict_all(runner.run, ctx.test.batches(runner.spec, ctx.bench.eval_batch_size))
                finally:
                    runner.close()
            except Exception as exc:  # the reference is optional: agreement columns stay empty
                print(f"[bench] reference {art.name} unavailable: {exc}", file=sys.stderr)
    return None, None


def run_bench(cfg: ExperimentConfig, bench: BenchConfig, out_dir: Path | None = None) -> tuple[dict, str]:
    """Benchmark the run's artifacts; returns (report dict, Markdown). Raises ConfigError/DatasetError."""
    splits = load_splits(cfg)
    test = acc.TestImages(splits, bench.max_test_images, seed=cfg.seed)
    floors = [acc.parse_floor(f) for f in bench.floors]
    teachers = {s.name: teacher_dir(cfg, s.name) / "best.safetensors"
                for s in teacher_specs(cfg, splits.data.spec.task_names)}
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    ort_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    arts = discover(cfg.run_dir, teachers, cuda, ort_gpu, importlib.util.find_spec("tensorrt") is not None)
    chosen = [a for a in arts if not bench.only or any(fnmatch.fnmatchcase(a.name, p) for p in bench.only)]
    threads = bench.threads or usable_cores()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    records, outputs = [], {}
    with PowerMeter() as power:
        ctx = Context(bench, test, floors, threads, device, power)
        for art in chosen:
            record, out = bench_artifact(ctx, art)
            records.append(record)
            if out is not None:
                outputs[art.name] = out
        ref_name, ref = _reference(ctx, arts, outputs)
    ref_metrics = next((r["metrics"] for r in records if r["name"] == ref_name and r["status"] in RAN), None)
    for record in records:
        if ref is not None and record["name"] in outputs:
            record["agreement"] = acc.compare(outputs[record["name"]], ref, test.tasks, test.vocab)
        if ref_metrics and record["status"] in RAN:
            record["retention"] = acc.retention(record["metrics"], ref_metrics)
    measured = [r["name"] for r in records if r["status"] in RAN]
    unmatched = [str(f) for f in acc.unmatched_floors(floors, measured)]
    machine = describe_machine(threads, bench.providers)
    settings = {**dataclasses.asdict(bench), "threads": threads, "images": len(test),
                "test_split_images": len(splits.test), "sample_seed": cfg.seed, "device": device}
    report = build_report(cfg.name, records, test.tasks, machine, settings, ref_name, unmatched)
    fractions = cfg.run_dir / "fractions" / "fractions.png"
    md = write_report(report, out_dir or cfg.run_dir / "bench", fractions)
    return report, md


def publish(report: dict, out_dir: Path, results_root: Path) -> Path:
    """Copy the report and plots to results_root/<device>/<date>/ with machine.json (see JETSON.md)."""
    dest = results_root / device_slug(report["machine"]) / report["machine"]["date"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["report.md", "report.json", *report["plots"]]:
        shutil.copyfile(out_dir / name, dest / name)
    atomic_write_text(dest / "machine.json", json.dumps(report["machine"], indent=1))
    return dest


def exit_code(report: dict) -> int:
    """1 when a floor was missed or matched nothing, an artifact failed, or nothing could be measured."""
    bad = [r for r in report["artifacts"] if r["status"] in ("failed", "below floor")]
    ran = [r for r in report["artifacts"] if r["status"] in RAN]
    if not ran:
        print("error: no artifact could be measured (see the notes above); train and export first: "
              "make teachers student export compress", file=sys.stderr)
    return 1 if bad or not ran or report["unmatched_floors"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--min-metric", action="append", default=[], metavar="ARTIFACT:METRIC=VALUE",
                        help="floor in the report's units (repeatable): accuracies in percent, BLEU 0-100, ECE 0-1; "
                             "ARTIFACT may be a glob, e.g. 'student.*:coarse/accuracy=80'")
    parser.add_argument("--threads", type=int, help="intra-op threads for onnxruntime and torch")
    parser.add_argument("--duration", type=float, help="minimum timed seconds at batch 1")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes to time (must include 1)")
    parser.add_argument("--only", action="append", metavar="PATTERN", help="benchmark matching artifacts only")
    parser.add_argument("--memory", choices=("deploy", "all", "off"),
                        help="peak memory per artifact: ONNX/TensorRT only (default), also PyTorch, or none")
    parser.add_argument("--out", type=Path, help="report folder (default runs/<name>/bench)")
    parser.add_argument("--publish", type=Path, metavar="DIR",
                        help="also copy the report to DIR/<device>/<date>/ (e.g. benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_experiment(args.config, config_overrides(args))
        bench = bench_config(cfg)
        changes = {"threads": args.threads, "duration_s": args.duration, "batch_sizes": args.batch,
                   "only": args.only, "floors": [*bench.floors, *args.min_metric] if args.min_metric else None,
                   "memory": args.memory}
        bench = from_dict(BenchConfig, {**dataclasses.asdict(bench),
                                        **{k: v for k, v in changes.items() if v is not None}}, where="bench")
        out_dir = args.out or cfg.run_dir / "bench"
        report, md = run_bench(cfg, bench, out_dir)
    except (ConfigError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md, flush=True)
    print(f"[bench] wrote {out_dir / 'report.md'} and report.json", flush=True)
    if args.publish:
        print(f"[bench] published to {publish(report, out_dir, args.publish)}", flush=True)
    return exit_code(report)


if __name__ == "__main__":
    raise SystemExit(cli(main))

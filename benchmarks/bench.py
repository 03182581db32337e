"""Benchmark every artifact of a run: accuracy on the test split, agreement with the teacher ensemble,
size, parameters, MACs, latency (batch 1 and larger), per-stage times and peak memory.
Latency is timed interleaved (every artifact in turn, over `bench.rounds` rounds, threads pinned), so
each headline ratio comes with its spread across rounds; ONNX artifacts with a text decoder also get
encoder vs decoder milliseconds (their encoder-only sub-model timed in the same rounds).

    python -m benchmarks.bench --config configs/default.yaml [key=value ...] \\
        [--min-metric student.int8-cpu:coarse/accuracy=80 ...] [--threads 2] [--duration 2.0] [--rounds 10] \\
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
from benchmarks.artifacts import Artifact, Runner, discover, onnx_graph_stats, open_artifact, size_mb
from benchmarks.encoder_only import encoder_decoder_ms, open_encoder_only
from benchmarks.interleave import interleaved_times, round_medians
from benchmarks.machine import (
    PowerMeter,
    describe_machine,
    device_slug,
    pinned_core_list,
    pinned_cores,
    probe_memory,
    usable_cores,
)
from benchmarks.report import RAN, build_report, write_report
from deploy.fileio import atomic_write_text
from train.bootstrap import DEFAULT_RESAMPLES
from train.config import ConfigError, from_dict
from train.data.manifest import DatasetError
from train.evaluate import headline_intervals
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
from train.stage_times import run_stage
from train.summary import summary_columns

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
    resamples: int = DEFAULT_RESAMPLES  # patient bootstrap behind each accuracy's 95 % interval
    seed: int = 0
    preprocess_ms: dict = field(default_factory=dict)  # PreprocessSpec -> ms per image
    graph_stats: dict = field(default_factory=dict)  # ONNX path -> onnx_graph_stats


def _stats(ctx: Context, path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    if path not in ctx.graph_stats:
        ctx.graph_stats[path] = onnx_graph_stats(path)
    return ctx.graph_stats[path]


def _measure(ctx: Context, art: Artifact, record: dict) -> tuple[dict[str, np.ndarray], Runner]:
    """Fill `record` with the artifact's accuracy, stage times and graph numbers; returns its test outputs
    and the open runner (timed later, interleaved with the others). Raises when it cannot run."""
    b = ctx.bench
    runner = open_artifact(art, ctx.test.tasks, ctx.test.vocab, ctx.threads, b.providers, ctx.device)
    try:
        check_tasks(art.paths[0], runner.tasks, ctx.test.splits.data, vocabulary_sha256(runner.vocab))
        outputs = acc.predict_all(runner.run, ctx.test.batches(runner.spec, b.eval_batch_size))
        full = acc.score(outputs, ctx.test, runner.spec, runner.tasks)
        record["metrics"] = acc.summarize(full, runner.tasks)
        data = ctx.test.data(runner.spec)
        columns = [k for k, _ in summary_columns(runner.tasks, data.dataset.spec.joint)]
        record["ci95"] = headline_intervals(outputs, data, runner.tasks, columns, ctx.resamples, ctx.seed)
        first = next((t for t in runner.tasks if t.kind == "classification"), None)
        if first and first.name in full:
            record["confusion"] = {"task": first.name, "classes": list(first.classes),
                                   "matrix": full[first.name]["confusion_matrix"]}
        if runner.spec not in ctx.preprocess_ms:
            ctx.preprocess_ms[runner.spec] = lat.time_preprocess(ctx.test.paths(), runner.spec, b.stage_images)
        record["stages_ms"] = {"preprocess": ctx.preprocess_ms[runner.spec], "inference": None,
                               "postprocess": lat.time_postprocess(outputs, runner.tasks, runner.vocab or ctx.test.vocab)}
        record["runtime"] = runner.info
        record["image_size"] = runner.spec.size
        graph = _stats(ctx, art.paths[0] if art.format == "onnx" else art.onnx_fp32)
        record["params"] = runner.params if runner.params is not None else graph.get("params")
        record["macs"] = graph.get("macs")
        if b.memory == "all" or (b.memory == "deploy" and art.format != "pytorch"):
            record["memory"] = probe_memory(art, ctx.test.tasks, ctx.threads, max(b.batch_sizes), b.providers,
                                            ctx.device)
    except BaseException:
        runner.close()
        raise
    return outputs, runner


def bench_artifact(ctx: Context, art: Artifact) -> tuple[dict, dict[str, np.ndarray] | None, Runner | None]:
    """(record, test outputs or None, open runner or None). A failure is recorded with its reason, never
    raised."""
    record = {"name": art.name, "model": art.model, "role": art.role, "format": art.format,
              "precision": art.precision, "paths": [str(p) for p in art.paths], "status": "skipped",
              "reason": art.skip, "size_mb": size_mb(art.paths) if art.paths and not art.skip else None,
              "metrics": {}, "latency": {}}
    if art.skip:
        return record, None, None
    print(f"[bench] {art.name} ...", flush=True)
    try:
        outputs, runner = _measure(ctx, art, record)
    # One bad artifact (corrupt file, wrong contract, runtime error) must not stop the others.
    except Exception as exc:
        _fail(record, exc)
        return record, None, None
    missed = acc.floor_violations(ctx.floors, art.name, record["metrics"])
    record.update(status="below floor" if missed else "passed", reason="; ".join(missed) or None)
    return record, outputs, runner


def _fail(record: dict, exc: Exception | str) -> None:
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    record.update(status="failed", reason=f"failed: {reason}")
    print(f"[bench] {record['name']}: {record['reason']}", file=sys.stderr, flush=True)


ENCODER_ONLY = " [encoder only]"  # suffix of an artifact's encoder-only entry in the interleaved rounds


def time_interleaved(ctx: Context, timed: list[tuple[dict, Runner, Artifact]]) -> None:
    """Latency of every artifact that ran, at each batch size, interleaved over `bench.rounds` rounds
    (benchmarks/interleave.py) with the threads pinned; at batch 1 also each ONNX artifact's encoder-only
    sub-model, for its encoder vs decoder milliseconds. Fills record["latency"] (with per-round medians)
    and record["encoder_decoder_ms"]; a record whose runner fails here is marked failed."""
    b = ctx.bench
    encoders = {}
    try:
        for record, _, art in timed:
            if art.format == "onnx":
                try:
                    enc = open_encoder_only(art.paths[0], ctx.threads, b.providers)
                except Exception as exc:  # the split is extra detail; the artifact itself still gets timed
                    print(f"[bench] {art.name}: no encoder-only timing ({type(exc).__name__}: {exc})", file=sys.stderr)
                    enc = None
                if enc is not None:
                    encoders[record["name"]] = enc
        with pinned_cores(ctx.threads):
            for n in b.batch_sizes:
                _time_batch(ctx, timed, encoders if n == 1 else {}, n)
    finally:
        for enc in encoders.values():
            enc.close()


def _time_batch(ctx: Context, timed: list[tuple[dict, Runner, Artifact]], encoders: dict, n: int) -> None:
    b = ctx.bench
    live = [(record, runner) for record, runner, _ in timed if record["status"] != "failed"]
    runs, syncs, reopen = {}, {}, {}
    for record, runner in live:
        batch = ctx.test.head(runner.spec, n)
        runs[record["name"]] = lambda runner=runner, batch=batch: runner.run(batch)
        syncs[record["name"]] = runner.sync
        if runner.can_reopen:  # a fresh session each round (benchmarks/interleave.py)
            reopen[record["name"]] = runner.reopen
        if record["name"] in encoders:
            enc = encoders[record["name"]]
            runs[record["name"] + ENCODER_ONLY] = lambda enc=enc, batch=batch: enc.run(batch)
            reopen[record["name"] + ENCODER_ONLY] = enc.reopen
    power = {}

    def read_power(name: str, round_index: int) -> None:
        if n == 1 and round_index == b.rounds - 1 and name in syncs:
            power[name] = ctx.power.read()

    duration = b.duration_s if n == 1 else b.batch_duration_s
    result = interleaved_times(runs, b.rounds, duration / b.rounds, b.warmup, -(-b.min_runs // b.rounds),
                               syncs, after_block=read_power, reopen=reopen)
    for record, _ in live:
        name = record["name"]
        if name in result.failed:
            _fail(record, result.failed[name])
            continue
        stats = lat.summarize(result.flat(name), n).to_dict()
        stats["rounds_ms"] = round_medians(result.times[name], n)
        record["latency"][str(n)] = stats
        if n == 1:
            record["power"] = power.get(name)
            record["stages_ms"]["inference"] = stats["per_image_ms"]
            if name + ENCODER_ONLY in result.times:
                record["encoder_decoder_ms"] = encoder_decoder_ms(
                    stats["rounds_ms"], round_medians(result.times[name + ENCODER_ONLY]))


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
    teachers = {s.name: cfg.layout.teacher_checkpoint(s.name)
                for s in teacher_specs(cfg, splits.data.spec.task_names)}
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    ort_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    arts = discover(cfg.run_dir, teachers, cuda, ort_gpu, importlib.util.find_spec("tensorrt") is not None)
    chosen = [a for a in arts if not bench.only or any(fnmatch.fnmatchcase(a.name, p) for p in bench.only)]
    threads = bench.threads or usable_cores()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    records, outputs, timed = [], {}, []
    with PowerMeter() as power:
        ctx = Context(bench, test, floors, threads, device, power, cfg.clinical.bootstrap_resamples, cfg.seed)
        try:
            for art in chosen:
                record, out, runner = bench_artifact(ctx, art)
                records.append(record)
                if runner is not None:
                    outputs[art.name] = out
                    timed.append((record, runner, art))
            time_interleaved(ctx, timed)
        finally:
            for _, runner, _ in timed:
                runner.close()
        outputs = {name: out for name, out in outputs.items() if _record(records, name)["status"] != "failed"}
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
    settings = {**dataclasses.asdict(bench), "threads": threads, "pinned_cores": pinned_core_list(threads),
                "images": len(test),
                "test_split_images": len(splits.test), "sample_seed": cfg.seed, "device": device}
    report = build_report(cfg.name, records, test.tasks, machine, settings, ref_name, unmatched)
    fractions = cfg.layout.fractions_report("png")
    md = write_report(report, out_dir or cfg.layout.bench_dir, fractions)
    return report, md


def _record(records: list[dict], name: str) -> dict:
    return next(r for r in records if r["name"] == name)


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
    parser.add_argument("--duration", type=float, help="minimum timed seconds at batch 1 (all rounds together)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (each ratio's spread is over them)")
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
        changes = {"threads": args.threads, "duration_s": args.duration, "rounds": args.rounds,
                   "batch_sizes": args.batch,
                   "only": args.only, "floors": [*bench.floors, *args.min_metric] if args.min_metric else None,
                   "memory": args.memory}
        bench = from_dict(BenchConfig, {**dataclasses.asdict(bench),
                                        **{k: v for k, v in changes.items() if v is not None}}, where="bench")
        out_dir = args.out or cfg.layout.bench_dir
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
    raise SystemExit(run_stage(main, "bench"))

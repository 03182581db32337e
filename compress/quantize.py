"""INT8 (ONNX Runtime CPU and TensorRT flavours) and FP16 models of the student and the baseline.

    python -m compress.quantize --config configs/default.yaml [compress.calibration_method=entropy]

Per model: calibration on real training images (labelled and unlabelled pool, seeded order), run once
per method and reused by both INT8 flavours; each INT8 model goes through the accuracy guard
(compress/guard.py) on the validation split; the TensorRT flavour also passes the static TensorRT op
and Q/DQ check. Outputs next to the FP32 model: <model>.int8-cpu.onnx, <model>.int8-tensorrt.onnx,
<model>.fp16.onnx, each with its contract sidecar, and onnx/compress_report.{json,md}. The rest of the
models and flavours are still processed when one fails; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from compress.guard import Guard, GuardFailed, format_drops, metric_drops
from compress.modelopt_quantizer import modelopt_quantize_fn
from compress.onnx_eval import evaluate_onnx
from compress.quantize_flavours import convert_fp16, qdq_summary, quantize_tensorrt
from compress.settings import CompressConfig, compress_config
from compress.trt_check import check_model, check_qdq_for_tensorrt
from deploy.contract import Contract, read_sidecar, sidecar_path, write_metadata, write_sidecar
from deploy.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, MissingInput, UserError
from deploy.fileio import atomic_write, atomic_write_text, sha256_file
from deploy.markdown import escape_cell, table_head, table_row
from train.datasets import FundusImages
from train.experiment import add_config_args, config_overrides, load_experiment
from train.fit_check import check_tasks, vocabulary_sha256
from train.layout import INT8_FLAVOURS
from train.stage import Splits, image_set, load_splits
from train.stage_times import run_stage


def calibration_source(splits: Splits, contract: Contract, seed: int):
    """n -> [n, 3, S, S] float32: the first n training images (labelled + unlabelled) in a seeded order."""
    rows = splits.train + splits.unlabeled
    random.Random(seed).shuffle(rows)
    data = FundusImages(splits.data, rows, [], contract.preprocessing)
    cache: list[np.ndarray] = []

    def images(n: int) -> np.ndarray:
        while len(cache) < min(n, len(rows)):
            cache.append(data[len(cache)]["image"].numpy())
        return np.stack(cache[:n])

    return images, len(rows)


def embed_contract(candidate: Path, contract: Contract) -> None:
    """Write the contract into a candidate file's metadata (in place: it is moved into place later)."""
    model = onnx.load(str(candidate))
    write_metadata(model, contract)
    onnx.save(model, str(candidate))


def quantize_model(name: str, cfg, ccfg: CompressConfig, splits: Splits) -> dict:
    fp32 = cfg.layout.onnx(name)
    if not fp32.exists():
        raise MissingInput(f"{fp32}: missing; run `make export` first")
    contract = read_sidecar(fp32)
    tasks = contract.tasks
    check_tasks(fp32, tasks, splits.data, vocabulary_sha256(contract.vocabulary))  # not a stale export
    val = image_set(splits, splits.val, tasks, contract.preprocessing)
    images, available = calibration_source(splits, contract, cfg.seed)
    text = [t.name for t in tasks if t.kind == "text"]
    # The decoder (argmax feedback over max_len steps) and Softmax stay float: tiny cost, big accuracy risk.
    patterns = [f"/heads/{t}/" for t in text]
    report: dict = {"fp32": str(fp32), "fp32_size_mb": fp32.stat().st_size / 1e6, "flavours": {}}
    ranges: dict = {}  # one calibration per (method, images), shared by both flavours
    reference = evaluate_onnx(fp32, val, tasks, ccfg.threads)
    for flavour in INT8_FLAVOURS:
        out = cfg.layout.onnx(name, flavour)
        t0 = time.perf_counter()
        guard = Guard(fp32, flavour, val, tasks, images, ccfg, patterns, ranges, reference,
                      cfg.clinical.bootstrap_resamples, cfg.seed)
        entry: dict = {"path": str(out)}

        stamped: dict[str, Contract] = {}

        def finalize(candidate: Path, kept, flavour=flavour, stamped=stamped) -> None:  # before the move
            stamped["contract"] = contract.derive(
                precision=flavour,
                calibration={"method": kept.method, "images": kept.images, "float_layers": kept.float_layers},
                fp32_sha256=sha256_file(fp32))
            embed_contract(candidate, stamped["contract"])

        try:
            kept = guard.run(out, available, finalize)
            write_sidecar(out, stamped["contract"])
            entry.update(status="passed", kept=kept.to_dict(), summary=qdq_summary(out))
            if flavour == "int8-tensorrt" and ccfg.tensorrt_quantizer == "modelopt":
                entry["ours"] = placement_comparison(guard, kept)
            if flavour == "int8-tensorrt":
                violations = check_model(out) + check_qdq_for_tensorrt(out)
                entry["tensorrt_check"] = [f"{v.severity}: {v.node} {v.op}: {v.message}" for v in violations]
                if any(v.severity == "error" for v in violations):
                    entry["status"] = "failed: TensorRT static check"
        except GuardFailed as exc:
            entry.update(status="failed: accuracy guard", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one flavour's failure must not stop the others
            entry.update(status=f"failed: {type(exc).__name__}", error=str(exc))
        if entry["status"] != "passed":  # never leave a model that did not pass where devices look
            for stale in (out, sidecar_path(out)):
                stale.unlink(missing_ok=True)
        entry["attempts"] = [a.to_dict() for a in guard.attempts]
        entry["limits"] = guard.limits  # the allowed drop per metric (a drop within noise may pass up to the cap)
        entry["noise_caps"] = guard.noise_caps  # per metric; readers re-judge drops with compress.drops.within
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        if out.exists():
            entry["size_mb"] = out.stat().st_size / 1e6
        report["flavours"][flavour] = entry
        print(f"[compress] {name} {flavour}: {entry['status']} ({entry['seconds']}s)", flush=True)
    report["flavours"]["fp16"] = _fp16(fp32, cfg.layout.onnx(name, "fp16"), contract, val, tasks,
                                       reference[1], ccfg)
    return report


def placement_comparison(guard: Guard, kept) -> dict:
    """Our placement with the same calibration and float layers as ModelOpt's kept attempt: its Q/DQ
    counts and drops, so the report shows what ModelOpt's own placement changed."""
    with tempfile.TemporaryDirectory(prefix="ours.") as tmp:
        ours = quantize_tensorrt(guard.fp32_path, Path(tmp) / "ours.onnx", guard.ranges_for(kept.method, kept.images),
                                 nodes_to_exclude=kept.float_layers, exclude_patterns=guard.patterns)
        _, metrics = evaluate_onnx(ours, guard.val, guard.tasks, guard.cfg.threads)
        summary = qdq_summary(ours)
    return {"drops": metric_drops(guard.fp32_metrics, metrics, guard.tasks), "summary": summary}


def _fp16(fp32: Path, out: Path, contract: Contract, val: FundusImages, tasks, fp32_metrics: dict,
          ccfg: CompressConfig) -> dict:
    c16 = contract.derive(precision="fp16", fp32_sha256=sha256_file(fp32))

    def write(tmp: Path) -> None:
        convert_fp16(fp32, tmp)
        embed_contract(tmp, c16)

    atomic_write(out, write)
    write_sidecar(out, c16)
    _, metrics = evaluate_onnx(out, val, tasks, ccfg.threads)
    drops = metric_drops(fp32_metrics, metrics, tasks)
    print(f"[compress] {fp32.stem} fp16 vs FP32: {format_drops(drops)} (CPU run; FP16 is meant for GPUs)", flush=True)
    return {"path": str(out), "status": "passed", "drops": drops, "size_mb": out.stat().st_size / 1e6}


def markdown(reports: dict) -> str:
    lines = ["# INT8 / FP16 accuracy report (validation split, change vs FP32 in points)", "",
             "Each drop is shown with its limit. A drop over its limit also shows the paired patient-bootstrap "
             "95 % interval of the drop; it passes when that interval includes 0 (within noise: the validation "
             "split cannot tell it from no drop) and it is at most `compress.guard.noise_cap_points`, or `noise_cap_images` validation images' worth where that is more.", "",
             *table_head(["model", "flavour", "status", "size MB", "vs FP32", "calibration", "float layers",
                          "attempts"])]
    for name, rep in reports.items():
        if "error" in rep:
            lines.append(table_row([name, "—", f"failed: {rep['error']}", "", "", "", "", ""]))
            continue
        for flavour, e in rep["flavours"].items():
            kept = e.get("kept", {})
            drops = kept.get("drops", e.get("drops", {}))
            calib = f"{kept['method']}, {kept['images']} img" if kept else "—"
            crashed = sum(1 for a in e.get("attempts", []) if "error" in a.get("agreement", {}))
            status = e["status"] + (f" ({crashed} attempt(s) crashed, see below)" if crashed else "")
            lines.append(table_row([name, flavour, status, f"{e.get('size_mb', 0):.2f}",
                                    format_drops(drops, e.get("limits"), kept.get("intervals")), calib,
                                    len(kept.get("float_layers", [])), len(e.get("attempts", []))]))
    return "\n".join(lines) + "\n" + _placements(reports) + _failed_attempts(reports)


def _placements(reports: dict) -> str:
    """ModelOpt's int8-tensorrt placement next to ours (only when compress.tensorrt_quantizer=modelopt)."""
    lines = []
    for name, rep in reports.items():
        e = rep.get("flavours", {}).get("int8-tensorrt", {})
        if "ours" in e:
            theirs, ours = e["summary"], e["ours"]["summary"]
            lines.append(f"- {name}: ModelOpt {theirs['quantize_linear']} Q / {theirs['dequantize_linear']} DQ, "
                         f"{format_drops(e['kept']['drops'])}; ours {ours['quantize_linear']} Q / "
                         f"{ours['dequantize_linear']} DQ, {format_drops(e['ours']['drops'])}")
    if not lines:
        return ""
    return "\n## int8-tensorrt: ModelOpt's placement vs ours (same calibration)\n\n" + "\n".join(lines) + "\n"


def _failed_attempts(reports: dict) -> str:
    """Every attempt that did not pass, with its error or drops: a fallback must never hide a crash."""
    lines = []
    for name, rep in reports.items():
        for flavour, e in rep.get("flavours", {}).items():
            for a in e.get("attempts", []):
                if a.get("passed"):
                    continue
                error = a.get("agreement", {}).get("error")
                outcome = f"**crashed**: {escape_cell(error)}" if error else f"over the limit: {format_drops(a.get('drops') or {}, None, a.get('intervals'))}"
                lines.append(f"- {name} {flavour}, {a['step']} ({a['method']}, {a['images']} images, "
                             f"{len(a.get('float_layers', []))} float layers): {outcome}")
            if e.get("error"):
                lines.append(f"- {name} {flavour}: {escape_cell(e['error'])}")
    if not lines:
        return ""
    return "\n## Attempts that did not pass\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--quantizer", choices=["ort", "modelopt"], default=None,
                        help="who places Q/DQ in the int8-tensorrt flavour (compress.tensorrt_quantizer)")
    args = parser.parse_args(argv)
    overrides = config_overrides(args)
    if args.quantizer:
        overrides.append(f"compress.tensorrt_quantizer={args.quantizer}")
    cfg = load_experiment(args.config, overrides)  # config/data errors: exit 2 (CLI boundary)
    ccfg = compress_config(cfg)
    if ccfg.tensorrt_quantizer == "modelopt":
        modelopt_quantize_fn()  # not installed: one line and exit 2 before any work
    splits = load_splits(cfg)
    reports, failed, user_error = {}, False, False
    for name in ccfg.quantize:
        try:
            reports[name] = quantize_model(name, cfg, ccfg, splits)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:  # one model's problem: do the others
            reports[name] = {"error": str(exc)}
            user_error |= isinstance(exc, UserError)
            print(f"error: {name}: {exc}", file=sys.stderr)
        rep = reports[name]
        failed |= "error" in rep or any(e["status"] != "passed" for e in rep.get("flavours", {}).values())
    atomic_write_text(cfg.layout.compress_report("json"), json.dumps(reports, indent=1, default=str))
    atomic_write_text(cfg.layout.compress_report("md"), markdown(reports))
    print(markdown(reports))
    return EXIT_USAGE if user_error else EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "compress"))

"""On-device benchmark of deployable models: latency, GPU memory and energy per image, torch-free.

    python -m benchmarks.device_bench student.int8-tensorrt.trt.engine student.fp16.trt.engine \\
        --images photos/*.jpg --out bench-device/            # make bench-device on the board

For each model (an engine or an ONNX): open it with the deploy runtime, time batch-1 calls (warm-up,
then >= 1 s; benchmarks.latency), read GPU memory as a mem_get_info delta (the TensorRT backend records
it at load; host RSS does not see it), and where jtop (jetson-stats) is importable, read board power
during the timed runs: energy per image = mean power x batch-1 time per image. Without jtop the energy
column says why it is empty. Writes device_bench.json and device_bench.md to --out.
Run `sudo jetson_clocks` (and pick an nvpmodel mode) first; machine facts are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.latency import measure
from benchmarks.machine import PowerMeter, describe_machine
from deploy.errors import UserError, cli
from deploy.fileio import atomic_write_text
from deploy.markdown import table_head, table_row
from deploy.predictor import Predictor
from deploy.preprocess import preprocess_file

NO_JTOP = "no jtop: install jetson-stats on a Jetson (`sudo pip3 install -U jetson-stats`, reboot)"


def energy_mj_per_image(power_mw: Sequence[float], per_image_ms: float) -> float | None:
    """Mean board power (mW) x time per image (ms) / 1000 = millijoules per image; None without samples."""
    samples = [p for p in power_mw if p is not None and p > 0]
    if not samples or per_image_ms <= 0:
        return None
    return float(np.mean(samples)) * per_image_ms / 1000.0


def bench_model(path: Path, images: list[Path], meter: PowerMeter, min_duration_s: float = 1.0) -> dict:
    """Latency, GPU memory and energy of one model at batch 1."""
    with Predictor(path) as predictor:
        batch = preprocess_file(images[0], predictor.contract.preprocessing)[None]
        samples: list[float] = []

        def run() -> None:
            predictor.predict_arrays(batch)
            if meter.available:
                samples.append((meter.read() or {}).get("total_mw") or 0.0)

        stats = measure(run, batch=1, warmup=10, min_duration_s=min_duration_s)
        facts = predictor.describe()
    energy = energy_mj_per_image(samples, stats.per_image_ms)
    why = None if energy is not None else (NO_JTOP if not meter.available else "jtop gave no power readings")
    return {"model": path.name, "backend": facts.get("backend"), "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms,
            "images_per_s": stats.images_per_s, "gpu_memory_mb": facts.get("gpu_memory_mb"),
            "energy_mj_per_image": energy, "energy_note": why, "runtime": facts}


def to_markdown(rows: list[dict], machine: dict) -> str:
    lines = [f"# Device benchmark: {machine.get('jetson') or machine.get('gpu') or machine.get('cpu')}", "",
             *table_head(["model", "backend", "p50 ms", "p90 ms", "img/s", "GPU MB", "mJ/image"])]
    for r in rows:
        gpu = "" if r["gpu_memory_mb"] is None else f"{r['gpu_memory_mb']:.1f}"
        energy = f"{r['energy_mj_per_image']:.2f}" if r["energy_mj_per_image"] is not None else r["energy_note"]
        lines.append(table_row([r["model"], r["backend"], f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                                f"{r['images_per_s']:.1f}", gpu, energy]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help=".engine or .onnx files (each with its sidecar)")
    p.add_argument("--images", nargs="+", type=Path, required=True, help="a few test photos")
    p.add_argument("--out", type=Path, default=Path("bench-device"))
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed work per model")
    args = p.parse_args(argv)
    images = [i for i in args.images if i.is_file()]
    if not images:
        raise UserError("no image files given (--images); pass a few test photos, e.g. data/images/P*.jpg")
    with PowerMeter() as meter:
        rows = [bench_model(m, images, meter, args.min_seconds) for m in args.models]
    machine = describe_machine()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "device_bench.json", json.dumps({"machine": machine, "models": rows}, indent=2))
    atomic_write_text(args.out / "device_bench.md", to_markdown(rows, machine))
    print(to_markdown(rows, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

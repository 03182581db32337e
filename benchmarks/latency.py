"""Latency measurement: warm-up, timed runs for a minimum duration, percentiles and throughput.

Every number is wall-clock time around one call of a `run(batch)` function, read with
`time.perf_counter`. For asynchronous devices (CUDA) the caller passes `sync`, which is called before
each clock read, so the time covers the work and not just its launch. Percentiles use numpy's linear
interpolation; throughput is images over the summed time of the timed runs (not wall time including
the warm-up), so `throughput == batch / mean time`.

    stats = measure(lambda: session.run(None, feed), batch=8, warmup=5, min_duration_s=1.0)
    stats.p50_ms, stats.per_image_ms, stats.images_per_s
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deploy.contract import TaskSpec
from deploy.predictor import decode_row
from deploy.preprocess import PreprocessSpec, preprocess_file
from deploy.vocab import Vocabulary


@dataclass(frozen=True)
class LatencyStats:
    """Timing of one batch size. Milliseconds are per *batch* except `per_image_ms`."""

    batch: int
    runs: int
    total_s: float
    mean_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    per_image_ms: float  # p50 batch time / batch
    images_per_s: float  # batch * runs / total_s

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(times_s: Sequence[float], batch: int) -> LatencyStats:
    """Statistics of a series of per-call durations in seconds for calls of `batch` images each."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    times = np.asarray(times_s, dtype=np.float64)
    if times.ndim != 1 or times.size == 0:
        raise ValueError("need at least one timing to summarize")
    if np.any(times < 0) or not np.all(np.isfinite(times)):
        raise ValueError("timings must be finite and non-negative")
    ms = times * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    total = float(times.sum())
    return LatencyStats(
        batch=batch, runs=int(times.size), total_s=total, mean_ms=float(ms.mean()), min_ms=float(ms.min()),
        p50_ms=p50, p90_ms=p90, p99_ms=p99, max_ms=float(ms.max()), per_image_ms=p50 / batch,
        images_per_s=batch * times.size / total if total > 0 else float("inf"))


def time_calls(run: Callable[[], object], warmup: int = 5, min_duration_s: float = 1.0, min_runs: int = 10,
               max_runs: int = 100_000, sync: Callable[[], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Call `run()` `warmup` times untimed, then keep timing calls until both `min_runs` calls and
    `min_duration_s` seconds of timed work are reached (or `max_runs`). Returns seconds per call
    (read with `clock`; a parameter so tests can feed synthetic time)."""
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")
    for _ in range(max(warmup, 0)):
        run()
    if sync:
        sync()
    times: list[float] = []
    total = 0.0
    while len(times) < max_runs and (len(times) < min_runs or total < min_duration_s):
        t0 = clock()
        run()
        if sync:
            sync()
        dt = clock() - t0
        times.append(dt)
        total += dt
    return times


def measure(run: Callable[[], object], batch: int, warmup: int = 5, min_duration_s: float = 1.0,
            min_runs: int = 10, max_runs: int = 100_000, sync: Callable[[], None] | None = None) -> LatencyStats:
    """`time_calls` + `summarize` for calls of `batch` images each."""
    return summarize(time_calls(run, warmup, min_duration_s, min_runs, max_runs, sync), batch)


def time_preprocess(paths: Sequence[str | Path], spec: PreprocessSpec, min_runs: int = 16) -> float:
    """Median milliseconds of `deploy.preprocess.preprocess_file` per image (decode, resize, normalize),
    cycling through `paths` for at least `min_runs` files; the file cache is warmed first."""
    if not paths:
        raise ValueError("need at least one image file to time preprocessing")
    preprocess_file(paths[0], spec)
    times = []
    for i in range(max(min_runs, 1)):
        t0 = time.perf_counter()
        preprocess_file(paths[i % len(paths)], spec)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def time_postprocess(outputs: dict[str, np.ndarray], tasks: Sequence[TaskSpec], vocab: Vocabulary | None,
                     runs: int = 50) -> float:
    """Median milliseconds to decode the outputs (keyed by task name) of one image (row 0) with the
    device's own post-processing, `deploy.predictor.decode_row`."""
    row = {t.output_name: np.asarray(outputs[t.name])[:1] for t in tasks}
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        decode_row(row, 0, list(tasks), vocab)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)

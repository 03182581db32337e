"""Interleaved timing: the artifacts a ratio compares are timed in turn (A B C, B C A, ...) over several
rounds, so a slow spell of a shared machine (another process, a clock change) lands on all of them
instead of on whichever happened to be timed then; each ratio is reported with its spread across rounds.

A runtime session also has a state of its own that persists while it lives: on this 2-core VM, the
same INT8 model took 0.9 ms per call in one ONNX Runtime session and 1.25 ms in the next, in the same
process. Runs given a `reopen` hook therefore get a fresh session at the start of every round after the
first (warmed up again, untimed), so the median over rounds is over sessions too, not one draw of it.

    times = interleaved_times({"fp32": run_a, "int8": run_b}, rounds=5, per_round_s=0.4, min_runs=4)
    ratio = ratio_over_rounds(round_medians(times["fp32"]), round_medians(times["int8"]))
    ratio["median"], ratio["min"], ratio["max"], ratio["rounds"]

The clock is a parameter so the logic is tested on synthetic timings (tests/test_bench.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.latency import time_calls


@dataclass
class Interleaved:
    """Seconds per call of each artifact, one list per round; artifacts whose call raised are in `failed`."""

    times: dict[str, list[list[float]]] = field(default_factory=dict)
    order: list[list[str]] = field(default_factory=list)  # the order each round ran in
    failed: dict[str, str] = field(default_factory=dict)

    def flat(self, name: str) -> list[float]:
        """Every timed call of `name`, all rounds together."""
        return [t for block in self.times[name] for t in block]


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """`names` rotated by the round number: each artifact goes first, second, ... equally often, so
    none always runs right after the same neighbour or at the same point of the round."""
    k = round_index % len(names) if names else 0
    return [*names[k:], *names[:k]]


def interleaved_times(runs: Mapping[str, Callable[[], object]], rounds: int, per_round_s: float,
                      warmup: int = 5, min_runs: int = 1, sync: Mapping[str, Callable[[], None]] | None = None,
                      clock: Callable[[], float] = time.perf_counter,
                      after_block: Callable[[str, int], None] | None = None,
                      reopen: Mapping[str, Callable[[], None]] | None = None) -> Interleaved:
    """Warm every run up (`warmup` calls each), then `rounds` rounds in which each run is timed for at
    least `per_round_s` seconds and `min_runs` calls, in `round_order`. A run that raises is dropped
    from the later rounds and reported in `failed` (the others go on). `after_block(name, round)` is
    called after each timed block (e.g. to read a power meter). `reopen[name]()` is called before the
    run's block in every round after the first (a new session), followed by `warmup` untimed calls."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sync, reopen = sync or {}, reopen or {}
    result = Interleaved(times={name: [] for name in runs})
    alive = list(runs)

    def attempt(name: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # one broken artifact must not stop the comparison of the others
            result.failed[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            alive.remove(name)

    for name in list(alive):
        attempt(name, lambda name=name: [runs[name]() for _ in range(warmup)])
    for r in range(rounds):
        order = round_order(alive, r)
        result.order.append(order)
        for name in order:
            fresh = r > 0 and name in reopen
            if fresh:
                attempt(name, reopen[name])
                if name not in alive:
                    continue
            attempt(name, lambda name=name, fresh=fresh: result.times[name].append(
                time_calls(runs[name], warmup if fresh else 0, per_round_s, min_runs, sync=sync.get(name),
                           clock=clock)))
            if after_block is not None and name in alive:
                after_block(name, r)
    for name in result.failed:
        result.times.pop(name, None)
    return result


def round_medians(blocks: Sequence[Sequence[float]], batch: int = 1) -> list[float]:
    """Median milliseconds per image of each round's block of calls (calls of `batch` images)."""
    return [float(np.median(block)) * 1e3 / batch for block in blocks if len(block)]


def ratio_over_rounds(numerator_ms: Sequence[float], denominator_ms: Sequence[float]) -> dict | None:
    """The per-round ratios numerator/denominator (same round, so the same machine state) summarised:
    {"median", "min", "max", "rounds", "per_round"}; None when either side has no rounds."""
    pairs = [(a, b) for a, b in zip(numerator_ms, denominator_ms) if b > 0]
    if not pairs:
        return None
    ratios = [a / b for a, b in pairs]
    return {"median": float(np.median(ratios)), "min": float(min(ratios)), "max": float(max(ratios)),
            "rounds": len(ratios), "per_round": [round(x, 4) for x in ratios]}

"""Timing in the benchmarks wing, on synthetic clocks and series (no model): latency statistics, the
interleaved rounds (rotation, a slow round, a failing run, a fresh session per round) and ratio spreads."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.interleave import interleaved_times, ratio_over_rounds, round_medians, round_order
from benchmarks.latency import measure, summarize, time_calls

# --- latency statistics ---------------------------------------------------------------------------


def test_summarize_percentiles_and_throughput():
    times = np.arange(1, 101) / 1000.0  # 1..100 ms
    stats = summarize(times, batch=8)
    assert stats.runs == 100 and stats.batch == 8
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert (stats.min_ms, stats.max_ms, stats.mean_ms) == pytest.approx((1.0, 100.0, 50.5))
    assert stats.per_image_ms == pytest.approx(50.5 / 8)
    assert stats.images_per_s == pytest.approx(8 * 100 / times.sum())  # = batch / mean time
    assert stats.total_s == pytest.approx(5.05)


def test_summarize_rejects_bad_series():
    with pytest.raises(ValueError, match="at least one"):
        summarize([], 1)
    with pytest.raises(ValueError, match="non-negative"):
        summarize([0.1, -0.1], 1)
    with pytest.raises(ValueError, match="batch"):
        summarize([0.1], 0)


def test_time_calls_warms_up_then_meets_runs_and_duration():
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=3, min_duration_s=0.0, min_runs=7)
    assert len(times) == 7 and len(calls) == 10  # 3 untimed warm-up calls
    syncs = []
    stats = measure(lambda: sum(range(2000)), batch=2, warmup=0, min_duration_s=0.02, min_runs=1,
                    sync=lambda: syncs.append(1))
    assert stats.total_s >= 0.02 and stats.runs >= 1 and len(syncs) == stats.runs + 1


class SyntheticMachine:
    """A fake clock and runs of fixed cost (seconds per call) on a machine that gets `slowdown[r]` times
    slower in round r, as when another process starts: no real time is measured."""

    def __init__(self, costs: dict[str, float], slowdown: list[float]):
        self.now, self.costs, self.slowdown, self.blocks = 0.0, costs, slowdown, 0
        self.calls = {name: 0 for name in costs}

    def clock(self) -> float:
        return self.now

    def run(self, name: str):
        def call():
            self.calls[name] += 1
            self.now += self.costs[name] * self.slowdown[min(self.blocks // len(self.costs), len(self.slowdown) - 1)]
        return call

    def after_block(self, name: str, round_index: int) -> None:
        self.blocks += 1


def test_interleaving_rotates_the_order_and_ratios_survive_a_slow_round():
    machine = SyntheticMachine({"a": 0.004, "b": 0.002, "c": 0.001}, slowdown=[1.0, 3.0, 1.0, 1.5])
    result = interleaved_times({n: machine.run(n) for n in "abc"}, rounds=4, per_round_s=0.01, warmup=2,
                               min_runs=3, clock=machine.clock, after_block=machine.after_block)
    assert result.order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert not result.failed
    for name in "abc":
        blocks = result.times[name]
        assert len(blocks) == 4 and all(len(b) >= 3 and sum(b) >= 0.01 for b in blocks)
        assert machine.calls[name] == 2 + len(result.flat(name))  # warm-up calls are not timed
    a, b = round_medians(result.times["a"]), round_medians(result.times["b"])
    assert a == pytest.approx([4.0, 12.0, 4.0, 6.0])  # ms per call, round by round
    ratio = ratio_over_rounds(a, b)
    # The slow round slowed both: every per-round ratio is the true 2x.
    assert ratio["rounds"] == 4
    assert (ratio["median"], ratio["min"], ratio["max"]) == pytest.approx((2.0, 2.0, 2.0))
    assert round_medians([[0.008, 0.008]], batch=8) == pytest.approx([1.0])  # per image
    assert round_order(["a", "b"], 3) == ["b", "a"]


def test_ratio_spread_and_a_failing_run_is_dropped_alone():
    spread = ratio_over_rounds([10.0, 12.0, 30.0], [5.0, 4.0, 10.0])
    assert (spread["median"], spread["min"], spread["max"]) == pytest.approx((3.0, 2.0, 3.0))
    assert ratio_over_rounds([], [1.0]) is None
    machine = SyntheticMachine({"ok": 0.001, "bad": 0.001}, slowdown=[1.0])
    calls = {"bad": 0}

    def bad():
        calls["bad"] += 1
        if calls["bad"] > 3:  # warm-up passes, then it breaks in the first timed round
            raise RuntimeError("device lost")

    result = interleaved_times({"ok": machine.run("ok"), "bad": bad}, rounds=3, per_round_s=0.005, warmup=3,
                               clock=machine.clock)
    assert result.failed == {"bad": "RuntimeError: device lost"} and "bad" not in result.times
    assert len(result.times["ok"]) == 3 and result.order[1:] == [["ok"], ["ok"]]
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times({"ok": machine.run("ok")}, rounds=0, per_round_s=0.1)


def test_a_run_with_a_reopen_hook_gets_a_fresh_warmed_session_each_round_after_the_first():
    machine = SyntheticMachine({"ort": 0.001, "torch": 0.002}, slowdown=[1.0])
    sessions, warm_calls = [1.0], []  # cost factor of the live session: each new session draws another

    def ort_call():
        warm_calls.append(len(sessions))
        machine.now += 0.001 * sessions[-1]

    def reopen():
        sessions.append(1.5 if len(sessions) % 2 else 1.0)

    result = interleaved_times({"ort": ort_call, "torch": machine.run("torch")}, rounds=4, per_round_s=0.004,
                               warmup=2, min_runs=2, clock=machine.clock, reopen={"ort": reopen})
    assert len(sessions) == 4  # rounds 2, 3 and 4 opened a new session; round 1 used the warmed-up one
    # Each new session is warmed up (2 untimed calls) before its block is timed.
    assert len(warm_calls) == 2 + len(result.flat("ort")) + 2 * 3
    assert round_medians(result.times["ort"]) == pytest.approx([1.0, 1.5, 1.0, 1.5])  # ms: one session per round
    assert round_medians(result.times["torch"]) == pytest.approx([2.0] * 4)  # no hook: the same runner throughout

    def broken():
        raise RuntimeError("model file gone")

    result = interleaved_times({"ort": ort_call, "torch": machine.run("torch")}, rounds=3, per_round_s=0.004,
                               clock=machine.clock, reopen={"ort": broken})
    assert result.failed == {"ort": "RuntimeError: model file gone"} and len(result.times["torch"]) == 3

"""How an INT8 model's change against FP32 is printed and judged (torch-free, for readers of the
compress report such as benchmarks.verdict). The guard (compress/guard.py) measures the drops and,
for a drop over its limit, the paired patient-bootstrap 95 % interval of the drop (train/bootstrap.py)."""

from __future__ import annotations


def within_noise(interval: list[float] | tuple[float, float] | None) -> bool:
    """The paired 95 % interval of a drop includes 0: the validation split cannot tell it from no drop."""
    return interval is not None and interval[0] <= 0.0 <= interval[1]


def format_drop(key: str, drop: float, limit: float | None = None, interval=None) -> str:
    """'coarse/accuracy 1.37 worse (limit 1.00; 95 % CI -0.51 to 3.03, within noise)', 'fine/top5 0.51
    better', 'diagnosis/bleu same': a drop is positive when the model got worse, so a bare '-0.51'
    would read as a loss. `interval`: the paired-bootstrap interval of the drop, in points."""
    if round(drop, 2) == 0:
        text = f"{key} same"
    else:
        text = f"{key} {abs(drop):.2f} {'worse' if drop > 0 else 'better'}"
    notes = [f"limit {limit:.2f}"] if limit is not None else []
    if interval is not None:
        noise = "within noise" if within_noise(interval) else "beyond noise"
        notes.append(f"95 % CI {interval[0]:.2f} to {interval[1]:.2f}, {noise}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def format_drops(drops: dict[str, float], limits: dict[str, float] | None = None,
                 intervals: dict[str, list[float] | None] | None = None) -> str:
    """Every guarded metric's change against FP32, in points (BLEU points for BLEU)."""
    return ", ".join(format_drop(k, v, (limits or {}).get(k), (intervals or {}).get(k)) for k, v in drops.items())


def within(drops: dict[str, float], limits: dict[str, float], intervals: dict | None = None,
           noise_cap: float | dict[str, float] = 0.0) -> bool:
    """Every drop is within its limit, or within noise (its paired interval includes 0) and at most
    its noise cap in points (one number, or per metric as compress.guard.noise_caps gives them)."""
    intervals = intervals or {}

    def cap(key: str) -> float:
        return noise_cap.get(key, 0.0) if isinstance(noise_cap, dict) else noise_cap

    return all(drops[k] <= limit or (drops[k] <= cap(k) and within_noise(intervals.get(k)))
               for k, limit in limits.items() if k in drops)

"""How an INT8 model's change against FP32 is printed and judged (torch-free, for readers of the
compress report such as benchmarks.verdict). The guard (compress/guard.py) measures the drops."""

from __future__ import annotations


def format_drop(key: str, drop: float, limit: float | None = None) -> str:
    """'coarse/accuracy 1.37 worse (limit 2.00)', 'fine/top5 0.51 better', 'diagnosis/bleu same': a
    drop is positive when the model got worse, so a bare '-0.51' would read as a loss."""
    if round(drop, 2) == 0:
        text = f"{key} same"
    else:
        text = f"{key} {abs(drop):.2f} {'worse' if drop > 0 else 'better'}"
    return text + (f" (limit {limit:.2f})" if limit is not None else "")


def format_drops(drops: dict[str, float], limits: dict[str, float] | None = None) -> str:
    """Every guarded metric's change against FP32, in points (BLEU points for BLEU)."""
    return ", ".join(format_drop(k, v, (limits or {}).get(k)) for k, v in drops.items())


def within(drops: dict[str, float], limits: dict[str, float]) -> bool:
    return all(drops[k] <= limit for k, limit in limits.items() if k in drops)

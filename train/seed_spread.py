"""How far a KD sweep point moves with the training seed (`python -m train.sweep --seeds 0 1 2`).

A student's margin over its labels-only baseline means something only when it is larger than what the
seed alone moves: on the default config at 100 % labels one seed put the KD student above the baseline
on fine balanced accuracy and another below it (README: "A second seed at 100 % labels"). With more
than one seed in a sweep, sweep.md gains two tables, both on validation: each configuration's mean and
spread over the seeds, and each student point minus the baseline of the same seed and optimizer steps,
seed by seed. The spread is the sample standard deviation over seeds.
"""

from __future__ import annotations

from statistics import mean, stdev

from deploy.markdown import table_head, table_row
from train.metrics import to_points


def _spread(values: list[float], digits: int, signed: bool = False) -> str:
    """'mean ± sd' over the seeds ('mean' alone for one value)."""
    sign = "+" if signed else ""
    text = f"{mean(values):{sign}.{digits}f}"
    return text if len(values) < 2 else f"{text} ± {stdev(values):.{digits}f}"


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    """Seeded records by configuration (the point without its seed), in the order the configurations
    first appear (best first in sweep.md), each configuration's records by seed."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("seed") is not None:
            groups.setdefault(r["group"], []).append(r)
    return {name: sorted(rs, key=lambda r: r["seed"]) for name, rs in groups.items()}


def _values(r: dict, key: str) -> float | None:
    v = r["val"].get(key)
    return None if v is None else to_points(key, v)


def _row(name: str, rs: list[dict], columns: list[tuple[str, str]], per_column, signed: bool) -> str:
    """One configuration: its seeds, the score's and each column's spread (per_column(key) -> values)."""
    cells = [name, ", ".join(str(r["seed"]) for r in rs), _spread([r["val_score"] for r in rs], 4, signed)]
    for key, _ in columns:
        vals = [v for v in per_column(key) if v is not None]
        cells.append(_spread(vals, 1, signed) if vals else "—")
    return table_row(cells)


def _table(title: str, first: str, columns: list[tuple[str, str]], rows: list[str]) -> list[str]:
    head = [first, "seeds", "val score", *[c for _, c in columns]]
    return ["", title, "", *table_head(head), *rows]


def over_seeds(records: list[dict], columns: list[tuple[str, str]]) -> list[dict]:
    """Per student configuration and seed: the student minus the baseline of its seed and steps."""
    by_point = {r["point"]: r for r in records}
    out = []
    for r in records:
        ref = by_point.get(r.get("baseline"))
        if ref is None:  # a baseline itself, or a student swept without one
            continue
        diff = {key: None if _values(r, key) is None or _values(ref, key) is None
                else _values(r, key) - _values(ref, key) for key, _ in columns}
        out.append({"group": r["group"], "seed": r["seed"], "val_score": r["val_score"] - ref["val_score"],
                    "val": diff})
    return out


def seed_tables(records: list[dict], columns: list[tuple[str, str]]) -> str:
    """The two seed tables of sweep.md, or "" when the sweep ran fewer than two seeds."""
    if len({r["seed"] for r in records if r.get("seed") is not None}) < 2:
        return ""
    lines = _table("Over the seeds (validation, mean ± sd over the seeds; accuracies in %, BLEU 0-100):",
                   "configuration", columns,
                   [_row(name, rs, columns, lambda key, rs=rs: [_values(r, key) for r in rs], signed=False)
                    for name, rs in _groups(records).items()])
    diffs = _groups(over_seeds(records, columns))
    if not diffs:  # --no-baseline: nothing to subtract
        return "\n".join(lines) + "\n"
    rows = [_row(name, rs, columns, lambda key, rs=rs: [r["val"][key] for r in rs], signed=True)
            for name, rs in diffs.items()]
    above = [f"- {name}: above its baseline on the score with {sum(r['val_score'] > 0 for r in rs)} of "
             f"{len(rs)} seeds" for name, rs in diffs.items()]
    lines += _table("Student minus the labels-only baseline of the same seed and optimizer steps (mean ± sd of "
                    "the per-seed differences; the score on its 0-1 scale, accuracies in points, BLEU 0-100):",
                    "configuration", columns, rows)
    return "\n".join([*lines, "", *above]) + "\n"

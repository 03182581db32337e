"""Floors: the minimum (or, for lower-is-better metrics, maximum) value of one headline metric that the
benchmark checks per artifact, e.g. `student.int8-cpu:coarse/accuracy=80`. Parsed here so the config
can be checked against the dataset before training (train.preflight); applied by benchmarks/accuracy.py.

A floor is written in the unit the reports print: accuracies, F1, kappa, exact match and joint accuracy
in percent (0-100), BLEU 0-100, ECE as a fraction (0-1), MAE in grades, NLL as it is. A value outside
its unit's range, or a percent floor below 1 (a fraction written where percent is meant: 0.8 would
be 0.8 %), is refused with the value it probably meant.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from train.metrics import LOWER_IS_BETTER, to_points

RAW_UNITS = ("ece", "nll", "mean_kl", "mae")  # printed as they are, not in percent


def unit(metric: str) -> str:
    """The unit a metric's floor (and report cell) is in: '%', 'BLEU' or '' (as it is)."""
    if metric.endswith("bleu"):
        return "BLEU"
    return "" if metric.endswith(RAW_UNITS) else "%"


def in_report_units(metric: str, value: float) -> float:
    """A metric value (fractions, as computed) in the unit the reports print (see `unit`)."""
    return value if metric.endswith(RAW_UNITS) else to_points(metric, value)


def _range_problem(metric: str, value: float) -> str | None:
    """Why `value` cannot be a floor of `metric` in its unit (None when it can)."""
    kind = unit(metric)
    low = -100.0 if metric.endswith("kappa") else 0.0
    if kind in ("%", "BLEU") and not low <= value <= 100:
        return f"{metric} is in {'percent' if kind == '%' else 'BLEU points'} ({low:g} to 100)"
    if kind in ("%", "BLEU") and 0 < value < 1:
        return (f"{metric} is in {'percent' if kind == '%' else 'BLEU points'} (0-100): {value:g} would be "
                f"{value:g} {'%' if kind == '%' else 'BLEU'}; did you mean {100 * value:g}?")
    if metric.endswith("ece") and not 0 <= value <= 1:
        return f"{metric} is a fraction (0-1) as the reports print it"
    if metric.endswith(RAW_UNITS) and value < 0:
        return f"{metric} cannot be negative"
    return None


@dataclass(frozen=True)
class Floor:
    """A minimum (or, for ece/nll/kl, maximum) of one metric for the artifacts matching a pattern."""

    pattern: str
    metric: str
    value: float

    @property
    def is_ceiling(self) -> bool:
        return self.metric.endswith(LOWER_IS_BETTER)

    def applies(self, artifact: str) -> bool:
        return fnmatch.fnmatchcase(artifact, self.pattern)

    def violation(self, metrics: dict[str, float]) -> str | None:
        """Why `metrics` miss this floor, or None when met."""
        got = metrics.get(self.metric)
        if got is None:
            return f"{self.metric} not measured (floor {self.value:g}{self.suffix})"
        got = in_report_units(self.metric, got)
        if (got > self.value) if self.is_ceiling else (got < self.value):
            return f"{self.metric} {got:.4g}{self.suffix} {'>' if self.is_ceiling else '<'} {self.value:g}{self.suffix}"
        return None

    @property
    def suffix(self) -> str:
        kind = unit(self.metric)
        return {"%": " %", "BLEU": " BLEU"}.get(kind, "")

    def __str__(self) -> str:
        return f"{self.pattern}:{self.metric}={self.value:g}"


_FLOOR = re.compile(r"^(?P<pattern>[^:=\s]+):(?P<metric>[\w/]+)=(?P<value>[-+0-9.eE]+)$")


def parse_floor(text: str) -> Floor:
    """`student.int8-cpu:coarse/accuracy=80` -> Floor; ValueError with the expected form or unit otherwise."""
    match = _FLOOR.match(text.strip())
    if not match:
        raise ValueError(f"floor {text!r} must look like ARTIFACT:METRIC=VALUE, e.g. "
                         "student.int8-cpu:coarse/accuracy=80 (accuracies in percent, BLEU 0-100, ECE 0-1)")
    try:
        value = float(match["value"])
    except ValueError as exc:
        raise ValueError(f"floor {text!r}: {match['value']!r} is not a number") from exc
    problem = _range_problem(match["metric"], value)
    if problem:
        raise ValueError(f"floor {text!r}: {problem}")
    return Floor(match["pattern"], match["metric"], value)


def floor_violations(floors: Sequence[Floor], name: str, metrics: dict[str, float]) -> list[str]:
    """The floors that apply to artifact `name` and are missed by its metrics."""
    return [f"{v} (floor {f})" for f in floors if f.applies(name) and (v := f.violation(metrics))]


def unmatched_floors(floors: Sequence[Floor], measured: Sequence[str]) -> list[Floor]:
    """Floors that no measured artifact matched (a typo, or the artifact failed or was skipped)."""
    return [f for f in floors if not any(f.applies(n) for n in measured)]

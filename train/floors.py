"""Floors: the minimum (or, for lower-is-better metrics, maximum) value of one headline metric that the
benchmark checks per artifact, e.g. `student.int8-cpu:coarse/accuracy=0.8`. Parsed here so the config
can be checked against the dataset before training (train.preflight); applied by benchmarks/accuracy.py.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from train.metrics import LOWER_IS_BETTER


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
            return f"{self.metric} not measured (floor {self.value:g})"
        if (got > self.value) if self.is_ceiling else (got < self.value):
            return f"{self.metric} {got:.4g} {'>' if self.is_ceiling else '<'} {self.value:g}"
        return None

    def __str__(self) -> str:
        return f"{self.pattern}:{self.metric}={self.value:g}"


_FLOOR = re.compile(r"^(?P<pattern>[^:=\s]+):(?P<metric>[\w/]+)=(?P<value>[-+0-9.eE]+)$")


def parse_floor(text: str) -> Floor:
    """`student.int8-cpu:coarse/accuracy=0.8` -> Floor; ValueError with the expected form otherwise."""
    match = _FLOOR.match(text.strip())
    if not match:
        raise ValueError(f"floor {text!r} must look like ARTIFACT:METRIC=VALUE, e.g. "
                         "student.int8-cpu:coarse/accuracy=0.8 (accuracies are fractions, BLEU is 0-100)")
    try:
        value = float(match["value"])
    except ValueError as exc:
        raise ValueError(f"floor {text!r}: {match['value']!r} is not a number") from exc
    return Floor(match["pattern"], match["metric"], value)

"""How long each pipeline stage took: runs/<name>/stage_times.json and the table the verdict prints.

Every stage entry point (train.check, train.teachers, train.student, compress.export,
compress.quantize, benchmarks.bench) ends with

    raise SystemExit(run_stage(main, "teachers"))

instead of `cli(main)`: the same error boundary (deploy.errors.cli), timed. The run folder is the one
of the first config the stage loads (`load_experiment` notes it here), so the stage's own arguments,
overrides included, decide where the entry goes. One entry per stage, replaced when the stage runs
again; a stage that found its outputs up to date records its short time, as it happened. Not recorded:
`--help` and argument errors (no stage ran), processes started by a timed stage (parallel teachers:
the parent's entry covers them), and distributed ranks other than 0. An entry point that runs stages
of several runs (train.fractions: each fraction's teachers and student) times each with `timed_stage`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from deploy.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, cli
from deploy.fileio import atomic_write_text, locked
from deploy.markdown import table_lines, table_row
from train.layout import RunLayout

# The order of `make all`; stages not listed (none today) follow in the order they started.
STAGE_ORDER = ("check", "teachers", "student", "export", "compress", "bench")
STAGE_ENV = "FUNDUS_MTKD_STAGE"  # set while a timed stage runs, so the processes it starts do not record
STATUS = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_USAGE: "usage error", EXIT_INTERRUPTED: "interrupted"}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclass
class _Timing:
    stage: str
    layout: RunLayout | None = None


_active: list[_Timing] = []


def note_run(layout: RunLayout) -> None:
    """Called by train.experiment.load_experiment: the first run folder the timed stage loads is where
    its time goes (a no-op outside a timed stage)."""
    if _active and _active[-1].layout is None:
        _active[-1].layout = layout


def read_stage_times(layout: RunLayout) -> dict[str, dict]:
    """Stage name -> its entry ({} when the file is absent or unreadable: it is a report, not an input)."""
    try:
        data = json.loads(layout.stage_times().read_text())
    except (OSError, ValueError):
        return {}
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def record_stage(layout: RunLayout, stage: str, started: float, ended: float, exit_code: int,
                 argv: Sequence[str] = (), status: str | None = None) -> dict:
    """Merge one stage's entry (replacing its previous one) into stage_times.json, atomically and
    locked (two `make teacher-x` may finish together); returns the entry."""
    entry = {"stage": stage, "seconds": round(ended - started, 2),
             "started": time.strftime(TIME_FORMAT, time.localtime(started)),
             "ended": time.strftime(TIME_FORMAT, time.localtime(ended)),
             "exit_code": exit_code, "status": status or STATUS.get(exit_code, f"exit {exit_code}"),
             "argv": list(argv)}
    path = layout.stage_times()
    with locked(path):
        stages = read_stage_times(layout)
        stages[stage] = entry
        atomic_write_text(path, json.dumps({"updated": entry["ended"], "stages": stages}, indent=1))
    return entry


def _records() -> bool:
    """False in a process started by a timed stage, and on distributed ranks other than 0."""
    return STAGE_ENV not in os.environ and os.environ.get("RANK", "0") == "0"


def run_stage(main: Callable[[Sequence[str] | None], int], stage: str, argv: Sequence[str] | None = None,
              skip_flags: Sequence[str] = ()) -> int:
    """`cli(main, argv)`, with the stage's wall time and exit status written to its run folder.
    `skip_flags`: arguments that make the command a query, not a stage run (teachers --list)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not _records() or any(flag in args for flag in skip_flags):
        return cli(main, argv)
    timing = _Timing(stage)
    _active.append(timing)
    os.environ[STAGE_ENV] = stage
    started, code, status = time.time(), EXIT_FAILED, "crashed"
    try:
        code = cli(main, argv)
        status = None
        return code
    except SystemExit as exc:  # --help or a bad flag exit before any config is loaded: nothing recorded
        code, status = exc.code if isinstance(exc.code, int) else EXIT_FAILED, None
        raise
    finally:
        _active.remove(timing)
        os.environ.pop(STAGE_ENV, None)
        if timing.layout is not None:
            _record_quietly(timing.layout, stage, started, code, args, status)


@contextmanager
def timed_stage(layout: RunLayout, stage: str, argv: Sequence[str] = ()) -> Iterator[None]:
    """Time the block as `stage` of the run `layout` (one entry, like run_stage); the processes it starts
    (parallel teachers) do not record their own."""
    if not _records():
        yield
        return
    os.environ[STAGE_ENV] = stage
    started, code = time.time(), EXIT_FAILED
    try:
        yield
        code = EXIT_OK
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        raise
    finally:
        os.environ.pop(STAGE_ENV, None)
        _record_quietly(layout, stage, started, code, argv, None)


def _record_quietly(layout: RunLayout, stage: str, started: float, code: int, argv: Sequence[str],
                    status: str | None) -> None:
    try:
        record_stage(layout, stage, started, time.time(), code, argv, status)
    except OSError as exc:  # the timing is a report: never turn a stage's result into a failure
        print(f"warning: could not record the stage time: {exc}", file=sys.stderr)


def ordered(stages: dict[str, dict]) -> list[dict]:
    """The entries in pipeline order (STAGE_ORDER), then any others by start time."""
    known = [stages[s] for s in STAGE_ORDER if s in stages]
    others = sorted((e for s, e in stages.items() if s not in STAGE_ORDER), key=lambda e: e.get("started", ""))
    return known + others


def stage_table(stages: dict[str, dict]) -> tuple[list[tuple[str, float, float, str]], float]:
    """([(stage, minutes, share of the total, status)], total minutes) in pipeline order. The total is
    the sum of the stages' wall times (time between stages, e.g. make's venv check, is not in it)."""
    rows = ordered(stages)
    total = sum(float(e.get("seconds", 0.0)) for e in rows)
    table = [(e["stage"], e["seconds"] / 60, e["seconds"] / total if total else 0.0, e.get("status", ""))
             for e in rows]
    return table, total / 60


def stage_table_markdown(stages: dict[str, dict]) -> str:
    """The stage-time table (stage, minutes, share, status) with its total, as Markdown."""
    table, total = stage_table(stages)
    if not table:
        return "No stage times recorded yet (each stage writes stage_times.json when it runs)."
    lines = table_lines(["stage", "minutes", "share", "status"],
                        ([stage, f"{minutes:.1f}", f"{share:.0%}", status] for stage, minutes, share, status in table),
                        right=(1, 2))
    lines.append(table_row(["**total**", f"**{total:.1f}**", "100%", ""]))
    return "\n".join(lines)

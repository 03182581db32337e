"""What a long training stage tells its user while it runs.

On a terminal: tqdm progress bars. Anywhere else (make's log, `tee`, a teacher's train.log, CI): no
bars, but one timestamped line at most every LINE_EVERY_S seconds and one per epoch, e.g.

    12:03:04 [teachers 3/7] teacher_fine epoch 2/5 step 40/58 loss 0.91 ETA 6 min

and, for tools and for a user who checks in later, `runs/<name>/status.json`: one entry per model
being trained (stage, epoch, step, total steps, ETA, state, time of the update), rewritten atomically
under a lock so parallel teacher processes can all report into it.

A stage names itself with `with stage("teachers 3/7", cfg.run_dir): ...`; the training loop reads the
current stage for its lines and for the status file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.fileio import atomic_write_text, locked

LINE_EVERY_S = 30.0  # the longest gap between two progress lines in a log
STATUS_FILE = "status.json"


def on_terminal() -> bool:
    """Progress bars only where someone watches them: stderr (tqdm's stream) is a terminal."""
    return sys.stderr.isatty()


def log(message: str) -> None:
    """One line on stdout, prefixed with the wall-clock time."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def format_eta(seconds: float | None) -> str:
    """'ETA 45 s', 'ETA 6 min', 'ETA 2.3 h'; 'ETA ?' before anything is measured."""
    if seconds is None:
        return "ETA ?"
    if seconds < 90:
        return f"ETA {max(seconds, 0):.0f} s"
    if seconds < 90 * 60:
        return f"ETA {seconds / 60:.0f} min"
    return f"ETA {seconds / 3600:.1f} h"


def bar(iterable: Iterable, **tqdm_args) -> Iterable:
    """`tqdm(iterable, ...)` on a terminal, the iterable itself elsewhere (no bar frames in logs)."""
    if not on_terminal() or tqdm_args.pop("disable", False):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **tqdm_args)


# --- the current stage ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    label: str  # "teachers 3/7", "student", ...
    run_dir: Path | None  # where status.json goes; None: no status file


_current: list[Stage] = []


@contextmanager
def stage(label: str, run_dir: str | Path | None = None) -> Iterator[Stage]:
    """Name the stage that the code inside trains (for its log lines and status.json)."""
    current = Stage(label, Path(run_dir) if run_dir is not None else None)
    _current.append(current)
    try:
        yield current
    finally:
        _current.pop()


def current_stage() -> Stage | None:
    return _current[-1] if _current else None


def tag(name: str) -> str:
    """'[teachers 3/7] teacher_fine' inside a stage, '[teacher_fine]' outside one."""
    current = current_stage()
    return f"[{current.label}] {name}" if current and current.label != name else f"[{name}]"


# --- status.json ------------------------------------------------------------------------------------
def read_status(run_dir: str | Path) -> dict:
    """The run's status.json ({} when absent or unreadable: it is a report, never an input)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_status(run_dir: str | Path, model: str, **fields) -> dict:
    """Merge `fields` into the entry of `model` in run_dir/status.json (atomic, locked); returns the file."""
    run_dir = Path(run_dir)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    with locked(run_dir / STATUS_FILE):  # parallel teachers update it too
        status = read_status(run_dir)
        models = status.get("models") if isinstance(status.get("models"), dict) else {}
        entry = {**models.get(model, {}), "model": model, **fields, "updated": now}
        models[model] = entry
        status = {"updated": now, "current": entry, "models": models}
        atomic_write_text(run_dir / STATUS_FILE, json.dumps(status, indent=1))
    return status


# --- one model's training ---------------------------------------------------------------------------
class TrainingProgress:
    """The lines, bars and status entry of one model's training (rank 0 only: `enabled`)."""

    def __init__(self, name: str, epoch_steps: list[int], start_epoch: int = 0, enabled: bool = True):
        self.name, self.epoch_steps, self.enabled = name, list(epoch_steps), enabled
        self.total_steps = sum(self.epoch_steps)
        self.done = sum(self.epoch_steps[:start_epoch])  # optimizer steps finished, resumed epochs included
        self.stage = current_stage()
        self._started, self._steps_here = time.monotonic(), 0
        self._last_report = time.monotonic()

    @property
    def epochs(self) -> int:
        return len(self.epoch_steps)

    def eta_s(self) -> float | None:
        """Seconds left, from this process's wall time per step (evaluations included)."""
        if not self._steps_here:
            return None
        per_step = (time.monotonic() - self._started) / self._steps_here
        return per_step * max(self.total_steps - self.done, 0)

    def say(self, message: str) -> None:
        if self.enabled:
            log(f"{tag(self.name)} {message}")

    def status(self, **fields) -> None:
        if self.enabled and self.stage is not None and self.stage.run_dir is not None:
            update_status(self.stage.run_dir, self.name, stage=self.stage.label, epochs=self.epochs,
                          total_steps=self.total_steps, done_steps=self.done, **fields)

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """After each optimizer step: a line (logs only) and a status update at most every LINE_EVERY_S."""
        self.done += 1
        self._steps_here += 1
        if time.monotonic() - self._last_report < LINE_EVERY_S:
            return
        self._last_report = time.monotonic()
        eta = self.eta_s()
        if not on_terminal():
            self.say(f"epoch {epoch + 1}/{self.epochs} step {step}/{steps} loss {loss:.3f} {format_eta(eta)}")
        self.status(state="training", epoch=epoch + 1, step=step, steps_in_epoch=steps, loss=round(loss, 4),
                    eta_s=None if eta is None else round(eta))

    def epoch_done(self, epoch: int, loss: float | None, score: float | None, improved: bool,
                   seconds: float) -> None:
        """The end of an epoch (with its validation score when it was validated)."""
        eta = self.eta_s()
        val = "" if score is None else f" val score {score:.4f}{' (best)' if improved else ''}"
        loss_text = "" if loss is None else f" loss {loss:.4f}"
        self.say(f"epoch {epoch + 1}/{self.epochs}{loss_text}{val} {seconds:.0f}s {format_eta(eta)}")
        self.status(state="training", epoch=epoch + 1, step=self.epoch_steps[epoch],
                    steps_in_epoch=self.epoch_steps[epoch], val_score=score,
                    eta_s=None if eta is None else round(eta))
        self._last_report = time.monotonic()

    def finished(self, best: Path) -> None:
        self.say(f"finished: best checkpoint {best} ({(time.monotonic() - self._started) / 60:.1f} min)")
        self.status(state="done", epoch=self.epochs, eta_s=0, best=str(best))

    def failed(self, error: BaseException) -> None:
        self.status(state="failed", error=str(error)[:300])

"""The paper's headline experiment: teachers, KD student and baseline at 15/30/45/60/70% labels.

    python -m train.fractions --config configs/default.yaml [--fractions 0.15 0.3 0.45 0.6 0.7 1] [--jobs auto]

For each fraction f the labelled training patients are subsampled (train.data.splits.label_fraction,
stratified, seeded; validation and test untouched) and the rest join the unlabelled pool. Teachers are
trained on the kept labels, the student learns from them plus the whole unlabelled pool, the baseline
from the kept labels only, the linear probe (train.probe) from the kept labels on frozen features.
Each fraction is an ordinary run (runs/<name>-frac015/ ...), so an interrupted experiment resumes
where it stopped; 100 % is the experiment's own run (runs/<name>/), reused when `make all` made it.
Teachers train `--jobs` at a time in their own processes (train.parallel). Writes runs/<name>/fractions/fractions.{md,json,png}
with every finished fraction of the experiment, also those an earlier invocation ran (`--fractions 0.15`
today, `--fractions 0.3` tomorrow: the table holds both), except runs trained with another config.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import yaml

from deploy.contract import TaskSpec
from deploy.errors import cli
from deploy.fileio import atomic_write_text
from deploy.markdown import table_lines
from train.config import flatten_mapping, to_dict
from train.data.splits import PAPER_LABEL_FRACTIONS
from train.distributed import init_distributed, shutdown_distributed
from train.experiment import (
    ExperimentConfig,
    add_config_args,
    config_overrides,
    load_experiment,
    teacher_specs,
)
from train.layout import RunLayout
from train.metrics import to_points
from train.plots import plot_fractions
from train.stage import load_splits
from train.stage_times import timed_stage
from train.student import run as run_student
from train.summary import PROBE_ROW, summary_columns
from train.teachers import job_count, train_in_parallel, train_teacher

MODELS = ("ensemble", "student", "baseline", PROBE_ROW)  # the probe has no text head


FRACTIONS = (*PAPER_LABEL_FRACTIONS, 1.0)
RUN_SUFFIX = "-frac"  # runs/<name>-frac015/: the 15 % run of experiment <name>
# Config keys that may differ between the fraction runs of one experiment: each run's own name and
# label fraction, and sections that change neither training nor the accuracy/top-5/BLEU columns.
PER_RUN_KEYS = ("name=", "runs_root=", "data.label_fraction=", "compress.", "bench.", "clinical.")


def fraction_overrides(path: str | None, overrides: list[str], fraction: float) -> list[str]:
    """The overrides of one fraction's run: its own name and label fraction (none at 100 %)."""
    if fraction >= 1:
        return overrides
    base = load_experiment(path, overrides)
    return [*overrides, f"name={base.name}{RUN_SUFFIX}{round(100 * fraction):03d}",
            f"data.label_fraction={fraction}"]


def shared_settings(config: dict) -> set[str]:
    """A resolved config as `key=value` lines, without the keys each fraction's run sets for itself."""
    return {line for line in flatten_mapping(config) if not line.startswith(PER_RUN_KEYS)}


def config_mismatch(run_config: Path, base: ExperimentConfig) -> str | None:
    """Why a run's saved student config keeps it out of the experiment's table (None: it matches)."""
    if not run_config.exists():
        return f"it has no saved student config ({run_config.name})"
    try:
        saved = yaml.safe_load(run_config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        return f"its saved student config ({run_config.name}) is unreadable"
    changed = sorted({line.split("=", 1)[0] for line in shared_settings(saved) ^ shared_settings(to_dict(base))})
    return f"trained with another config ({', '.join(changed[:5])})" if changed else None


def finished_summaries(base: ExperimentConfig) -> list[dict]:
    """The summaries of every finished run of the experiment (runs/<name>/, runs/<name>-fracNNN/), also
    those an earlier invocation made, by label fraction; a run trained with another config is left out
    with one line saying why."""
    runs = [base.run_dir, *sorted(Path(base.runs_root).glob(f"{glob.escape(base.name)}{RUN_SUFFIX}[0-9][0-9][0-9]"))]
    summaries = []
    for run in runs:
        layout = RunLayout(run)
        path = layout.summary("json")
        if not path.exists():  # not finished yet
            continue
        why = config_mismatch(layout.resolved_config("student"), base)
        summary = _read_summary(path)
        if why is None and summary is None:
            why = f"{path.name} is unreadable"
        if why is None:
            summaries.append(summary)
        else:
            print(f"{run}: left out of the fractions table: {why}; rerun that fraction to include it", flush=True)
    return sorted(summaries, key=summary_fraction)


def _read_summary(path: Path) -> dict | None:
    """A run's summary.json, or None when it is not a summary (damaged, or without its rows)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("rows"), dict) else None


def summary_fraction(summary: dict) -> float:
    """The label fraction a run's summary was made at (none recorded: all labels)."""
    return summary.get("label_fraction") or 1.0


def fraction_rows(summaries: list[dict], keys: list[tuple[str, str]]) -> list[dict]:
    """One row per (fraction, model) with the kept columns, in fraction order."""
    rows = []
    for summary in summaries:
        for model in MODELS:
            if model in summary["rows"]:
                values = {k: summary["rows"][model].get(k) for k, _ in keys}
                rows.append({"fraction": summary_fraction(summary), "model": model,
                             **{k: v for k, v in values.items() if v is not None}})
    return rows


def run_fraction(path: str, overrides: list[str], jobs: str) -> None:
    """Teachers (in parallel processes), student, baseline and summary of one fraction's run, each of
    the two stages timed in that run's stage_times.json."""
    cfg = load_experiment(path, overrides)
    info, device = init_distributed(cfg.device)
    splits = load_splits(cfg, info)
    specs = teacher_specs(cfg, splits.data.spec.task_names)
    count = job_count(jobs, len(specs))
    argv = ["--config", path, *overrides]
    with timed_stage(cfg.layout, "teachers", argv):
        if count > 1 and not info.enabled:
            train_in_parallel(cfg, path, overrides, specs, count)
        else:
            for spec in specs:
                train_teacher(cfg, spec, splits, device, info)
    with timed_stage(cfg.layout, "student", argv):
        run_student(cfg, info, device)


def fraction_columns(tasks: list[TaskSpec]) -> list[tuple[str, str]]:
    """The summary columns the fractions table keeps: accuracies, top-5 and BLEU."""
    return [(k, t) for k, t in summary_columns(tasks) if k.endswith(("accuracy", "top5", "bleu"))]


def table(rows: list[dict], keys: list[tuple[str, str]]) -> str:
    body = ([f"{100 * r['fraction']:.0f}%", r["model"],
             *("—" if r.get(k) is None else f"{to_points(k, r[k]):.1f}" for k, _ in keys)] for r in rows)
    return "\n".join(table_lines(["labels", "model", *(t for _, t in keys)], body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.fractions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--jobs", default="1", metavar="N|auto", help="teachers trained at once (train.teachers)")
    args = parser.parse_args(argv)
    try:
        base = load_experiment(args.config, config_overrides(args))
        for fraction in args.fractions:
            overrides = fraction_overrides(args.config, config_overrides(args), fraction)
            cfg = load_experiment(args.config, overrides)
            print(f"=== label fraction {fraction:.0%}: {cfg.run_dir} ===", flush=True)
            run_fraction(args.config, overrides, args.jobs)
        keys = fraction_columns(load_splits(base).data.spec.tasks)
        rows = fraction_rows(finished_summaries(base), keys)
        out = base.layout
        atomic_write_text(out.fractions_report("json"), json.dumps(rows, indent=1))
        md = f"# Label-fraction experiment ({base.name}), test split\n\n{table(rows, keys)}\n"
        atomic_write_text(out.fractions_report("md"), md)
        plot_fractions(rows, [(k, t) for k, t in keys], out.fractions_report("png"))
        print(md)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

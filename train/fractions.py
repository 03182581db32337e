"""The paper's headline experiment: teachers, KD student and baseline at 15/30/45/60/70% labels.

    python -m train.fractions --config configs/default.yaml [--fractions 0.15 0.3 0.45 0.6 0.7 1] [--jobs auto]

For each fraction f the labelled training patients are subsampled (train.data.splits.label_fraction,
stratified, seeded; validation and test untouched) and the rest join the unlabelled pool. Teachers are
trained on the kept labels, the student learns from them plus the whole unlabelled pool, the baseline
from the kept labels only, the linear probe (train.probe) from the kept labels on frozen features.
Each fraction is an ordinary run (runs/<name>-frac015/ ...), so an interrupted experiment resumes
where it stopped; 100 % is the experiment's own run (runs/<name>/), reused when `make all` made it.
Teachers train `--jobs` at a time in their own processes (train.parallel). Writes runs/<name>/fractions/fractions.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json

from deploy.contract import TaskSpec
from deploy.errors import cli
from deploy.fileio import atomic_write_text
from train.data.splits import PAPER_LABEL_FRACTIONS
from train.distributed import init_distributed, shutdown_distributed
from train.experiment import (
    add_config_args,
    config_overrides,
    load_experiment,
    teacher_specs,
)
from train.metrics import to_points
from train.plots import plot_fractions
from train.stage import load_splits
from train.student import run as run_student
from train.summary import PROBE_ROW, summary_columns
from train.teachers import job_count, train_in_parallel, train_teacher

MODELS = ("ensemble", "student", "baseline", PROBE_ROW)  # the probe has no text head


FRACTIONS = (*PAPER_LABEL_FRACTIONS, 1.0)


def fraction_overrides(path: str | None, overrides: list[str], fraction: float) -> list[str]:
    """The overrides of one fraction's run: its own name and label fraction (none at 100 %)."""
    if fraction >= 1:
        return overrides
    base = load_experiment(path, overrides)
    return [*overrides, f"name={base.name}-frac{round(100 * fraction):03d}", f"data.label_fraction={fraction}"]


def run_fraction(path: str, overrides: list[str], jobs: str) -> dict:
    """Teachers (in parallel processes), student, baseline and summary of one fraction's run."""
    cfg = load_experiment(path, overrides)
    info, device = init_distributed(cfg.device)
    splits = load_splits(cfg, info)
    specs = teacher_specs(cfg, splits.data.spec.task_names)
    count = job_count(jobs, len(specs))
    if count > 1 and not info.enabled:
        train_in_parallel(cfg, path, overrides, specs, count)
    else:
        for spec in specs:
            train_teacher(cfg, spec, splits, device, info)
    run_student(cfg, info, device)
    return json.loads((cfg.layout.summary("json")).read_text())


def fraction_columns(tasks: list[TaskSpec]) -> list[tuple[str, str]]:
    """The summary columns the fractions table keeps: accuracies, top-5 and BLEU."""
    return [(k, t) for k, t in summary_columns(tasks) if k.endswith(("accuracy", "top5", "bleu"))]


def table(rows: list[dict], keys: list[tuple[str, str]]) -> str:
    lines = ["| labels | model | " + " | ".join(t for _, t in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        cells = [("—" if r.get(k) is None else f"{to_points(k, r[k]):.1f}")
                 for k, _ in keys]
        lines.append(f"| {100 * r['fraction']:.0f}% | {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.fractions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--jobs", default="1", metavar="N|auto", help="teachers trained at once (train.teachers)")
    args = parser.parse_args(argv)
    try:
        base = load_experiment(args.config, config_overrides(args))
        rows, keys = [], None
        for fraction in args.fractions:
            overrides = fraction_overrides(args.config, config_overrides(args), fraction)
            cfg = load_experiment(args.config, overrides)
            print(f"=== label fraction {fraction:.0%}: {cfg.run_dir} ===", flush=True)
            summary = run_fraction(args.config, overrides, args.jobs)
            tasks = load_splits(cfg).data.spec.tasks
            keys = keys or fraction_columns(tasks)
            for model in MODELS:
                if model in summary["rows"]:
                    values = {k: summary["rows"][model].get(k) for k, _ in keys}
                    rows.append({"fraction": fraction, "model": model,
                                 **{k: v for k, v in values.items() if v is not None}})
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

"""A small KD sweep on the validation split: alpha, temperature, schedule, ensemble weighting and length.

    python -m train.sweep --config configs/default.yaml --alpha 0.5 0.8 0.95 --temperature 1 2 4 \\
        --schedule joint staged --weighting mean calibrated_mean --labelled-share natural 0.5 --steps 150
    make sweep-kd SWEEP_ARGS="--alpha 0.5 0.95 --steps 150"

Every point of the grid trains the student from the cached teacher soft targets (made once, as
`make student` makes them, from trained teachers) for the same short budget of optimizer steps and
is scored on the validation split with the checkpoint-selection metric; the test split is not
touched, so the winner can become the config's default without fitting the test set. A labels-only
baseline with the same budget is the reference row. `--temperature T` sets every task's temperature
to T ("config" keeps the configured ones); `--epochs E ...` sets the student's training length, and each
length gets a labels-only baseline with the same optimizer steps (distillation from a large pool may
need longer training than labels alone, so lengths are compared step for step). `--seeds S ...` repeats
every point, and its baseline, with each training seed (initialisation, batch order, augmentation; the
teachers and the labelled subset stay the run's): sweep.md then adds each point's mean and spread over
the seeds and the student minus its baseline seed by seed, because a margin smaller than what the seed
moves is not a margin (train/seed_spread.py). The other axes default to the configured value.

Writes runs/<name>/sweep/sweep.{json,md}, best first. Points are ordinary runs under
runs/<name>/sweep/<teachers digest>/<point>/, so an interrupted sweep resumes, and retrained teachers
start a new set of points.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time

from deploy.errors import cli
from deploy.fileio import atomic_write_text
from deploy.markdown import table_head, table_row
from train.budget import student_train_config
from train.calibrate import load_calibrated_ensemble, teacher_paths
from train.distributed import DistInfo, init_distributed, shutdown_distributed
from train.ensemble import WEIGHTINGS, Combination, SoftTargets, teacher_hashes
from train.experiment import (
    ExperimentConfig,
    add_config_args,
    config_overrides,
    load_experiment,
    role_preprocessing,
)
from train.history import kept_record, validation_headline
from train.metrics import to_points
from train.seed_spread import seed_tables
from train.stage import Splits, image_set, load_splits
from train.student import fit_student, teacher_soft_targets
from train.summary import summary_columns

CONFIGURED = "config"


@dataclasses.dataclass(frozen=True)
class Point:
    alpha: float
    temperature: float | None  # None: the configured per-task temperatures
    schedule: str
    weighting: str
    labelled_share: float | None = None  # None: the natural mix of labelled and unlabelled images
    epochs: int | None = None  # None: the configured student.train.epochs (the training length)
    seed: int | None = None  # None: the configured seed

    @property
    def name(self) -> str:
        temp = CONFIGURED if self.temperature is None else f"{self.temperature:g}"
        share = "" if self.labelled_share is None else f"-L{self.labelled_share:g}"
        epochs = "" if self.epochs is None else f"-E{self.epochs}"
        return f"a{self.alpha:g}-T{temp}-{self.schedule}-{self.weighting}{share}{epochs}{seed_suffix(self.seed)}"

    def overrides(self) -> list[str]:
        share = "null" if self.labelled_share is None else self.labelled_share
        out = [f"student.kd.alpha={self.alpha}", f"student.kd.schedule={self.schedule}",
               f"teachers.ensemble_weighting={self.weighting}", f"student.kd.labelled_share={share}"]
        if self.temperature is not None:
            out += ["student.kd.temperatures={}", f"student.kd.default_temperature={self.temperature}"]
        if self.epochs is not None:
            out.append(f"student.train.epochs={self.epochs}")
        return out + seed_overrides(self.seed)


def seed_suffix(seed: int | None) -> str:
    """The run-name suffix of a seeded point or baseline ("" for the configured seed)."""
    return "" if seed is None else f"-S{seed}"


def seed_overrides(seed: int | None) -> list[str]:
    """The config override of a seeded point or baseline (none for the configured seed)."""
    return [] if seed is None else [f"seed={seed}"]


def grid(cfg: ExperimentConfig, alphas: list[float] | None, temperatures: list[str] | None,
         schedules: list[str] | None, weightings: list[str] | None, shares: list[str] | None = None,
         epochs: list[int] | None = None, seeds: list[int] | None = None) -> list[Point]:
    """Every combination of the given axes; an axis not given is the configured value."""
    temps = [None if t == CONFIGURED else float(t) for t in (temperatures or [CONFIGURED])]
    kd = cfg.student.kd
    mixes = [None if m == "natural" else float(m) for m in shares] if shares else [kd.labelled_share]
    return [Point(a, t, s, w, m, e, sd) for a in (alphas or [kd.alpha]) for t in temps
            for s in (schedules or [kd.schedule]) for w in (weightings or [cfg.teachers.ensemble_weighting])
            for m in mixes for e in (epochs or [None]) for sd in (seeds or [None])]


def budgeted(cfg: ExperimentConfig, steps: int | None) -> ExperimentConfig:
    """The point's config with its epochs capped so the student takes about `steps` optimizer steps."""
    if steps is None:
        return cfg
    epochs = student_train_config(cfg).epochs
    train = dataclasses.replace(cfg.student.train, min_steps=0, max_steps_per_epoch=math.ceil(steps / epochs))
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, train=train))


def run_point(cfg: ExperimentConfig, splits: Splits, soft: SoftTargets, role: str, device, info: DistInfo,
              steps_budget: int | None = None) -> dict:
    """Train one point (role student: KD from `soft`; baseline: labels only) and read its validation record."""
    t0 = time.perf_counter()
    _, trainer = fit_student(cfg, splits, role, device, info, soft if role == "student" else None, steps_budget)
    best = kept_record(trainer.history)
    return {"val_score": trainer.best_score, "steps": trainer.total_steps, "best_epoch": best.get("epoch"),
            "val": validation_headline(best),
            "seconds": round(time.perf_counter() - t0, 1)}


def combination_for(cfg: ExperimentConfig, splits: Splits, device) -> Combination:
    """The weighting's combination fitted on validation, without touching the run's combination.json."""
    val = image_set(splits, splits.val, splits.data.spec.tasks, role_preprocessing(cfg, "teachers"))
    return load_calibrated_ensemble(teacher_paths(cfg, splits), val, cfg.run_dir, cfg.teachers.ensemble_weighting,
                                    device, cfg.teachers.train.eval_batch_size, write=False)[1]


def sweep(config: str | None, overrides: list[str], points: list[Point], steps: int | None, baseline: bool,
          device, info: DistInfo) -> list[dict]:
    """Run every point (and the baseline reference); records sorted best first by validation score."""
    base = load_experiment(config, overrides)
    splits = load_splits(base, info)
    soft = teacher_soft_targets(base, splits, device, info)  # the cache `make student` uses
    digest = hashlib.sha256(json.dumps(teacher_hashes(teacher_paths(base, splits)), sort_keys=True).encode())
    root = base.layout.sweep_dir / digest.hexdigest()[:10]
    combos = {}
    records = []
    for point in points:
        cfg = budgeted(load_experiment(config, [*overrides, *point.overrides()]), steps)
        if point.weighting not in combos:
            combos[point.weighting] = combination_for(cfg, splits, device)
        # The cached logits recombined with this weighting's temperatures and weights. The pool's greedy
        # sentences (text_tokens) stay those decoded with the run's own weighting: re-decoding per point
        # would cost a pass of every text teacher over the pool.
        point_soft = dataclasses.replace(soft, combination=combos[point.weighting])
        cfg = dataclasses.replace(cfg, runs_root=str(root), name=point.name)
        print(f"=== sweep point {point.name} ===", flush=True)
        records.append({"point": point.name, "group": dataclasses.replace(point, seed=None).name,
                        **dataclasses.asdict(point), **run_point(cfg, splits, point_soft, "student", device, info)})
    if baseline:
        records += baselines(config, overrides, records, steps, root, splits, soft, device, info)
    return sorted(records, key=lambda r: -r["val_score"])


def baselines(config: str | None, overrides: list[str], students: list[dict], steps: int | None, root,
              splits: Splits, soft: SoftTargets, device, info: DistInfo) -> list[dict]:
    """One labels-only reference per training length and seed, with the same optimizer steps as the
    longest student point of that length; each student record is told its reference's name."""
    longest: dict = {}  # training length -> the most steps a point of that length took
    for r in students:
        longest[r["epochs"]] = max(longest.get(r["epochs"], 0), r["steps"])
    budgets = sorted(set(longest.values()))
    seeds = sorted({r["seed"] for r in students}, key=lambda sd: -1 if sd is None else sd)
    refs = {}
    for budget in budgets:
        for seed in seeds:
            base = budgeted(load_experiment(config, [*overrides, *seed_overrides(seed)]), steps)
            cfg = dataclasses.replace(base, runs_root=str(root), name=f"baseline-{budget}steps{seed_suffix(seed)}")
            print(f"=== sweep reference: labels-only baseline, {budget} steps{seed_suffix(seed)} ===", flush=True)
            notes = [f"{budget} steps"] * (len(budgets) > 1)
            group = "labels-only baseline" + (f" ({notes[0]})" if notes else "")
            notes += [f"seed {seed}"] * (seed is not None)
            name = "labels-only baseline" + (f" ({', '.join(notes)})" if notes else "")
            refs[budget, seed] = {"point": name, "group": group, "alpha": None, "temperature": None, "schedule": None,
                                  "weighting": None, "labelled_share": None, "epochs": None, "seed": seed,
                                  **run_point(cfg, splits, soft, "baseline", device, info, budget)}
    for r in students:
        r["baseline"] = refs[longest[r["epochs"]], r["seed"]]["point"]
    return list(refs.values())


def markdown(records: list[dict], columns: list[tuple[str, str]], title: str) -> str:
    """The sweep table, best first: the parameters, the selection score and the headline metrics; with
    more than one seed, a seed column and the tables over the seeds (train/seed_spread.py)."""
    seeded = any(r.get("seed") is not None for r in records)  # older sweep.json files have no seeds
    head = ["point", "alpha", "temperature", "schedule", "weighting", "labelled share", *["seed"] * seeded,
            "val score", *[c for _, c in columns], "steps"]
    lines = [title, "", *table_head(head)]
    for r in records:
        temp = CONFIGURED if r["temperature"] is None and r["alpha"] is not None else r["temperature"]
        share = r.get("labelled_share") or ("natural" if r["alpha"] is not None else None)
        params = (r["alpha"], temp, r["schedule"], r["weighting"], share, *[r.get("seed")] * seeded)
        cells = [r["point"], *("—" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in params),
                 f"{r['val_score']:.4f}"]
        for key, _ in columns:
            v = r["val"].get(key)
            cells.append("—" if v is None else f"{to_points(key, v):.1f}")
        lines.append(table_row([*cells, r["steps"]]))
    return "\n".join(lines) + "\n" + seed_tables(records, columns)


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--alpha", type=float, nargs="+", help="KD weights on labelled images (0..1)")
    parser.add_argument("--temperature", nargs="+", help=f"KD temperatures for every task, or '{CONFIGURED}'")
    parser.add_argument("--schedule", nargs="+", choices=("joint", "staged"))
    parser.add_argument("--weighting", nargs="+", choices=WEIGHTINGS, help="ensemble weighting of the soft targets")
    parser.add_argument("--labelled-share", nargs="+", metavar="S|natural",
                        help="share of labelled images in each joint epoch (student.kd.labelled_share)")
    parser.add_argument("--epochs", type=int, nargs="+", help="student training lengths (student.train.epochs); "
                        "each length gets its own step-matched baseline")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds: every point and its baseline "
                        "once per seed, with the spread over the seeds in sweep.md")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per point (default: the config's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the labels-only reference row")
    args = parser.parse_args(argv)
    for t in args.temperature or []:
        if t != CONFIGURED and not _positive(t):
            parser.error(f"--temperature {t!r}: give positive numbers or '{CONFIGURED}'")
    for e in args.epochs or []:
        if e < 1:
            parser.error(f"--epochs {e}: give whole numbers of at least 1")
    if args.seeds and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: give distinct whole numbers of at least 0")
    for m in args.labelled_share or []:
        if m != "natural" and not (_positive(m) and float(m) <= 1):
            parser.error(f"--labelled-share {m!r}: give shares in (0, 1] or 'natural'")
    try:
        base = load_experiment(args.config, config_overrides(args))
        info, device = init_distributed(base.device)
        points = grid(base, args.alpha, args.temperature, args.schedule, args.weighting, args.labelled_share,
                      args.epochs, args.seeds)
        records = sweep(args.config, config_overrides(args), points, args.steps, not args.no_baseline, device, info)
        tasks = load_splits(base).data.spec.tasks
        title = (f"# KD sweep ({base.name}): validation split, {len(points)} points, best first\n\n"
                 f"Selection score = the checkpoint-selection metric on validation; accuracies in %, BLEU 0-100.")
        md = markdown(records, summary_columns(tasks), title)
        # The tasks go with the records, so the table can be drawn from this file alone (a run that only
        # swept has no summary.json to name them).
        report = {"tasks": [t.to_dict() for t in tasks], "records": records}
        atomic_write_text(base.layout.sweep_report("json"), json.dumps(report, indent=1))
        atomic_write_text(base.layout.sweep_report("md"), md)
        print(md, flush=True)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

"""Train the teacher ensemble: one multi-task teacher per subset of the tasks (Chelaramani et al.).

    python -m train.teachers --config configs/default.yaml            # every teacher, one after another
    python -m train.teachers --config configs/default.yaml --only teacher_coarse_fine
    python -m train.teachers --list                                   # the teacher names
    make -j 4 teacher-teacher_coarse teacher-teacher_fine ...         # independent runs in parallel
    torchrun --nproc_per_node 8 -m train.teachers --only teacher_coarse   # DDP on one node

Each teacher is an independent run in runs/<name>/teachers/<teacher>/ that resumes where it was killed;
a finished teacher is skipped. With several GPUs and no torchrun, `--gpu auto` puts teacher i on GPU
i mod count, so parallel make jobs spread over the GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from deploy.errors import RunFailed
from train import progress
from train.budget import teacher_train_config
from train.config import ConfigError, to_dict
from train.distributed import DistInfo, init_distributed, shutdown_distributed
from train.experiment import (
    ExperimentConfig,
    TeacherSpec,
    add_config_args,
    config_overrides,
    load_experiment,
    role_preprocessing,
    teacher_specs,
)
from train.fit_check import check_preprocessing, dataset_fingerprint
from train.layout import FINAL, LAST_CHECKPOINT, meta_sidecar
from train.loop import EpochPlan, Trainer, config_fingerprint, seed_everything
from train.losses import MultiTaskLoss
from train.metrics import headline
from train.models.saved import load_model
from train.parallel import Job, auto_jobs, run_parallel
from train.progress import stage
from train.stage import (
    Splits,
    build_model,
    class_weights,
    evaluate_model,
    flat_headline,
    image_set,
    load_splits,
    save_resolved,
    write_final,
)
from train.stage_times import run_stage


def supervised_step(loss_fn: MultiTaskLoss, text_task: str | None):
    """Labels only: cross-entropy per task on the images labelled for it (teacher forcing for text)."""

    def step(model, batch, mode):
        text_targets = batch[text_task] if text_task else None
        out = model(batch["image"], text_targets=text_targets)
        targets = {k: batch[k] for k in out}
        return loss_fn(out, targets, None, batch["labelled"])

    return step


def ensure_same_config(out_dir: Path, meta: dict) -> None:
    """A finished run is reused only if it was trained with the same config; else say how to redo it."""
    sidecar = meta_sidecar(out_dir / LAST_CHECKPOINT)
    recorded = json.loads(sidecar.read_text()).get("fingerprint") if sidecar.exists() else None
    if recorded != config_fingerprint(meta):
        raise ConfigError(f"{out_dir} was trained with a different config; delete it to retrain, or use "
                           f"another experiment name (name=...)")


def train_teacher(cfg: ExperimentConfig, spec: TeacherSpec, splits: Splits, device: torch.device,
                  info: DistInfo) -> dict:
    """Train (or resume, or skip if finished) one teacher; returns its test metrics."""
    out_dir = cfg.layout.teacher_dir(spec.name)
    model_cfg = dataclasses.replace(spec.model or cfg.teachers.model, tasks=list(spec.tasks))
    seed_everything(cfg.seed)
    model = build_model(model_cfg, splits.data, spec.tasks).to(device)
    tasks = [splits.data.spec.task(n) for n in spec.tasks]
    pre = role_preprocessing(cfg, "teachers")
    train_rows = [r for r in splits.train if any(r.labels.get(t) for t in spec.tasks)]
    train_set = image_set(splits, train_rows, tasks, pre, cfg.teachers.train.augment)
    val_set = image_set(splits, splits.val, tasks, pre)
    text = next((t.name for t in tasks if t.kind == "text"), None)
    tcfg = teacher_train_config(cfg, splits, info.world_size)  # the budget policy (teachers.budget_multiple)
    loss_fn = MultiTaskLoss(tasks, class_weights=class_weights(train_set, tasks, tcfg.class_balance))

    def evaluate(m):
        score, metrics = evaluate_model(m, val_set, tasks, device, tcfg.eval_batch_size, info, tcfg.select_metric)
        return score, flat_headline(metrics, tasks)

    meta = {"role": "teacher", "name": spec.name, "preprocessing": pre.to_dict(),
            "config": {"model": to_dict(model_cfg), "train": to_dict(tcfg), "seed": cfg.seed,
                       "data": to_dict(cfg.data), "image_size": pre.size,
                       "dataset": dataset_fingerprint(splits.data)}}
    check_preprocessing(cfg.layout.teacher_checkpoint(spec.name), pre)  # not reused/resumed on other pixels
    final = out_dir / FINAL
    if final.exists():
        ensure_same_config(out_dir, meta)
        progress.log(f"{progress.tag(spec.name)} already trained: {final}")
        return json.loads(final.read_text())["metrics"]
    trainer = Trainer(name=spec.name, model=model, train_set=train_set,
                      plan=lambda epoch: EpochPlan(np.arange(len(train_set)), "labels"),
                      step=supervised_step(loss_fn, text), evaluate=evaluate, cfg=tcfg, out_dir=out_dir,
                      seed=cfg.seed, device=device, info=info, meta=meta)
    if info.is_main:
        save_resolved(cfg, out_dir)
    best = trainer.fit()
    model, _ = load_model(best)
    model.to(device).eval()
    test_set = image_set(splits, splits.test, tasks, pre)
    _, metrics = evaluate_model(model, test_set, tasks, device, tcfg.eval_batch_size, info)
    if info.is_main:
        write_final(out_dir, spec.name, metrics, tasks, {"tasks": spec.tasks, "checkpoint": str(best)})
        heads = {k: round(v, 4) for k, v in headline(metrics, tasks).items()}
        progress.log(f"{progress.tag(spec.name)} test: {heads}")
    return metrics


def teacher_label(specs: list[TeacherSpec], name: str) -> str:
    """'teachers 3/7': the teacher's place in the whole ensemble (also when --only picks a few)."""
    index = [s.name for s in specs].index(name)
    return f"teachers {index + 1}/{len(specs)}"


def job_count(text: str, teachers: int) -> int:
    """--jobs as a number of parallel teacher processes."""
    if text == "auto":
        return auto_jobs(teachers, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--jobs {text!r}: give a positive number or 'auto'")
    return min(int(text), max(1, teachers))


def train_in_parallel(cfg: ExperimentConfig, config: str, overrides: list[str], specs: list[TeacherSpec],
                      jobs: int, all_specs: list[TeacherSpec] | None = None) -> int:
    """Each teacher in its own `python -m train.teachers --only` process, `jobs` at a time; `config` and
    `overrides` are what `cfg` was loaded from; `all_specs` (default `specs`) number them "teachers 3/7"."""
    base = ["-m", "train.teachers", "--config", config, *overrides]
    # Longest first (more heads, more work): the last teacher does not run alone while cores idle.
    ordered = sorted(specs, key=lambda s: -len(s.tasks))
    todo = [Job(s.name, [*base, "--only", s.name], cfg.layout.teacher_dir(s.name) / "train.log",
                teacher_label(all_specs or specs, s.name)) for s in ordered]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and cfg.device != "cpu" else 0
    failed = [o.name for o in run_parallel(todo, jobs, gpus) if o.returncode != 0]
    if failed:
        raise RunFailed(f"teacher(s) {failed} failed (their train.log says why); the others are kept, "
                        f"and `make teachers` resumes only what is missing")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.teachers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--only", action="append", default=[], help="train only this teacher (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the teacher names and exit")
    parser.add_argument("--gpu", default=None, help="'auto': teacher i on GPU i mod count (parallel make)")
    parser.add_argument("--jobs", default="1", metavar="N|auto",
                        help="teachers trained at once as separate processes ('auto': one per GPU, else one "
                             "per core, threads split evenly); logs in each teacher's folder")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.config, config_overrides(args))
        if args.list:
            from train.data.manifest import load_spec

            print(" ".join(s.name for s in teacher_specs(cfg, load_spec(cfg.data.root).task_names)))
            return 0
        info, device = init_distributed(cfg.device)
        splits = load_splits(cfg, info)
        specs = teacher_specs(cfg, splits.data.spec.task_names)
        unknown = set(args.only) - {s.name for s in specs}
        if unknown:
            raise ConfigError(f"unknown teacher(s) {sorted(unknown)}; teachers: {[s.name for s in specs]}")
        chosen = [s for s in specs if not args.only or s.name in args.only]
        jobs = job_count(args.jobs, len(chosen))
        if jobs > 1 and not info.enabled:
            return train_in_parallel(cfg, args.config, config_overrides(args), chosen, jobs, specs)
        for i, spec in enumerate(specs):
            if args.only and spec.name not in args.only:
                continue
            if args.gpu == "auto" and torch.cuda.device_count() > 1 and not info.enabled:
                device = torch.device(f"cuda:{i % torch.cuda.device_count()}")
            with stage(teacher_label(specs, spec.name), cfg.run_dir):
                train_teacher(cfg, spec, splits, device, info)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "teachers", skip_flags=("--list",)))

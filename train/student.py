"""Distill the teacher ensemble into the student, train the labels-only baseline, evaluate everything.

    python -m train.student --config configs/default.yaml [student.kd.schedule=staged ...]
    torchrun --nproc_per_node 4 -m train.student --config configs/paper.yaml

Loss (per task, see train.losses.MultiTaskLoss): labelled images (1-α)·CE + α·KD, unlabelled images KD
only; KD = T²·KL against the ensemble's softened outputs (teachers lacking a head do not vote on it).
The diagnosis head learns token-level KL along the reference (labelled) or the ensemble's greedy
diagnosis (unlabelled), plus cross-entropy on that greedy diagnosis (sequence-level KD). Teacher outputs
are computed once and cached. The baseline is the same network with the same number of optimizer steps
on the labelled images only, so the effect of distillation is measured, not assumed.
Outputs: runs/<name>/{student,baseline}/ and runs/<name>/summary.{json,md} (test split).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import torch

from deploy.fileio import sha256_file
from train.budget import student_plan, student_train_config
from train.calibrate import teacher_ensemble, teacher_paths
from train.config import to_dict
from train.distributed import DistInfo, init_distributed, shutdown_distributed
from train.ensemble import (
    SoftTargets,
    compute_soft_targets,
    load_soft_targets,
    save_soft_targets,
)
from train.experiment import (
    ExperimentConfig,
    TrainConfig,
    add_config_args,
    config_overrides,
    load_experiment,
    role_preprocessing,
)
from train.fit_check import check_preprocessing, dataset_fingerprint
from train.loop import EpochPlan, Trainer, seed_everything
from train.losses import MultiTaskLoss, sequence_ce
from train.models.saved import load_model
from train.pool import student_rows
from train.progress import stage
from train.stage import (
    Splits,
    build_model,
    class_weights,
    evaluate_model,
    evaluate_outputs,
    flat_headline,
    image_set,
    load_splits,
    save_resolved,
    write_final,
)
from train.stage_times import run_stage
from train.summary import SplitOutputs, declares_normal, write_summary
from train.teachers import supervised_step


def budget_config(tcfg: TrainConfig, n_items: int, world_size: int, steps_budget: int | None) -> TrainConfig:
    """The baseline's schedule: the student's optimizer-step budget, spent on `n_items` labelled images.

    Epochs = ceil(budget / steps per epoch), each capped at ceil(budget / epochs) steps, so the total is
    the budget (at most epochs - 1 steps more)."""
    per_epoch = math.ceil(math.ceil(n_items / world_size) / tcfg.batch_size)
    budget = steps_budget or per_epoch * tcfg.epochs
    epochs = max(1, math.ceil(budget / per_epoch))
    return dataclasses.replace(tcfg, epochs=epochs, max_steps_per_epoch=math.ceil(budget / epochs))


def distill_step(loss_fn: MultiTaskLoss, soft: SoftTargets, cfg: ExperimentConfig, text_task: str | None):
    """KD step: soft targets are looked up in the cache by the batch's item index."""
    kd = cfg.student.kd

    def step(model, batch, mode):
        if mode == "labels":
            return supervised_step(loss_fn, text_task)(model, batch, mode)
        idx = batch["index"].cpu()
        labelled = batch["labelled"]
        targets = {t.name: batch[t.name] for t in loss_fn.tasks}
        if text_task:  # unlabelled rows are forced on the ensemble's greedy diagnosis
            targets[text_task] = soft.text_tokens[idx].to(labelled.device)
        out = model(batch["image"], text_targets=targets.get(text_task))
        soft_batch, extra, parts = {}, 0.0, {}
        for task in loss_fn.tasks:
            if task.kind == "text" and not kd.token_kd:
                continue
            # The ensemble's calibrated/weighted combination (train.ensemble): class probabilities, or
            # token distributions along the text targets ([N, L, V]).
            probs = soft.class_probs if task.kind == "classification" else soft.token_probs
            soft_batch[task.name] = probs(task.name, idx, loss_fn.temperature(task.name),
                                          per_teacher=kd.ensemble_mode == "kl_sum").to(out[task.name].device)
        loss, comps = loss_fn(out, targets, soft_batch, labelled)
        if text_task and kd.sequence_kd and (~labelled).any():
            seq = sequence_ce(out[text_task][~labelled], targets[text_task][~labelled])
            extra = extra + seq
            parts[f"{text_task}/seq_kd"] = float(seq.detach())
        return loss + extra, {**comps, **parts}

    return step


def fit_student(cfg: ExperimentConfig, splits: Splits, role: str, device, info: DistInfo,
                soft: SoftTargets | None, steps_budget: int | None = None) -> tuple[torch.nn.Module, Trainer]:
    """Train the student (role "student", with KD) or the baseline (role "baseline", labels only)."""
    scfg = cfg.student
    tasks = splits.data.spec.tasks
    pre = role_preprocessing(cfg, "student")
    rows = student_rows(cfg, splits) if role == "student" else splits.train
    train_set = image_set(splits, rows, tasks, pre, scfg.train.augment)
    val_set = image_set(splits, splits.val, tasks, pre)
    text = next((t.name for t in tasks if t.kind == "text"), None)
    loss_fn = MultiTaskLoss(tasks, alpha=scfg.kd.alpha, temperatures=scfg.kd.temperatures,
                            default_temperature=scfg.kd.default_temperature,
                            class_weights=class_weights(train_set, tasks, scfg.train.class_balance))
    tcfg = scfg.train
    if role == "student":
        plan = student_plan(cfg, train_set.labelled)
        step = distill_step(loss_fn, soft, cfg, text)
        tcfg = student_train_config(cfg)  # staged: the sum of the stages' epochs
    else:
        tcfg = budget_config(tcfg, len(train_set), info.world_size, steps_budget)
        plan = lambda epoch: EpochPlan(np.arange(len(train_set)), "labels")  # noqa: E731
        step = supervised_step(loss_fn, text)
    seed_everything(cfg.seed)
    model = build_model(dataclasses.replace(scfg.model, tasks=None), splits.data, splits.data.spec.task_names)
    model.to(device)

    def evaluate(m):
        score, metrics = evaluate_model(m, val_set, tasks, device, tcfg.eval_batch_size, info, tcfg.select_metric)
        return score, flat_headline(metrics, tasks)

    meta = {"role": role, "name": role, "preprocessing": pre.to_dict(),
            # The baseline never sees KD: its fingerprint leaves kd out, so retuning KD does not retrain it
            # (the student's step budget that it shares is in its train config).
            "config": {"model": to_dict(scfg.model), "train": to_dict(tcfg),
                       **({"kd": to_dict(scfg.kd)} if role == "student" else {}),
                       "seed": cfg.seed, "data": to_dict(cfg.data), "image_size": pre.size,
                       "dataset": dataset_fingerprint(splits.data)}}
    if soft is not None and soft.combination.weighting != "mean":
        # A student distilled from other ensemble weights is another run (the plain mean keeps the
        # fingerprints of runs made before weighting existed).
        meta["config"]["ensemble"] = {k: v for k, v in soft.combination.to_dict().items() if k != "hashes"}
    out_dir = cfg.layout.model_dir(role)
    check_preprocessing(cfg.layout.checkpoint(role), pre)  # not resumed on other pixels
    trainer = Trainer(name=role, model=model, train_set=train_set, plan=plan, step=step, evaluate=evaluate,
                      cfg=tcfg, out_dir=out_dir, seed=cfg.seed, device=device, info=info, meta=meta)
    if info.is_main:
        save_resolved(cfg, out_dir)
    with stage(role, cfg.run_dir):
        best = trainer.fit()
    model, _ = load_model(best)
    return model.to(device).eval(), trainer


def teacher_soft_targets(cfg: ExperimentConfig, splits: Splits, device, info: DistInfo) -> SoftTargets:
    """The ensemble's outputs on the student's training images, cached in runs/<name>/student/."""
    tasks = splits.data.spec.tasks
    ensemble, combination = teacher_ensemble(cfg, splits, device, info)
    paths = teacher_paths(cfg, splits)
    rows = student_rows(cfg, splits)
    spec = role_preprocessing(cfg, "teachers")
    key = {"rows": [r.path for r in rows], "preprocessing": spec.to_dict(),
           "teachers": {p.parent.name: sha256_file(p) for p in paths},
           "combination": {k: v for k, v in combination.to_dict().items() if k != "hashes"}}
    path = cfg.layout.teacher_outputs()
    soft = load_soft_targets(path, key)
    if soft is None:
        data = image_set(splits, rows, tasks, spec)
        soft = compute_soft_targets(ensemble, data, device, cfg.teachers.train.eval_batch_size, combination)
        if info.is_main:
            save_soft_targets(path, soft, key)
    return soft


def run(cfg: ExperimentConfig, info: DistInfo, device) -> dict:
    splits = load_splits(cfg, info)
    soft = teacher_soft_targets(cfg, splits, device, info)
    student, trainer = fit_student(cfg, splits, "student", device, info, soft)
    baseline = None
    if cfg.student.baseline:
        budget = trainer.total_steps
        baseline, _ = fit_student(cfg, splits, "baseline", device, info, None, steps_budget=budget)
    return summarize(cfg, splits, {"student": student, "baseline": baseline}, device, info)


def summarize(cfg: ExperimentConfig, splits: Splits, models: dict[str, torch.nn.Module | None], device,
              info: DistInfo) -> dict:
    """Evaluate the trained student and baseline on test (and validation, for operating points), write
    their final.json and the run's summary; -> their test metrics."""
    tasks = splits.data.spec.tasks
    spec = role_preprocessing(cfg, "student")
    test = image_set(splits, splits.test, tasks, spec)
    # Operating points of a declared normal class are chosen on validation (train/clinical.py).
    val = image_set(splits, splits.val, tasks, spec) if declares_normal(tasks) else None
    results, outputs = {}, {}
    for role, model in models.items():
        if model is not None:
            test_out, metrics = evaluate_outputs(model, test, tasks, device, 64, info)
            val_out = evaluate_outputs(model, val, tasks, device, 64, info)[0] if val is not None else None
            results[role], outputs[role] = metrics, SplitOutputs(test_out, val_out)
            if info.is_main:
                write_final(cfg.layout.model_dir(role), role, metrics, tasks)
    if info.is_main:
        write_summary(cfg, splits, results, device, outputs)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.student", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.config, config_overrides(args))
        info, device = init_distributed(cfg.device)
        run(cfg, info, device)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "student"))

"""Fit the ensemble's combination on the validation split: per-teacher temperatures and weights.

    teachers.ensemble_weighting: mean             equal vote of the raw teachers (T = 1)
                                 calibrated_mean  equal vote, each teacher temperature-scaled
                                 quality_weighted temperature-scaled, weighted by validation quality

Calibration (Guo et al., 2017): one temperature T per teacher and task, minimising the validation
negative log-likelihood of softmax(z / T) (LBFGS on log T). Quality weights: the mixture
weights w (on the simplex) that minimise the validation NLL of sum_i w_i p_i, fitted by EM. That
objective is convex in w, so the fit is the global optimum, and it never does worse on validation
than the best single (calibrated) teacher, which is one corner of the simplex. Teachers that add
nothing beyond another one get little weight. Only rows labelled for the task count. The text task is
fitted the same way on its tokens: each teacher's next-token logits along the validation references
(teacher-forced), every reference token (its <eos> included) one sample, so a teacher that writes
worse sentences gets less say in the ensemble's greedy decoding and in the student's token targets.

The result goes to runs/<name>/ensemble/combination.json (reused while teachers, validation rows,
preprocessing and weighting are unchanged) with each teacher's temperature, weight and validation
NLL/accuracy (token accuracy for the text task), and is printed as a table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from deploy.fileio import atomic_write_text
from deploy.vocab import PAD_ID
from train.datasets import FundusImages, model_input
from train.distributed import DistInfo
from train.ensemble import (
    Combination,
    TeacherEnsemble,
    combination_path,
    load_ensemble,
    teacher_hashes,
)
from train.experiment import ExperimentConfig, role_preprocessing, teacher_specs
from train.fit_check import check_checkpoint, check_preprocessing
from train.stage import Splits, image_set

# Bounds on a fitted temperature. On a small validation set that a teacher gets entirely right the NLL
# keeps falling as T -> 0 (and as T -> inf for one it gets entirely wrong), and a few dozen images can
# ask for logits x20: the bounds stop the fit where it stops being calibration (at most 4x sharper:
# a sharpened teacher's soft targets carry less of the "dark knowledge" KD needs). NLL is convex in
# 1/T, so clamping the unconstrained optimum gives the constrained one.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.25, 10.0
EM_MAX_ITER, EM_TOL = 1000, 1e-7


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true classes; probs [N, C], labels [N]."""
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    return float(-picked.clamp_min(1e-12).log().mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits [N, C], labels [N])."""
    logits, labels = logits.detach().float(), labels.long()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE) if math.isfinite(t) else 1.0


def fit_mixture_weights(true_class_probs: torch.Tensor) -> torch.Tensor:
    """Weights w [T] on the simplex maximising mean_n log sum_i w_i p_i[n] (EM; p [T, N] = each
    teacher's probability of the true class). Starts from, and keeps ties at, equal weights."""
    p = true_class_probs.double().clamp_min(1e-12)
    w = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=torch.float64)
    for _ in range(EM_MAX_ITER):
        joint = w[:, None] * p
        new = (joint / joint.sum(0, keepdim=True)).mean(1)
        done = float((new - w).abs().max()) < EM_TOL
        w = new
        if done:
            break
    return (w / w.sum()).float()


@torch.no_grad()
def validation_logits(ensemble: TeacherEnsemble, data: FundusImages, device: torch.device,
                      batch_size: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """task -> (teacher logits [T_members, M, C], labels [M]) on the labelled samples of `data`: the
    images labelled for a classification task; the reference tokens of the text task, teacher-forced."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        feats, logits = ensemble.teacher_outputs(model_input(batch["image"], device))
        for name, values in logits.items():
            keep = batch[name] >= 0  # -1: no label for this task
            parts.setdefault(name, []).append((torch.stack(values).float().cpu()[:, keep], batch[name][keep]))
        if ensemble.text_task:
            refs = batch[ensemble.text_task].to(device)
            _, token_logits = ensemble.decode(feats, forced=refs)  # [T, N, L, V] along the references
            keep = (refs != PAD_ID).cpu()  # step j predicts reference token j; padding is no token
            parts.setdefault(ensemble.text_task, []).append((token_logits.float().cpu()[:, keep], refs.cpu()[keep]))
    return {k: (torch.cat([lg for lg, _ in v], 1), torch.cat([y for _, y in v]).long()) for k, v in parts.items()}


def fit_task(logits: torch.Tensor, labels: torch.Tensor, weighting: str) -> tuple[list[float], list[float], dict]:
    """(temperatures, weights, report) for one task; logits [T, N, C], labels [N] (all labelled)."""
    n = logits.shape[0]
    if weighting == "mean" or len(labels) == 0:
        temps = [1.0] * n
    else:
        temps = [fit_temperature(lg, labels) for lg in logits]
    probs = torch.stack([(lg / t).softmax(-1) for lg, t in zip(logits, temps)])  # [T, N, C]
    if weighting == "quality_weighted" and len(labels):
        weights = fit_mixture_weights(probs.gather(2, labels[None, :, None].expand(n, -1, 1)).squeeze(2))
    else:
        weights = torch.full((n,), 1.0 / n)
    report = {"validation_rows": len(labels)}
    if len(labels):
        raw_mean = torch.stack([lg.softmax(-1) for lg in logits]).mean(0)
        combined = (weights[:, None, None] * probs).sum(0)
        report |= {"nll_raw": [nll(lg.softmax(-1), labels) for lg in logits],
                   "nll_calibrated": [nll(p, labels) for p in probs],
                   "accuracy": [float((lg.argmax(-1) == labels).float().mean()) for lg in logits],
                   "ensemble_nll_plain_mean": nll(raw_mean, labels), "ensemble_nll": nll(combined, labels),
                   "ensemble_accuracy": float((combined.argmax(-1) == labels).float().mean())}
        # The ensemble is worth distilling only if it beats its best member: say so when it does not.
        report["below_best_teacher"] = report["ensemble_accuracy"] < max(report["accuracy"])
    return temps, weights.tolist(), report


def fit_combination(ensemble: TeacherEnsemble, val: FundusImages, device: torch.device, weighting: str,
                    names: list[str], batch_size: int = 64) -> tuple[Combination, dict]:
    """Fit temperatures/weights of every task on `val` (the text task on its tokens); (combination, report)."""
    combination = Combination(weighting=weighting, teachers=list(names))
    report = {}
    for task, (logits, labels) in validation_logits(ensemble, val, device, batch_size).items():
        temps, weights, rep = fit_task(logits, labels, weighting)
        combination.temperatures[task], combination.weights[task] = temps, weights
        members = [names[i] for i in ensemble._members(task)]
        unit = "tokens" if task == ensemble.text_task else "images"
        report[task] = {"teachers": members, "temperature": temps, "weight": weights, "unit": unit, **rep}
    return combination, report


def format_report(combination: Combination, report: dict) -> str:
    """A markdown table per task: teacher, temperature, weight, validation accuracy and NLL."""
    lines = [f"Ensemble weighting: {combination.weighting} (validation split)"]
    for task, rep in report.items():
        lines += ["", f"{task} ({rep['validation_rows']} labelled validation {rep.get('unit', 'images')}; ensemble NLL "
                  f"{rep.get('ensemble_nll', float('nan')):.4f}, plain mean "
                  f"{rep.get('ensemble_nll_plain_mean', float('nan')):.4f})", "",
                  "| teacher | temperature | weight | val acc | val NLL raw | val NLL calibrated |", "|---" * 6 + "|"]
        for i, name in enumerate(rep["teachers"]):
            cells = [f"{rep['temperature'][i]:.3f}", f"{rep['weight'][i]:.3f}"]
            cells += [f"{rep[k][i]:.4f}" if k in rep else "—" for k in ("accuracy", "nll_raw", "nll_calibrated")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if rep.get("below_best_teacher"):
            what = "token accuracy" if rep.get("unit") == "tokens" else "accuracy"
            lines += ["", f"WARNING {task}: the ensemble ({100 * rep['ensemble_accuracy']:.1f} % validation "
                      f"{what}) is below its best teacher ({100 * max(rep['accuracy']):.1f} %); try "
                      f"teachers.ensemble_weighting=quality_weighted or stronger teachers (teachers.budget_multiple)"]
    return "\n".join(lines)


def calibrated_ensemble(ensemble: TeacherEnsemble, paths: list[Path], val: FundusImages, run_dir: Path,
                        weighting: str, device: torch.device, batch_size: int = 64,
                        write: bool = True) -> tuple[TeacherEnsemble, Combination]:
    """The ensemble with its fitted combination; reuses runs/<name>/ensemble/combination.json while
    its key (teachers, validation rows, preprocessing, weighting) matches, else refits and rewrites it."""
    names = [p.parent.name for p in paths]
    key = {"weighting": weighting, "teachers": teacher_hashes(paths), "rows": [r.path for r in val.rows],
           "preprocessing": val.spec.to_dict()}
    key = json.loads(json.dumps(key))  # as stored: tuples become lists
    path = combination_path(run_dir)
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored.get("key") == key:
        combination = Combination.from_dict(stored["combination"])
    else:
        combination, report = fit_combination(ensemble, val, device, weighting, names, batch_size)
        combination.hashes = key["teachers"]
        if write:
            record = {"key": key, "combination": combination.to_dict(), "report": report}
            atomic_write_text(path, json.dumps(record, indent=1))
            atomic_write_text(path.with_suffix(".md"), format_report(combination, report) + "\n")
        print(format_report(combination, report), flush=True)
    return ensemble.set_combination(combination), combination


def load_calibrated_ensemble(paths: list[Path], val: FundusImages, run_dir: Path, weighting: str,
                             device: torch.device, batch_size: int = 64,
                             write: bool = True) -> tuple[TeacherEnsemble, Combination]:
    """Load the teachers and give them their fitted combination (see `calibrated_ensemble`)."""
    ensemble = load_ensemble(paths, val.tasks, device)
    return calibrated_ensemble(ensemble, paths, val, run_dir, weighting, device, batch_size, write)


def teacher_paths(cfg: ExperimentConfig, splits: Splits) -> list[Path]:
    """The best checkpoint of every configured teacher, in ensemble order."""
    return [cfg.layout.teacher_checkpoint(s.name) for s in teacher_specs(cfg, splits.data.spec.task_names)]


def teacher_ensemble(cfg: ExperimentConfig, splits: Splits, device: torch.device,
                     info: DistInfo | None = None) -> tuple[TeacherEnsemble, Combination]:
    """The experiment's ensemble, combined as `teachers.ensemble_weighting` says: the one place the
    student's soft targets and the summary's ensemble row get it from (export/bench read the JSON)."""
    pixels = role_preprocessing(cfg, "teachers")  # soft targets and the ensemble row see the teachers' input
    val = image_set(splits, splits.val, splits.data.spec.tasks, pixels)
    for path in teacher_paths(cfg, splits):
        if path.exists():  # a missing one is named by load_ensemble
            check_checkpoint(path, splits.data)  # trained for this dataset's tasks, classes, vocabulary
            check_preprocessing(path, pixels)  # ... and on these pixels (teachers.mean/std unchanged since)
    return load_calibrated_ensemble(teacher_paths(cfg, splits), val, cfg.run_dir, cfg.teachers.ensemble_weighting,
                                    device, cfg.teachers.train.eval_batch_size, write=info is None or info.is_main)

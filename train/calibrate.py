"""Fit the ensemble's combination on the validation split: per-teacher temperatures and weights.

    teachers.ensemble_weighting: mean             equal vote of the raw teachers (T = 1)
                                 calibrated_mean  equal vote, each teacher temperature-scaled
                                 quality_weighted temperature-scaled, weighted by validation quality

Calibration (Guo et al., 2017): one temperature T per teacher and task, minimising the validation
negative log-likelihood of softmax(z / T) (LBFGS on log T). Quality weights: the mixture
weights w (on the simplex) that minimise the validation NLL of sum_i w_i p_i, fitted by EM, shrunk
towards the equal vote: w = (1 - s) w_fit + s / T_members (the MAP fit under a symmetric Dirichlet
prior). The unshrunk fit is the in-sample optimum and overfits a small validation split: on the
default's 198 images it put all coarse weight on two of four near-equal teachers and its held-out NLL
was twice the equal vote's. So s is chosen from SHRINKAGE_GRID by the NLL of CV_FOLDS-fold
cross-validation on the validation split (temperatures and weights refitted without the held-out
images; the text task's folds hold out whole sentences), a tie going to the larger s. Strong, distinct
teachers keep their weights (s near 0), near-equal ones get the equal vote (s = 1); the report lists
the cross-validated NLL of every s. Only rows labelled for the task count. The text task is
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
from deploy.markdown import table_head, table_row
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
# Shrinkage of the quality weights towards the equal vote (0: the in-sample fit, 1: the equal vote),
# chosen by cross-validation on the validation split; fewer labelled groups than folds: the equal vote.
SHRINKAGE_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
CV_FOLDS = 5
CV_SEED = 0
# Part of a stored combination's key: a change of the fitting rule refits it.
FIT_RULE = {"shrinkage_grid": list(SHRINKAGE_GRID), "cv_folds": CV_FOLDS, "cv_seed": CV_SEED}


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


def fit_mixture_weights(true_class_probs: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """Weights w [T] on the simplex maximising mean_n log sum_i w_i p_i[n] (EM; p [T, N] = each
    teacher's probability of the true class), shrunk towards 1/T by `shrinkage` in every M-step (the
    MAP fit under a symmetric Dirichlet prior). Starts from, and keeps ties at, equal weights."""
    p = true_class_probs.double().clamp_min(1e-12)
    w = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=torch.float64)
    for _ in range(EM_MAX_ITER):
        joint = w[:, None] * p
        new = (1 - shrinkage) * (joint / joint.sum(0, keepdim=True)).mean(1) + shrinkage / p.shape[0]
        done = float((new - w).abs().max()) < EM_TOL
        w = new
        if done:
            break
    return (w / w.sum()).float()


@torch.no_grad()
def validation_logits(ensemble: TeacherEnsemble, data: FundusImages, device: torch.device, batch_size: int = 64
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """task -> (teacher logits [T_members, M, C], labels [M], image index [M]) on the labelled samples of
    `data`: the images labelled for a classification task; the reference tokens of the text task,
    teacher-forced (a sentence's tokens share its image index: cross-validation holds them out together)."""
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    start = 0
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        feats, logits = ensemble.teacher_outputs(model_input(batch["image"], device))
        index = torch.arange(start, start + len(batch["image"]))
        start += len(index)
        for name, values in logits.items():
            keep = batch[name] >= 0  # -1: no label for this task
            parts.setdefault(name, []).append((torch.stack(values).float().cpu()[:, keep], batch[name][keep], index[keep]))
        if ensemble.text_task:
            refs = batch[ensemble.text_task].to(device)
            _, token_logits = ensemble.decode(feats, forced=refs)  # [T, N, L, V] along the references
            keep = (refs != PAD_ID).cpu()  # step j predicts reference token j; padding is no token
            parts.setdefault(ensemble.text_task, []).append(
                (token_logits.float().cpu()[:, keep], refs.cpu()[keep], index[:, None].expand_as(keep)[keep]))
    return {k: (torch.cat([p[0] for p in v], 1), torch.cat([p[1] for p in v]).long(), torch.cat([p[2] for p in v]))
            for k, v in parts.items()}


def calibrated_probs(logits: torch.Tensor, temps: list[float]) -> torch.Tensor:
    """softmax(z_i / T_i) of each teacher: [T, N, C] from logits [T, N, C]."""
    return torch.stack([(lg / t).softmax(-1) for lg, t in zip(logits, temps)])


def combine_probs(probs: torch.Tensor, weights: torch.Tensor | list[float]) -> torch.Tensor:
    """sum_i w_i p_i: the ensemble's probabilities [N, C] from each teacher's calibrated probs [T, N, C]."""
    return (torch.as_tensor(weights, dtype=probs.dtype)[:, None, None] * probs).sum(0)


def true_class_probs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each teacher's probability of the true class: [T, N] from probs [T, N, C]."""
    return probs.gather(2, labels[None, :, None].expand(probs.shape[0], -1, 1)).squeeze(2)


def cv_folds(groups: torch.Tensor, folds: int = CV_FOLDS) -> torch.Tensor | None:
    """Fold id [N] per row, whole groups (images) to one fold, shuffled with a fixed seed; None when
    there are fewer groups than folds."""
    unique, inverse = groups.unique(return_inverse=True)
    if len(unique) < folds:
        return None
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(CV_SEED))
    fold_of_group = torch.empty(len(unique), dtype=torch.long)
    fold_of_group[order] = torch.arange(len(unique)) % folds
    return fold_of_group[inverse]


def cross_validated_nll(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[float, float]:
    """Shrinkage -> held-out NLL of the quality-weighted mixture, every temperature and weight fitted
    without the held-out fold; {} when there are too few groups to cross-validate."""
    folds = cv_folds(groups)
    if folds is None:
        return {}
    held_out: dict[float, list[torch.Tensor]] = {s: [] for s in SHRINKAGE_GRID}
    for k in range(CV_FOLDS):
        fit, test = folds != k, folds == k
        temps = [fit_temperature(lg[fit], labels[fit]) for lg in logits]
        p = true_class_probs(calibrated_probs(logits, temps), labels).double()
        for s in SHRINKAGE_GRID:
            w = fit_mixture_weights(p[:, fit], s).double()
            held_out[s].append(-(w[:, None] * p[:, test]).sum(0).clamp_min(1e-12).log())
    return {s: float(torch.cat(v).mean()) for s, v in held_out.items()}


def choose_shrinkage(cv_nll: dict[float, float]) -> float:
    """The shrinkage with the lowest cross-validated NLL, a tie to the larger (closer to the equal
    vote: the simpler model); the equal vote (1.0) when nothing could be cross-validated."""
    if not cv_nll:
        return 1.0
    best = min(cv_nll.values())
    return max(s for s, v in cv_nll.items() if v <= best + 1e-9)


def fit_task(logits: torch.Tensor, labels: torch.Tensor, weighting: str, groups: torch.Tensor | None = None
             ) -> tuple[list[float], list[float], dict]:
    """(temperatures, weights, report) for one task; logits [T, N, C], labels [N] (all labelled), groups
    [N] the image of each row (default: every row its own; the cross-validation folds keep them whole)."""
    n = logits.shape[0]
    if weighting == "mean" or len(labels) == 0:
        temps = [1.0] * n
    else:
        temps = [fit_temperature(lg, labels) for lg in logits]
    probs = calibrated_probs(logits, temps)  # [T, N, C]
    report: dict = {"validation_rows": len(labels)}
    if weighting == "quality_weighted" and len(labels) and n > 1:  # one teacher: its weight is 1, nothing to fit
        cv_nll = cross_validated_nll(logits, labels, torch.arange(len(labels)) if groups is None else groups)
        shrinkage = choose_shrinkage(cv_nll)
        weights = fit_mixture_weights(true_class_probs(probs, labels), shrinkage)
        report |= {"shrinkage": shrinkage, "cv_nll": {f"{s:g}": v for s, v in cv_nll.items()}}
    else:
        weights = torch.full((n,), 1.0 / n)
    if len(labels):
        raw_mean = torch.stack([lg.softmax(-1) for lg in logits]).mean(0)
        combined = combine_probs(probs, weights)
        report |= {"nll_raw": [nll(lg.softmax(-1), labels) for lg in logits],
                   "nll_calibrated": [nll(p, labels) for p in probs],
                   "accuracy": [float((lg.argmax(-1) == labels).float().mean()) for lg in logits],
                   "ensemble_nll_plain_mean": nll(raw_mean, labels), "ensemble_nll": nll(combined, labels),
                   "ensemble_accuracy": float((combined.argmax(-1) == labels).float().mean())}
        # The ensemble is worth distilling only if it beats its best member: say so when it does not.
        report["below_best_teacher"] = report["ensemble_accuracy"] < max(report["accuracy"])
    return temps, weights.tolist(), report


@torch.no_grad()
def held_out_nll(ensemble: TeacherEnsemble, combination: Combination, data: FundusImages, device: torch.device,
                 batch_size: int = 64) -> dict[str, dict]:
    """task -> {"unit", "rows", "ensemble": NLL, "teachers": {name: NLL}} on the labelled rows of `data`
    (the test split): the ensemble as the student's soft targets combine it, each teacher at its own
    fitted temperature (the text task on its reference tokens). NLL is a proper score of the
    probabilities the student learns from, where accuracy sees only their argmax."""
    out = {}
    for task, (logits, labels, _) in validation_logits(ensemble, data, device, batch_size).items():
        if not len(labels):
            continue
        temps, weights = combination.for_task(task, logits.shape[0])
        probs = calibrated_probs(logits, temps.tolist())
        names = [combination.teachers[i] for i in ensemble._members(task)]
        out[task] = {"unit": "tokens" if task == ensemble.text_task else "images", "rows": len(labels),
                     "ensemble": nll(combine_probs(probs, weights), labels),
                     "teachers": {name: nll(p, labels) for name, p in zip(names, probs)}}
    return out


def fit_combination(ensemble: TeacherEnsemble, val: FundusImages, device: torch.device, weighting: str,
                    names: list[str], batch_size: int = 64) -> tuple[Combination, dict]:
    """Fit temperatures/weights of every task on `val` (the text task on its tokens); (combination, report)."""
    combination = Combination(weighting=weighting, teachers=list(names))
    report = {}
    for task, (logits, labels, groups) in validation_logits(ensemble, val, device, batch_size).items():
        temps, weights, rep = fit_task(logits, labels, weighting, groups)
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
                  *table_head(["teacher", "temperature", "weight", "val acc", "val NLL raw", "val NLL calibrated"])]
        for i, name in enumerate(rep["teachers"]):
            cells = [f"{rep['temperature'][i]:.3f}", f"{rep['weight'][i]:.3f}"]
            cells += [f"{rep[k][i]:.4f}" if k in rep else "—" for k in ("accuracy", "nll_raw", "nll_calibrated")]
            lines.append(table_row([name, *cells]))
        lines += _shrinkage_lines(rep) + _below_best_lines(task, rep, combination.weighting)
    return "\n".join(lines)


def _shrinkage_lines(rep: dict) -> list[str]:
    if "shrinkage" not in rep:
        return []
    if not rep["cv_nll"]:
        return ["", f"Weights: the equal vote (fewer than {CV_FOLDS} labelled images to cross-validate a fit)"]
    scores = ", ".join(f"s={s} {v:.4f}" for s, v in rep["cv_nll"].items())
    return ["", f"Weights shrunk towards the equal vote by s = {rep['shrinkage']:g}, the lowest {CV_FOLDS}-fold "
            f"cross-validated NLL on validation (s = 0: the in-sample fit, 1: the equal vote): {scores}"]


def _below_best_lines(task: str, rep: dict, weighting: str) -> list[str]:
    if not rep.get("below_best_teacher"):
        return []
    what = "tokens" if rep.get("unit") == "tokens" else "images"
    right = [round(a * rep["validation_rows"]) for a in (rep["ensemble_accuracy"], max(rep["accuracy"]))]
    advice = ("stronger teachers (teachers.budget_multiple)" if weighting == "quality_weighted" else
              "teachers.ensemble_weighting=quality_weighted or stronger teachers (teachers.budget_multiple)")
    return ["", f"WARNING {task}: the ensemble gets {right[0]} of {rep['validation_rows']} validation {what} right, "
            f"its best teacher {right[1]}; try {advice}"]


def calibrated_ensemble(ensemble: TeacherEnsemble, paths: list[Path], val: FundusImages, run_dir: Path,
                        weighting: str, device: torch.device, batch_size: int = 64,
                        write: bool = True) -> tuple[TeacherEnsemble, Combination]:
    """The ensemble with its fitted combination; reuses runs/<name>/ensemble/combination.json while
    its key (teachers, validation rows, preprocessing, weighting, fitting rule) matches, else refits and rewrites it."""
    names = [p.parent.name for p in paths]
    key = {"weighting": weighting, "teachers": teacher_hashes(paths), "rows": [r.path for r in val.rows],
           "preprocessing": val.spec.to_dict(), "fit": FIT_RULE}
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

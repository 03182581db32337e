"""Run a model (or the teacher ensemble) over a split and score it with train.metrics.

Outputs are collected over the *whole* split first (sharded across DDP ranks and gathered, never
averaged per batch, no batch dropped), then scored once. Compression and benchmarks reuse
`collect_outputs`/`score_outputs` so every number in the project comes from the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from deploy.contract import TaskSpec
from deploy.vocab import Vocabulary
from train import bootstrap, metrics
from train.datasets import FundusImages, model_input, reference_texts
from train.distributed import DistInfo, gather_objects

# images [N,3,H,W] -> {task: probs [N,C] | tokens [N,L]}
PredictFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def model_predict(model: torch.nn.Module) -> PredictFn:
    """Predict function of a MultiTaskNet: softmax probabilities and greedy token ids."""

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(images)
        result = {}
        for name, logits in out.items():
            result[name] = logits.argmax(-1) if logits.dim() == 3 else logits.float().softmax(-1)
        return result

    return predict


@torch.no_grad()
def collect_outputs(predict: PredictFn, data: FundusImages, device: torch.device, batch_size: int = 64,
                    info: DistInfo | None = None, amp: bool = False) -> dict[str, np.ndarray]:
    """Outputs for every item of `data`, in order. Under DDP each rank runs a strided shard."""
    info = info or DistInfo()
    shard = list(range(info.rank, len(data), info.world_size))
    loader = DataLoader(Subset(data, shard), batch_size=batch_size, shuffle=False)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        images = model_input(batch["image"], device)
        with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
            out = predict(images)
        for name, value in out.items():
            parts.setdefault(name, []).append(value.float().cpu().numpy() if value.is_floating_point()
                                              else value.cpu().numpy())
    local = {k: np.concatenate(v) for k, v in parts.items()}
    gathered = gather_objects((shard, local), info)
    if len(gathered) == 1:
        return local
    gathered = [(s, part) for s, part in gathered if s]  # a rank may get no item of a tiny split
    order = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in gathered])
    merged = {}
    for name in gathered[0][1]:
        stacked = np.concatenate([part[name] for _, part in gathered])
        result = np.empty_like(stacked)
        result[order] = stacked
        merged[name] = result
    return merged


def targets_of(data: FundusImages, tasks: list[TaskSpec]) -> dict[str, np.ndarray | list[str]]:
    """Metric targets: class ids for classification (-1 missing), reference sentences for text."""
    out: dict[str, np.ndarray | list[str]] = {}
    for t in tasks:
        out[t.name] = data.targets[t.name] if t.kind == "classification" else reference_texts(data.rows, t.name)
    return out


def score_outputs(outputs: dict[str, np.ndarray], data: FundusImages, tasks: list[TaskSpec],
                  vocab: Vocabulary | None) -> dict:
    """Full metrics per task (train.metrics.evaluate) for the tasks present in `outputs`, plus the joint
    accuracy of the dataset's declared task groups."""
    present = [t for t in tasks if t.name in outputs]
    # Per-class BLEU is grouped by the first classification task the model itself predicts.
    group = next((t.name for t in present if t.kind == "classification"), None)
    joint = [g for g in data.dataset.spec.joint if all(n in outputs for n in g)]
    return metrics.evaluate(outputs, targets_of(data, present), present, vocab, group_task=group, joint=joint)


def patient_ids(data: FundusImages) -> list[str]:
    """The patient of each item of `data`, in order: the unit the bootstrap resamples."""
    return [r.patient_id for r in data.rows]


def _weighted(outputs: dict[str, np.ndarray], data: FundusImages, tasks: list[TaskSpec]) -> dict:
    present = [t for t in tasks if t.name in outputs]
    joint = [g for g in data.dataset.spec.joint if all(n in outputs for n in g)]
    return bootstrap.headline_metrics(outputs, targets_of(data, present), present, data.dataset.vocabulary, joint)


def headline_intervals(outputs: dict[str, np.ndarray], data: FundusImages, tasks: list[TaskSpec],
                       keys: list[str] | None = None, n_resamples: int = bootstrap.DEFAULT_RESAMPLES,
                       seed: int = 0) -> dict[str, list[float] | None]:
    """95 % patient-bootstrap interval of each headline key (`keys`, default all), in report units
    (points; BLEU 0-100): {key: [lo, hi]}."""
    weighted = _weighted(outputs, data, tasks)
    chosen = {k: m for k, m in weighted.items() if keys is None or k in keys}
    cis = bootstrap.bootstrap_cis(chosen, patient_ids(data), n_resamples, seed)
    return {k: bootstrap.in_points(k, ci) for k, ci in cis.items()}


def drop_intervals(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: FundusImages,
                   tasks: list[TaskSpec], keys: list[str], n_resamples: int = bootstrap.DEFAULT_RESAMPLES,
                   seed: int = 0) -> dict[str, list[float] | None]:
    """95 % paired patient-bootstrap interval of reference - candidate (two models' outputs on the same
    images) for each key, in points: {key: [lo, hi]}; a key either model lacks is left out."""
    cis = bootstrap.bootstrap_cis(_differences(reference, candidate, data, tasks, keys), patient_ids(data),
                                  n_resamples, seed)
    return {k: bootstrap.in_points(k, ci) for k, ci in cis.items()}


def _differences(outputs_a: dict[str, np.ndarray], outputs_b: dict[str, np.ndarray], data: FundusImages,
                 tasks: list[TaskSpec], keys: list[str]) -> dict[str, bootstrap.Metric]:
    """Weighted metric a - b per key both models have: two models' outputs on the same images."""
    a, b = _weighted(outputs_a, data, tasks), _weighted(outputs_b, data, tasks)
    return {k: (lambda w, m=a[k], n=b[k]: m(w) - n(w)) for k in keys if k in a and k in b}


def paired_standard_errors(outputs_a: dict[str, np.ndarray], outputs_b: dict[str, np.ndarray], data: FundusImages,
                           tasks: list[TaskSpec], keys: list[str], n_resamples: int = bootstrap.DEFAULT_RESAMPLES,
                           seed: int = 0) -> dict[str, float | None]:
    """Patient-bootstrap standard error of a - b (two models on the same images) per key, in points: the
    noise a difference between them has on this split. A key either model lacks is left out."""
    values = bootstrap.resampled_values(_differences(outputs_a, outputs_b, data, tasks, keys), patient_ids(data),
                                        n_resamples, seed)
    return {k: None if (se := bootstrap.standard_error(v)) is None else round(metrics.to_points(k, se), 2)
            for k, v in values.items()}


def selection_score(task_metrics: dict, tasks: list[TaskSpec], select: str = "auto") -> float:
    """One number to pick the best checkpoint (higher is better).

    `select` = a headline key (`coarse/accuracy`): that number alone; otherwise the mean over the tasks
    of each task's primary metric (train.metrics.primary_metric: balanced accuracy, kappa for ordinal
    tasks, BLEU/100 for text; or the named metric for every classification task that has it). A metric
    that cannot be computed (e.g. kappa with one class) counts as 0."""
    heads = metrics.headline(task_metrics, tasks)
    if "/" in select:  # the name was checked against the dataset before training (train.preflight)
        return float(heads.get(select, 0.0))  # e.g. kappa is undefined when one class fills the split
    picked = []
    for t in tasks:
        if t.name not in task_metrics:
            continue
        key = metrics.primary_metric(t, select)
        if key not in heads and t.kind == "classification":
            key = metrics.primary_metric(t)  # e.g. top5 asked, but this task has <= 5 classes
        value = heads.get(key, 0.0)
        picked.append(metrics.to_fraction(key, value))
    return float(np.mean(picked)) if picked else 0.0

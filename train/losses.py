"""Distillation losses: soft-target KD, teacher ensembles, sequence KD and the multi-task combination.

Conventions used throughout:
- Teacher soft targets are probabilities already softened at the task's temperature T
  (softmax(teacher_logits / T)); the student is softened here with the same T.
- KD is T^2 * KL(teacher || student) summed over classes and averaged over samples ("batchmean").
  The T^2 keeps the gradient scale independent of T (Hinton et al.). The paper's code used
  KLDivLoss(reduction="mean"), which also divides by the number of classes and so shrinks the KD term
  320x on a 320-class head; that is not repeated here.
- A loss with nothing to average (every sample masked out) is a zero that is still attached to the
  graph, so `loss.backward()` works in every batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deploy.contract import TaskSpec
from deploy.vocab import EOS_ID, PAD_ID

ENSEMBLE_MODES = ("mean_probs", "kl_sum")
# class_balance option -> exponent p of the CE class weight n_c^-p (n_c = training images of class c).
CLASS_BALANCE_POWERS = {"none": 0.0, "sqrt_inverse": 0.5, "inverse": 1.0}


def class_balance_weights(labels: np.ndarray, num_classes: int, mode: str) -> Tensor | None:
    """CE weights w_c = n_c^-p (p from CLASS_BALANCE_POWERS), scaled so that the mean weight over the
    training labels is 1: the loss keeps its scale, rare classes count more per image. None for "none".
    A class absent from `labels` (-1 = unlabelled, ignored) gets weight 0: it has no image to weigh."""
    if mode not in CLASS_BALANCE_POWERS:
        raise ValueError(f"class_balance must be one of {list(CLASS_BALANCE_POWERS)}, got {mode!r}")
    if mode == "none":
        return None
    labels = np.asarray(labels).reshape(-1)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, np.maximum(counts, 1.0) ** -CLASS_BALANCE_POWERS[mode], 0.0)
    mean = (counts * weights).sum() / max(counts.sum(), 1.0)
    return torch.tensor(weights / mean if mean > 0 else weights, dtype=torch.float32)


def _zero_like_graph(t: Tensor) -> Tensor:
    """A scalar 0 connected to `t`'s graph (a plain torch.zeros would have no grad_fn)."""
    return t.sum() * 0.0


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean() if values.numel() else _zero_like_graph(values)
    mask = mask.to(device=values.device, dtype=torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(values.shape)}")
    if not mask.any():
        return _zero_like_graph(values)
    return values[mask].mean()


def kd_per_sample(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """[N] T^2 * KL(teacher || softmax(student / T)), summed over the class axis (the last one).
    Works for any leading shape: [N, C] -> [N], [N, L, V] -> [N, L]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} differ in shape")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # kl_div(input=log q, target=p) = p * (log p - log q), with 0 * log 0 = 0.
    kl = F.kl_div(log_q, teacher_probs.float(), reduction="none").sum(dim=-1)
    return kl * temperature**2


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float,
            mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(teacher || student), batchmean over the samples where `mask` [N] is True (all if None).
    student_logits [N, C] raw logits; teacher_probs [N, C] already softened at `temperature`."""
    return _masked_mean(kd_per_sample(student_logits, teacher_probs, temperature), mask)


def soften(teacher_logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T), detached: teachers are frozen and never receive gradients."""
    return F.softmax(teacher_logits.detach().float() / temperature, dim=-1)


def _available(teacher_logits: Sequence[Tensor | None]) -> list[Tensor]:
    present = [t for t in teacher_logits if t is not None]
    if not present:
        raise ValueError("no teacher has this head; drop the task from the student's KD targets")
    shapes = {tuple(t.shape) for t in present}
    if len(shapes) > 1:
        raise ValueError(f"teachers disagree on the output shape of this head: {sorted(shapes)}")
    return present


def ensemble_soft_targets(teacher_logits: Sequence[Tensor | None], temperature: float) -> Tensor:
    """Mean of softmax(logits / T) over the teachers that have this head (None = teacher lacks it).
    Works for [N, C] class logits and [N, L, V] token logits alike."""
    present = _available(teacher_logits)
    return torch.stack([soften(t, temperature) for t in present]).mean(dim=0)


def kd_loss_per_teacher(student_logits: Tensor, teacher_logits: Sequence[Tensor | None],
                        temperature: float, mask: Tensor | None = None) -> Tensor:
    """Mean over the teachers that have this head of each teacher's `kd_loss` (the "kl_sum" mode).

    Compared with KD against the averaged probabilities ("mean_probs"): KL(p||q) = sum p log p -
    sum p log q is linear in p apart from the teacher-entropy term, so both modes give the student the
    *same gradient*; their values differ by a constant (the teachers' disagreement, Jensen's gap), so
    "kl_sum" reads higher. Averaging, not summing, keeps the KD scale independent of the number of
    teachers (a plain sum would weight a head that three teachers share three times as much)."""
    present = _available(teacher_logits)
    losses = [kd_loss(student_logits, soften(t, temperature), temperature, mask) for t in present]
    return torch.stack(losses).mean()


def ensemble_kd_loss(student_logits: Tensor, teacher_logits: Sequence[Tensor | None], temperature: float,
                     mode: str = "mean_probs", mask: Tensor | None = None) -> Tensor:
    """KD from several teachers by config option `ensemble_mode`: "mean_probs" or "kl_sum"."""
    if mode == "mean_probs":
        return kd_loss(student_logits, ensemble_soft_targets(teacher_logits, temperature), temperature, mask)
    if mode == "kl_sum":
        return kd_loss_per_teacher(student_logits, teacher_logits, temperature, mask)
    raise ValueError(f"ensemble_mode must be one of {ENSEMBLE_MODES}, got {mode!r}")


def mask_until_eos(tokens: Tensor, eos_id: int = EOS_ID) -> Tensor:
    """[N, L] bool: True up to and including the first <eos> of each row; a row without <eos> is all True."""
    is_eos = tokens == eos_id
    # Number of <eos> strictly before each position; the first <eos> itself still counts as valid.
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return eos_before == 0


def token_kd_loss(student_token_logits: Tensor, teacher_token_probs: Tensor, mask: Tensor,
                  temperature: float) -> Tensor:
    """T^2 * KL per token ([N, L, V] vs [N, L, V]), averaged over the tokens where `mask` [N, L] is True
    (use `mask_until_eos` of the sequence both models were teacher-forced on)."""
    return _masked_mean(kd_per_sample(student_token_logits, teacher_token_probs, temperature), mask)


def sequence_ce(token_logits: Tensor, targets: Tensor, pad_id: int = PAD_ID) -> Tensor:
    """Cross-entropy of [N, L, V] logits against [N, L] ids, averaged over the non-<pad> tokens."""
    if token_logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(token_logits.shape)} do not match targets {tuple(targets.shape)}")
    if not (targets != pad_id).any():
        return _zero_like_graph(token_logits)
    return F.cross_entropy(token_logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)


def _per_sample_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[N, L] -> [N]: mean over each row's masked tokens (0 for a row with none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MultiTaskLoss(nn.Module):
    """Supervised CE plus KD over any number of classification tasks and an optional text task.

    Per task and per sample i, with has_label_i = labelled_mask_i and a target present for this task:
        labelled:    (1 - alpha) * CE_i + alpha * KD_i
        otherwise:   KD_i                       (weight 1: alpha only splits a sample between its two
                                                 terms; a sample with no label has only one)
    and the task loss is the mean of these over all N samples. A task without soft targets (stage 1,
    labels only) is plain CE averaged over its labelled samples (weight 1, not 1 - alpha). The total is
    sum over tasks of weights[task] * task loss. KD_i = T^2 * KL(soft || softmax(logits / T)) with the
    task's temperature; for text, CE_i and KD_i are means over the sample's own tokens (so short and
    long sentences count alike).

    forward(student_out, targets, soft, labelled_mask) — what the caller provides, for N samples:
    - labelled_mask: bool [N], True for samples from the labelled set.
    - classification task: student_out[t] = logits [N, C]; targets[t] = int64 [N], -1 = no label;
      soft[t] = teacher probabilities [N, C] already softened at this task's temperature
      (`soften` / `ensemble_soft_targets` with `temperature(t)`).
    - text task: targets[t] = int64 [N, L], the sequence the student was teacher-forced on: the
      reference as `Vocabulary.encode_padded` (words, <eos>, <pad>...) for samples that have one; for
      samples without a reference either all <pad>, or (unlabelled samples only) the teacher's generated
      sequence. student_out[t] = token logits [N, L, V] predicting targets[t][:, j] at step j under
      teacher forcing on targets[t][:, :j]; soft[t] = teacher probabilities [N, L, V] at this task's
      temperature, computed with the teacher forced on the same sequence. For an all-<pad> row the
      sequence is taken as argmax(soft[t]), i.e. the caller must have forced student and teacher on the
      teacher's own greedy output. Tokens count up to and including the first <eos>.
    - soft may be None, or lack a task: no KD for it.
    Returns (total loss, components {"total", task, "task/ce", "task/kd"} as floats for logging).
    """

    def __init__(self, tasks: Sequence[TaskSpec], alpha: float = 0.95,
                 temperatures: Mapping[str, float] | None = None, default_temperature: float = 4.0,
                 weights: Mapping[str, float] | None = None,
                 class_weights: Mapping[str, Tensor | None] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("MultiTaskLoss needs at least one task")
        if sum(t.kind == "text" for t in self.tasks) > 1:
            raise ValueError(f"at most one text task is supported, got {names}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        for label, mapping in (("temperatures", temperatures or {}), ("weights", weights or {})):
            unknown = set(mapping) - set(names)
            if unknown:
                raise ValueError(f"{label} name unknown tasks {sorted(unknown)}; tasks are {names}")
        self.alpha = alpha
        self.temperatures = {n: float((temperatures or {}).get(n, default_temperature)) for n in names}
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in names}
        # Per-class CE weights of classification tasks (class_balance_weights); KD terms stay unweighted.
        self.class_weights = {n: w for n, w in (class_weights or {}).items() if w is not None}
        bad = {n: t for n, t in self.temperatures.items() if t <= 0}
        if bad:
            raise ValueError(f"temperatures must be > 0, got {bad}")

    def temperature(self, task: str) -> float:
        """The softening temperature of `task` (use it for the teachers' soft targets too)."""
        return self.temperatures[task]

    def _classification_terms(self, logits: Tensor, target: Tensor, labelled: Tensor,
                              class_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if target.shape != logits.shape[:1]:
            raise ValueError(f"targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
        has_label = labelled & (target >= 0)
        weight = class_weight.to(logits.device) if class_weight is not None else None
        ce = F.cross_entropy(logits.float(), target.clamp(min=0), weight=weight, reduction="none")
        return ce, has_label

    def _text_terms(self, logits: Tensor, target: Tensor, labelled: Tensor,
                    soft: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if target.shape != logits.shape[:2]:
            raise ValueError(f"targets {tuple(target.shape)} do not match token logits {tuple(logits.shape)}")
        has_ref = (target != PAD_ID).any(dim=1)
        if soft is not None:
            forced = torch.where(has_ref[:, None], target, soft.argmax(dim=-1))
        else:
            forced = target
        tok_mask = mask_until_eos(forced) & (forced != PAD_ID)
        ce_tok = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none",
                                 ignore_index=PAD_ID).view_as(target)
        return _per_sample_token_mean(ce_tok, tok_mask), labelled & has_ref, tok_mask

    @staticmethod
    def _kd(logits: Tensor, teacher: Tensor, temp: float, per_teacher: bool) -> Tensor:
        if per_teacher:
            return torch.stack([kd_per_sample(logits, t, temp) for t in teacher]).mean(0)
        return kd_per_sample(logits, teacher, temp)

    def forward(self, student_out: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                soft: Mapping[str, Tensor] | None, labelled_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        soft = soft or {}
        labelled = labelled_mask.to(dtype=torch.bool).reshape(-1)
        total: Tensor | int = 0
        parts: dict[str, float] = {}
        for task in self.tasks:
            name = task.name
            if name not in student_out or name not in targets:
                raise KeyError(f"task {name!r} needs both a student output and targets "
                               f"(outputs: {sorted(student_out)}, targets: {sorted(targets)})")
            logits = student_out[name]
            target = targets[name].to(device=logits.device, dtype=torch.long)
            if logits.shape[0] != labelled.shape[0]:
                raise ValueError(f"task {name!r}: {logits.shape[0]} samples but labelled_mask has "
                                 f"{labelled.shape[0]}")
            lab, temp = labelled.to(logits.device), self.temperatures[name]
            teacher = soft[name].detach().to(logits.device) if name in soft else None
            # soft[t] with one more leading axis than the logits holds per-teacher targets [T, ...]:
            # the "kl_sum" ensemble mode, KD = mean over teachers of each teacher's KL.
            per_teacher = teacher is not None and teacher.dim() == logits.dim() + 1
            if task.kind == "classification":
                ce, has_label = self._classification_terms(logits, target, lab, self.class_weights.get(name))
                kd = self._kd(logits, teacher, temp, per_teacher) if teacher is not None else None
            else:
                mean = teacher.mean(0) if per_teacher else teacher
                ce, has_label, tok_mask = self._text_terms(logits, target, lab, mean)
                kd = (_per_sample_token_mean(self._kd(logits, teacher, temp, per_teacher), tok_mask)
                      if teacher is not None else None)
            if kd is None:
                loss = _masked_mean(ce, has_label)
            else:
                per_sample = torch.where(has_label, (1 - self.alpha) * ce + self.alpha * kd, kd)
                loss = per_sample.mean()
                parts[f"{name}/kd"] = float(kd.detach().mean())
            if has_label.any():
                parts[f"{name}/ce"] = float(ce.detach()[has_label].mean())
            parts[name] = float(loss.detach())
            total = total + self.weights[name] * loss
        parts["total"] = float(total.detach())
        return total, parts

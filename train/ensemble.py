"""The teacher ensemble: combined class probabilities and ensemble greedy decoding of the diagnosis.

Each task is served by the teachers that have a head for it. A classification task's probabilities are
sum_i w_i softmax(z_i / T_i) over its teachers: a `Combination` holds one temperature T_i and one weight
w_i per teacher and task (uniform weights and T = 1 = the plain mean; train.calibrate fits them on the
validation split). For the text task the teachers decode together: at every step their next-token
distributions are combined the same way, sum_i w_i softmax(z_i / T_i), and the argmax is fed back to
all of them. The same module
produces the soft targets the student learns from (cached once, together with the combination) and is
exported to ONNX for the benchmarks, so temperatures and weights are buffers and there is no
data-dependent control flow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from deploy.contract import TaskSpec
from deploy.errors import MissingInput, UserError
from deploy.fileio import sha256_file
from deploy.vocab import PAD_ID
from train import progress
from train.checkpoint import load_checkpoint, save_checkpoint
from train.datasets import FundusImages, model_input
from train.layout import RunLayout
from train.losses import mask_until_eos
from train.models.saved import load_model

WEIGHTINGS = ("mean", "calibrated_mean", "quality_weighted")


class StaleCombination(UserError):
    """The stored ensemble combination was fitted for other teacher checkpoints."""


@dataclass
class Combination:
    """How the ensemble combines its teachers per task (class probabilities; next-token distributions).

    temperatures[task] / weights[task]: one value per teacher that has the task's head, in ensemble
    order (weights sum to 1). A task missing from the mappings is the plain mean (T = 1, equal weights):
    so a combination stored before the text task had its own reads as the equal vote it was.
    hashes: teacher name -> checkpoint sha256 the values were fitted for.
    """

    weighting: str = "mean"
    teachers: list[str] = field(default_factory=list)
    temperatures: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, list[float]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"ensemble weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")

    def for_task(self, task: str, n_members: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(temperatures [T], weights [T]) of the task's `n_members` teachers."""
        temps = self.temperatures.get(task, [1.0] * n_members)
        weights = self.weights.get(task, [1.0 / n_members] * n_members)
        if len(temps) != n_members or len(weights) != n_members:
            raise ValueError(f"combination for {task!r} has {len(temps)} temperatures / {len(weights)} "
                             f"weights for {n_members} teachers")
        return torch.tensor(temps, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)

    def is_uniform(self, task: str) -> bool:
        weights = self.weights.get(task)
        return weights is None or max(weights) - min(weights) < 1e-9

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Combination:
        return cls(**{k: d[k] for k in ("weighting", "teachers", "temperatures", "weights", "hashes") if k in d})


@dataclass
class SoftTargets:
    """Cached teacher outputs for the rows of a student training set (row order of that set).

    logits[task] is [n_teachers_with_head, N, C] raw logits; text_tokens [N, L] is the reference diagnosis
    for rows that have one and the ensemble's greedy diagnosis for the others; text_logits
    [n_text_teachers, N, L, V] holds each text teacher's token logits teacher-forced along text_tokens.
    combination: the ensemble's per-teacher temperatures/weights, applied by `class_probs`.
    """

    logits: dict[str, torch.Tensor]
    text_tokens: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    combination: Combination = field(default_factory=Combination)

    def class_probs(self, task: str, idx: torch.Tensor, kd_temperature: float,
                    per_teacher: bool = False) -> torch.Tensor:
        """Soft targets of rows `idx` of a classification task at the KD temperature ([N, C]; see `combine`)."""
        return self.combine(task, self.logits[task][:, idx], kd_temperature, per_teacher)

    def token_probs(self, task: str, idx: torch.Tensor, kd_temperature: float,
                    per_teacher: bool = False) -> torch.Tensor:
        """Soft targets of rows `idx` of the text task along `text_tokens` ([N, L, V]; see `combine`)."""
        return self.combine(task, self.text_logits[:, idx], kd_temperature, per_teacher)

    def combine(self, task: str, logits: torch.Tensor, kd_temperature: float,
                per_teacher: bool = False) -> torch.Tensor:
        """softmax(z_i / (T_i * T_kd)) of each teacher's logits [T, N, ...], combined with the weights
        w_i; `per_teacher` keeps them apart ([T, N, ...], the kl_sum mode, which averages the teachers'
        KL terms equally and so needs uniform weights)."""
        logits = logits.float()
        temps, weights = self.combination.for_task(task, logits.shape[0])
        shape = (-1,) + (1,) * (logits.dim() - 1)  # one value per teacher, broadcast over the rest
        probs = (logits / (temps.view(shape) * kd_temperature)).softmax(-1)
        if per_teacher:
            if not self.combination.is_uniform(task):
                raise UserError(f"kd.ensemble_mode=kl_sum averages the teachers equally but the ensemble "
                                f"weights of {task!r} are not uniform; use ensemble_mode=mean_probs or "
                                f"teachers.ensemble_weighting=mean|calibrated_mean")
            return probs
        return (weights.view(shape) * probs).sum(0)


def _names(model: nn.Module) -> list[str]:
    return [t.name for t in model.tasks]


class TeacherEnsemble(nn.Module):
    """Teachers with (possibly different) task subsets behaving as one multi-task model."""

    def __init__(self, teachers: list[nn.Module], tasks: list[TaskSpec]):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.tasks = [t for t in tasks if any(t.name in _names(m) for m in teachers)]
        missing = [t.name for t in tasks if t not in self.tasks]
        if missing:
            raise ValueError(f"no teacher has a head for task(s) {missing}")
        self.text_task = next((t.name for t in self.tasks if t.kind == "text"), None)
        self.max_len = max((m.max_len for m in teachers if self.text_task in _names(m)), default=0)
        # [task, teacher] temperature and weight (0 where the teacher lacks the head): buffers, so they
        # travel with .to(device/dtype) and become constants of the exported graph.
        member = torch.tensor([[float(t.name in _names(m)) for m in teachers] for t in self.tasks])
        self.register_buffer("temperature", torch.ones_like(member))
        self.register_buffer("weight", member / member.sum(1, keepdim=True))

    def _members(self, task: str) -> list[int]:
        return [i for i, m in enumerate(self.teachers) if task in _names(m)]

    def _task_index(self, task: str) -> int:
        return [t.name for t in self.tasks].index(task)

    def set_combination(self, combination: Combination) -> TeacherEnsemble:
        """Use `combination`'s temperatures and weights for every task (the text task's at each step)."""
        for task in self.tasks:
            k, members = self._task_index(task.name), self._members(task.name)
            temps, weights = combination.for_task(task.name, len(members))
            self.temperature[k, members] = temps.to(self.temperature)
            self.weight[k, members] = weights.to(self.weight)
        return self

    def combine(self, task: str, logits: list[torch.Tensor]) -> torch.Tensor:
        """sum_i w_i softmax(z_i / T_i) over the task's teachers (`logits` in `_members` order): class
        logits [N, C], or next-token logits [N, V] at one decoding step."""
        k = self._task_index(task)
        probs = [self.weight[k, i] * (lg.float() / self.temperature[k, i]).softmax(-1)
                 for lg, i in zip(logits, self._members(task))]
        return torch.stack(probs).sum(0)

    def decode(self, feats: list[torch.Tensor], forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble greedy decoding. Returns tokens [N, L] and per-teacher logits [T_text, N, L, V].

        Rows of `forced` [N, L] that hold a reference (not all <pad>) are teacher-forced on it instead,
        so their logits are the teachers' token distributions along the reference.
        """
        members = self._members(self.text_task)
        decoders = [self.teachers[i].decoder for i in members]
        starts = [d.start(feats[i]) for d, i in zip(decoders, members)]
        hidden = [h for h, _ in starts]
        ctx = [c for _, c in starts]
        gates = [d.bos_gates(c) for d, c in zip(decoders, ctx)]
        tokens, logits = [], []
        has_ref = (forced != PAD_ID).any(1) if forced is not None else None
        for j in range(self.max_len):
            step_logits = []
            for k, d in enumerate(decoders):
                hidden[k] = d.cell(gates[k], hidden[k])
                step_logits.append(d.out(hidden[k]))
            token = self.combine(self.text_task, step_logits).argmax(-1)
            if has_ref is not None:
                token = torch.where(has_ref, forced[:, j], token)
            tokens.append(token)
            logits.append(torch.stack(step_logits))
            gates = [d.input_gates(token, c) for d, c in zip(decoders, ctx)]
        return torch.stack(tokens, 1), torch.stack(logits, 2)

    def teacher_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Pooled features and classification logits of every teacher (one encoder pass each)."""
        feats, logits = [], {}
        for m in self.teachers:
            f = m.features(images)
            feats.append(f)
            for task in m.classification_tasks:
                logits.setdefault(task.name, []).append(m.heads[task.name](f))
        return feats, logits

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Combined probabilities per classification task and the ensemble's greedy token ids."""
        feats, logits = self.teacher_outputs(images)
        out = {name: self.combine(name, lgs) for name, lgs in logits.items()}
        if self.text_task:
            out[self.text_task], _ = self.decode(feats)
        return {t.name: out[t.name] for t in self.tasks}


def load_ensemble(paths: list[Path], tasks: list[TaskSpec], device: torch.device) -> TeacherEnsemble:
    teachers = []
    for p in paths:
        if not p.exists():
            raise MissingInput(f"{p}: teacher checkpoint missing; run `make teachers` first")
        model, _ = load_model(p)
        teachers.append(model.eval())
    return TeacherEnsemble(teachers, tasks).to(device).eval()


def teacher_hashes(paths: list[Path]) -> dict[str, str]:
    """Teacher name (its run folder) -> checkpoint sha256."""
    return {p.parent.name: sha256_file(p) for p in paths}


def combination_path(run_dir: Path) -> Path:
    return RunLayout(run_dir).combination()


def load_stored_combination(run_dir: Path, paths: list[Path]) -> Combination | None:
    """The combination train.calibrate wrote for these teacher checkpoints; None when there is none
    (the plain mean). Raises StaleCombination when it was fitted for other checkpoints."""
    path = combination_path(run_dir)
    if not path.exists():
        return None
    combination = Combination.from_dict(json.loads(path.read_text())["combination"])
    if combination.hashes != teacher_hashes(paths):
        raise StaleCombination(f"{path}: fitted for other teacher checkpoints; run `make student` again "
                               f"(it refits the ensemble combination) or delete the file for a plain mean")
    return combination


def attach_stored_combination(ensemble: TeacherEnsemble, run_dir: Path, paths: list[Path]) -> TeacherEnsemble:
    """The ensemble as the student saw it: the stored calibration/weights applied (export, benchmarks)."""
    combination = load_stored_combination(run_dir, paths)
    return ensemble.set_combination(combination) if combination else ensemble


@torch.no_grad()
def compute_soft_targets(ensemble: TeacherEnsemble, data: FundusImages, device: torch.device,
                         batch_size: int = 64, combination: Combination | None = None) -> SoftTargets:
    """Run the ensemble once over `data` (no augmentation) and keep what distillation needs."""
    logits: dict[str, list[torch.Tensor]] = {}
    tokens, text_logits = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    progress.log(f"[teacher soft targets] the ensemble over {len(data)} images, {len(loader)} batches")
    for batch in progress.bar(loader, desc="teacher soft targets"):
        feats, lg = ensemble.teacher_outputs(model_input(batch["image"], device))
        for name, values in lg.items():
            logits.setdefault(name, []).append(torch.stack(values).cpu())
        if ensemble.text_task:
            tok, tl = ensemble.decode(feats, forced=batch[ensemble.text_task].to(device))
            # Generated sentences end at their first <eos>: what follows is noise, not a target.
            tok = tok.masked_fill(~mask_until_eos(tok), PAD_ID)
            tokens.append(tok.cpu())
            text_logits.append(tl.half().cpu())  # [T, N, L, V] can be large: half precision is plenty
    return SoftTargets(logits={k: torch.cat(v, 1) for k, v in logits.items()},
                       text_tokens=torch.cat(tokens) if tokens else None,
                       text_logits=torch.cat(text_logits, 1) if text_logits else None,
                       combination=combination or Combination())


def save_soft_targets(path: Path, soft: SoftTargets, key: dict) -> None:
    tensors = {f"logits.{k}": v.contiguous() for k, v in soft.logits.items()}
    if soft.text_tokens is not None:
        tensors["text_tokens"] = soft.text_tokens.contiguous()
        tensors["text_logits"] = soft.text_logits.contiguous()
    save_checkpoint(path, tensors, {"key": key, "combination": soft.combination.to_dict()})


def load_soft_targets(path: Path, key: dict) -> SoftTargets | None:
    """The cache, or None when it is missing or was made for other rows, teachers, preprocessing or
    ensemble combination (`key`: rows, teacher checkpoint hashes, preprocessing, combination); then it
    is recomputed."""
    if not path.exists():
        return None
    try:
        tensors, meta = load_checkpoint(path)
    except (ValueError, OSError):
        return None
    if meta.get("key") != json.loads(json.dumps(key)):  # compare as stored (JSON turns tuples into lists)
        return None
    return SoftTargets(logits={k[7:]: v for k, v in tensors.items() if k.startswith("logits.")},
                       text_tokens=tensors.get("text_tokens"), text_logits=tensors.get("text_logits"),
                       combination=Combination.from_dict(meta.get("combination", {})))

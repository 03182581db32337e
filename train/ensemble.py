"""The teacher ensemble: averaged class probabilities and ensemble greedy decoding of the diagnosis.

Each task is served by the teachers that have a head for it. For the text task the teachers decode
together: at every step their next-token distributions are averaged and the argmax is fed back to all
of them. The same module produces the soft targets the student learns from (cached once, see
`cache_soft_targets`) and is exported to ONNX for the benchmarks, so it avoids data-dependent control
flow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deploy.contract import TaskSpec
from deploy.errors import MissingInput
from deploy.vocab import PAD_ID
from train.checkpoint import load_checkpoint, load_model, save_checkpoint
from train.data.torch_data import FundusImages
from train.losses import mask_until_eos


@dataclass
class SoftTargets:
    """Cached teacher outputs for the rows of a student training set (row order of that set).

    logits[task] is [n_teachers_with_head, N, C]; text_tokens [N, L] is the reference diagnosis for rows
    that have one and the ensemble's greedy diagnosis for the others; text_logits [n_text_teachers, N,
    L, V] holds each text teacher's token logits teacher-forced along text_tokens.
    """

    logits: dict[str, torch.Tensor]
    text_tokens: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None


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

    def _members(self, task: str) -> list[int]:
        return [i for i, m in enumerate(self.teachers) if task in _names(m)]

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
            probs = torch.stack([lg.float().softmax(-1) for lg in step_logits]).mean(0)
            token = probs.argmax(-1)
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
        """Averaged probabilities per classification task and the ensemble's greedy token ids."""
        feats, logits = self.teacher_outputs(images)
        out = {name: torch.stack([lg.float().softmax(-1) for lg in lgs]).mean(0) for name, lgs in logits.items()}
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


@torch.no_grad()
def compute_soft_targets(ensemble: TeacherEnsemble, data: FundusImages, device: torch.device,
                         batch_size: int = 64) -> SoftTargets:
    """Run the ensemble once over `data` (no augmentation) and keep what distillation needs."""
    logits: dict[str, list[torch.Tensor]] = {}
    tokens, text_logits = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="teacher soft targets", leave=False, dynamic_ncols=True):
        feats, lg = ensemble.teacher_outputs(batch["image"].to(device))
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
                       text_logits=torch.cat(text_logits, 1) if text_logits else None)


def save_soft_targets(path: Path, soft: SoftTargets, key: dict) -> None:
    tensors = {f"logits.{k}": v.contiguous() for k, v in soft.logits.items()}
    if soft.text_tokens is not None:
        tensors["text_tokens"] = soft.text_tokens.contiguous()
        tensors["text_logits"] = soft.text_logits.contiguous()
    save_checkpoint(path, tensors, {"key": key})


def load_soft_targets(path: Path, key: dict) -> SoftTargets | None:
    """The cache, or None when it is missing or was made for other rows, teachers or preprocessing
    (`key`: rows, teacher checkpoint hashes, preprocessing); then it is recomputed."""
    if not path.exists():
        return None
    try:
        tensors, meta = load_checkpoint(path)
    except (ValueError, OSError):
        return None
    if meta.get("key") != json.loads(json.dumps(key)):  # compare as stored (JSON turns tuples into lists)
        return None
    return SoftTargets(logits={k[7:]: v for k, v in tensors.items() if k.startswith("logits.")},
                       text_tokens=tensors.get("text_tokens"), text_logits=tensors.get("text_logits"))

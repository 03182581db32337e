"""The multi-task network: one shared image encoder, one head per task of its subset.

Classification tasks (T1 coarse disease, T2 fine sub-category) get an MLP head
Linear(F, head_hidden) -> ReLU -> Dropout -> Linear(head_hidden, C), as in Chelaramani et al.;
the text task (T3 diagnosis) gets the GRU DiagnosisDecoder. Teachers are built on task subsets
({T1}, {T1, T3}, ...) by listing them in `ModelConfig.tasks`; the student usually has all of them.
"""

from __future__ import annotations

import torch
from timm.models import group_modules
from torch import Tensor, nn

from deploy.contract import TaskSpec
from train.models.config import ModelConfig  # noqa: F401 (re-exported: the model's own config)
from train.models.decoder import DiagnosisDecoder
from train.models.pretrained import load_pretrained
from train.models.registry import build, register


@register("mlp", kind="head")
class ClassificationHead(nn.Sequential):
    """Linear(F, hidden) -> ReLU -> Dropout -> Linear(hidden, C): class logits."""

    def __init__(self, feat_dim: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def select_tasks(tasks: list[TaskSpec], names: list[str] | None) -> list[TaskSpec]:
    """The model's task subset, in the dataset's order (so every model's outputs line up)."""
    if names is None:
        return list(tasks)
    available = [t.name for t in tasks]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"model.tasks {unknown} are not tasks of the dataset; available: {available}")
    return [t for t in tasks if t.name in names]


@register("multitask", kind="model")
class MultiTaskNet(nn.Module):
    """Shared timm encoder + per-task heads. Outputs are dicts keyed by task name."""

    def __init__(self, cfg: ModelConfig, tasks: list[TaskSpec], vocab_size: int | None, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = select_tasks(tasks, cfg.tasks)
        self.vocab_size, self.max_len = vocab_size, max_len
        text = [t for t in self.tasks if t.kind == "text"]
        if len(text) > 1:
            raise ValueError(f"at most one text task per model, got {[t.name for t in text]}")
        self.text_task: str | None = text[0].name if text else None
        if self.text_task and not vocab_size:
            raise ValueError(f"task {self.text_task!r} is a text task: vocab_size is required")

        self.encoder = build("backbone", cfg.backbone)
        load_pretrained(self.encoder, cfg.backbone, cfg.pretrained)
        self.num_features = int(self.encoder.num_features)
        self.heads = nn.ModuleDict()
        for task in self.tasks:
            if task.kind == "classification":
                self.heads[task.name] = build("head", "mlp", feat_dim=self.num_features, hidden=cfg.head_hidden,
                                              num_classes=task.num_classes, dropout=cfg.dropout)
            else:
                self.heads[task.name] = build("decoder", "gru", feat_dim=self.num_features,
                                              vocab_size=vocab_size, max_len=max_len, embed_dim=cfg.embed_dim,
                                              hidden=cfg.decoder_hidden, teacher_forcing=cfg.teacher_forcing,
                                              context=cfg.decoder_context)
        self._frozen = self._freeze(cfg.freeze_stages)

    def _freeze(self, stages: int) -> list[nn.Module]:
        """Stop gradients for the first `stages` coarse parameter groups of the encoder."""
        if stages == 0:
            return []
        groups = group_modules(self.encoder, self.encoder.group_matcher(coarse=True))
        order = sorted(groups)
        if stages > len(order):
            raise ValueError(f"freeze_stages={stages} but backbone {self.cfg.backbone!r} has {len(order)} "
                             f"stages (stem, block stages, head); use 0..{len(order)}")
        frozen = [self.encoder.get_submodule(name) for gid in order[:stages] for name in groups[gid]]
        for module in frozen:
            module.requires_grad_(False)
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True) -> MultiTaskNet:
        """Like nn.Module.train, but frozen stages stay in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        for module in getattr(self, "_frozen", []):
            module.eval()
        return self

    @property
    def classification_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.kind == "classification"]

    @property
    def decoder(self) -> DiagnosisDecoder | None:
        return self.heads[self.text_task] if self.text_task else None

    def features(self, images: Tensor) -> Tensor:
        """Pooled encoder features `[N, F]`."""
        return self.encoder(images)

    def heads_forward(self, features: Tensor, text_targets: Tensor | None = None) -> dict[str, Tensor]:
        """Per-task outputs from shared features: class logits `[N, C]`; token logits `[N, L, V]`."""
        out: dict[str, Tensor] = {}
        for task in self.tasks:
            head = self.heads[task.name]
            out[task.name] = head(features, text_targets) if task.kind == "text" else head(features)
        return out

    def forward(self, images: Tensor, text_targets: Tensor | None = None) -> dict[str, Tensor]:
        """Task name -> logits. Text: teacher-forced on `text_targets` `[N, max_len]`, else greedy."""
        return self.heads_forward(self.features(images), text_targets)

    def generate(self, images: Tensor) -> Tensor:
        """Greedy token ids `[N, max_len]` int64 (fixed length; cut at the first <eos> when decoding)."""
        if self.decoder is None:
            raise ValueError(f"this model has no text task (tasks: {[t.name for t in self.tasks]})")
        return self.decoder.greedy(self.features(images))[1]


class ExportModel(nn.Module):
    """Deployment view of a MultiTaskNet: image -> outputs in contract order (TaskSpec.output_name).

    Classification tasks give softmax probabilities `[N, C]` float32; the text task gives greedy token
    ids `[N, max_len]` int64. Only plain ops, so ONNX export works with a dynamic batch axis.
    """

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model
        # The decoder's token -> input-gates table, computed once from the (frozen) weights: a constant of
        # the graph, gathered per step (DiagnosisDecoder.token_gate_table).
        decoder = model.decoder
        with torch.no_grad():
            table = decoder.token_gate_table() if decoder is not None else torch.zeros(0)
        self.register_buffer("token_gate_table", table, persistent=False)

    @property
    def output_names(self) -> list[str]:
        return [t.output_name for t in self.model.tasks]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        features = self.model.features(image)
        outputs = []
        for task in self.model.tasks:
            head = self.model.heads[task.name]
            if task.kind == "classification":
                outputs.append(torch.softmax(head(features), dim=-1))
            else:
                outputs.append(head.greedy(features, self.token_gate_table)[1])
        return tuple(outputs)

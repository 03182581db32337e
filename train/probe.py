"""The linear probe: a floor that needs no teacher and almost no training.

The student's backbone with its configured pretrained (ImageNet) weights, frozen, at the deploy
resolution and with the deployed preprocessing, gives pooled features; one multinomial logistic
regression per classification task is fitted on the training split (features standardised on it, L2
penalty C chosen on the validation split) and scored on the test split with the project's metric code.
A KD student below this row has not earned its teachers (see train.summary).

    python -m train.probe --config configs/default.yaml     # also run by `make student` (summary)

Writes runs/<name>/probe/final.json, reused while the backbone, preprocessing and rows are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from deploy.contract import TaskSpec
from deploy.errors import cli
from train.config import to_dict
from train.datasets import FundusImages, model_input
from train.distributed import resolve_device
from train.evaluate import score_outputs, selection_score
from train.experiment import (
    ExperimentConfig,
    add_config_args,
    config_overrides,
    load_experiment,
    role_preprocessing,
)
from train.layout import FINAL
from train.metrics import headline
from train.stage import Splits, build_model, image_set, load_splits, write_final

# Inverse L2 strengths tried (sklearn's C: the penalty is ||W||^2 / (2 C n)), a decade apart.
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass
class LogisticModel:
    """Multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [C, F]
    bias: torch.Tensor  # [C]

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.mean) / self.std
        return (z @ self.weight.T + self.bias).softmax(-1)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float,
                 max_iter: int = 200) -> LogisticModel:
    """Minimise mean cross-entropy + ||W||^2 / (2 C n) with full-batch LBFGS (the bias is not penalised)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    penalty = 1.0 / (2.0 * c * len(labels))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(mean.float(), std.float(), weight.detach().float(), bias.detach().float())


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, data: FundusImages, device: torch.device,
                     batch_size: int = 64) -> torch.Tensor:
    """Pooled backbone features [N, F] of every item (no augmentation)."""
    parts = [backbone.features(model_input(batch["image"], device)).float().cpu()
             for batch in DataLoader(data, batch_size=batch_size, shuffle=False)]
    return torch.cat(parts)


def _labelled(data: FundusImages, task: str) -> tuple[np.ndarray, torch.Tensor]:
    labels = np.asarray(data.targets[task])
    keep = np.flatnonzero(labels >= 0)
    return keep, torch.as_tensor(labels[keep], dtype=torch.long)


def _val_key(model: LogisticModel, feats: torch.Tensor, data: FundusImages, task: TaskSpec) -> tuple[float, float]:
    """(the project's selection score, -NLL) on validation: higher is better; NLL breaks ties such as
    a top-5 of 1.0 on a task with few classes."""
    probs = model.predict_proba(feats)
    metrics = score_outputs({task.name: probs.numpy()}, data, [task], None)
    keep, labels = _labelled(data, task.name)
    nll = F.nll_loss(probs[keep].clamp_min(1e-12).log(), labels).item() if len(keep) else 0.0
    return selection_score(metrics, [task]), -nll


def probe_task(task: TaskSpec, feats: dict[str, torch.Tensor], sets: dict[str, FundusImages]) -> tuple[np.ndarray, float]:
    """Test-split probabilities of one task's probe and the C chosen on validation."""
    keep, labels = _labelled(sets["train"], task.name)
    if len(keep) == 0:
        raise ValueError(f"no training image is labelled for {task.name!r}")
    best = None
    for c in C_GRID:
        model = fit_logistic(feats["train"][keep], labels, len(task.classes), c)
        key = _val_key(model, feats["val"], sets["val"], task)
        if best is None or key > best[0]:
            best = (key, c, model)
    _, c, model = best
    return model.predict_proba(feats["test"]).numpy(), c


def _key(cfg: ExperimentConfig, sets: dict[str, FundusImages]) -> dict:
    model = cfg.student.model
    return json.loads(json.dumps({"backbone": model.backbone, "pretrained": model.pretrained, "grid": C_GRID,
                                  "preprocessing": sets["test"].spec.to_dict(),
                                  "rows": {k: [r.path for r in s.rows] for k, s in sets.items()}}))


def linear_probe(cfg: ExperimentConfig, splits: Splits, device: torch.device) -> dict:
    """Test metrics of the linear probe on every classification task (cached in runs/<name>/probe/)."""
    tasks = [t for t in splits.data.spec.tasks if t.kind == "classification"]
    pre = role_preprocessing(cfg, "student")
    sets = {name: image_set(splits, getattr(splits, name), tasks, pre) for name in ("train", "val", "test")}
    key, final = _key(cfg, sets), cfg.layout.model_dir("probe") / FINAL
    if final.exists():
        record = json.loads(final.read_text())
        if record.get("key") == key:
            return record["metrics"]
    torch.manual_seed(cfg.seed)  # a backbone without pretrained weights is random: make it repeatable
    backbone = build_model(dataclasses.replace(cfg.student.model, tasks=None), splits.data, [t.name for t in tasks])
    backbone.to(device).eval()
    feats = {name: extract_features(backbone, s, device, cfg.student.train.eval_batch_size) for name, s in sets.items()}
    outputs, chosen = {}, {}
    for task in tasks:
        outputs[task.name], chosen[task.name] = probe_task(task, feats, sets)
    metrics = score_outputs(outputs, sets["test"], tasks, None)
    write_final(cfg.layout.model_dir("probe"), "linear probe", metrics, tasks,
                {"key": key, "C": chosen, "model": to_dict(cfg.student.model), "image_size": pre.size})
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_experiment(args.config, config_overrides(args))
    device = resolve_device(cfg.device)
    splits = load_splits(cfg)
    metrics = linear_probe(cfg, splits, device)
    print(json.dumps(headline(metrics, splits.data.spec.tasks), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

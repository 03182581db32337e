"""The training loop shared by teachers, the student and the baseline.

What it guarantees: seeded per epoch (so a resumed run ends where an uninterrupted one would, on CPU);
an atomic `last.safetensors` after every epoch (model, optimizer, scheduler, scaler, history) from which
a killed run resumes; `best.safetensors` by a validation metric; a NaN/inf loss stops the run with a
message and leaves the last good checkpoint in place; DDP through torchrun (DistributedSampler, rank-0
I/O); AMP on CUDA; per-epoch metrics as CSV, TensorBoard and a PNG of the curves.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from deploy.errors import RunFailed, UserError
from deploy.fileio import atomic_write_text
from train import progress
from train.checkpoint import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from train.datasets import model_input
from train.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, gather_objects
from train.experiment import TrainConfig
from train.layout import CHECKPOINT, LAST_CHECKPOINT
from train.models.saved import save_model
from train.parallel import follow_thread_share, usable_cores
from train.plots import plot_curves


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite."""


@dataclass
class EpochPlan:
    indices: np.ndarray  # which items of the training set this epoch uses
    mode: str = "default"  # handed to the step function (e.g. labels / kd / unlabeled)


StepFn = Callable[[torch.nn.Module, dict, str], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], tuple[float, dict[str, float]]]  # -> (selection score, flat metrics)


CURVES_EVERY_S = 60.0


def config_fingerprint(meta: dict) -> str:
    """What must match for a run folder to be resumed or reused: the run's config, canonically."""
    return json.dumps(meta.get("config", {}), sort_keys=True, default=str)


def loader_workers(requested: int) -> int:
    """DataLoader worker processes: as configured, but never more than the usable cores (more only
    compete for them, and PyTorch warns about it on small machines)."""
    return max(0, min(requested, usable_cores()))


def weights_source(pretrained: str) -> str:
    """Where a model's starting weights come from, in words (for the start-of-run summary)."""
    if pretrained == "none":
        return "random initialisation (no pretrained weights)"
    if pretrained == "timm":
        return "timm's pretrained weights (from the model hub)"
    if pretrained.endswith(".safetensors"):
        return pretrained
    return f"{pretrained} ImageNet weights (installed package)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


class StaleCheckpoint(UserError):
    """A checkpoint to resume from that another config produced: one line and exit 2 at the CLI."""


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    o = cfg.optim
    if o.schedule == "plateau":  # stepped once per epoch with the validation score
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=o.plateau_factor,
                                                          patience=o.plateau_patience)
    warmup = int(o.warmup_epochs / max(cfg.epochs, 1) * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "none":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Trainer:
    """Fits one model; `fit()` returns the path of the best checkpoint."""

    def __init__(self, *, name: str, model: torch.nn.Module, train_set, plan: Callable[[int], EpochPlan],
                 step: StepFn, evaluate: EvalFn, cfg: TrainConfig, out_dir: Path, seed: int,
                 device: torch.device, info: DistInfo, meta: dict):
        self.name, self.model, self.train_set, self.plan = name, model, train_set, plan
        self.step, self.evaluate, self.cfg, self.out_dir = step, evaluate, cfg, Path(out_dir)
        self.seed, self.device, self.info, self.meta = seed, device, info, meta
        self.fingerprint = config_fingerprint(meta)
        if cfg.min_steps:  # enough epochs for the step budget (plans are per epoch, so count them)
            epochs, steps = 0, 0
            while epochs < cfg.epochs or steps < cfg.min_steps:
                steps += self._steps_for(len(plan(epochs).indices), cfg)
                epochs += 1
            cfg = dataclasses.replace(cfg, epochs=epochs)
            self.cfg = cfg
        self.optimizer = build_optimizer(model, cfg)
        self.epoch_steps = [self._steps(len(plan(e).indices)) for e in range(cfg.epochs)]
        self.total_steps = sum(self.epoch_steps)
        self.eval_every = max(1, math.ceil(cfg.epochs / cfg.max_evals))
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.history: list[dict] = []
        self.best_score, self.start_epoch = -math.inf, 0
        self._curves_drawn = -math.inf
        self.progress: progress.TrainingProgress | None = None  # set by fit()

    @property
    def last_path(self) -> Path:
        return self.out_dir / LAST_CHECKPOINT

    @property
    def best_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def _steps(self, n_items: int) -> int:
        return self._steps_for(n_items, self.cfg)

    def _steps_for(self, n_items: int, cfg: TrainConfig) -> int:
        per_rank = math.ceil(n_items / self.info.world_size)
        steps = math.ceil(per_rank / cfg.batch_size)
        return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps

    # --- checkpoints -------------------------------------------------------------------------------
    def _save_last(self, epoch: int) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict()}
        tensors, structure = flatten_state(state)
        tensors.update({f"model.{k}": v for k, v in self._raw_model().state_dict().items()})
        meta = {"epoch": epoch, "best_score": self.best_score, "history": self.history,
                "fingerprint": self.fingerprint, "structure": structure}
        save_checkpoint(self.last_path, tensors, meta)

    def _resume(self) -> None:
        if not self.last_path.exists():
            return
        tensors, meta = load_checkpoint(self.last_path)
        if meta.get("fingerprint") != self.fingerprint:
            raise StaleCheckpoint(
                f"{self.last_path} was trained with another config (e.g. a changed KD or training key); "
                f"remove {self.out_dir / Path(LAST_CHECKPOINT).stem}.* and {self.out_dir / Path(CHECKPOINT).stem}.* "
                f"to retrain (cached teacher outputs there are kept), or set another name= to keep both")
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self._raw_model().load_state_dict(model_state)
        state = unflatten_state({k: v for k, v in tensors.items() if not k.startswith("model.")}, meta["structure"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.best_score = list(meta["history"]), float(meta["best_score"])
        self.start_epoch = int(meta["epoch"]) + 1

    def _raw_model(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    # --- one epoch ---------------------------------------------------------------------------------
    def _loader(self, epoch: int, plan: EpochPlan) -> DataLoader:
        subset = Subset(self.train_set, plan.indices.tolist())
        sampler = DistributedSampler(subset, num_replicas=self.info.world_size, rank=self.info.rank,
                                     shuffle=True, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return DataLoader(subset, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=False,
                          num_workers=loader_workers(self.cfg.num_workers), generator=generator,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        plan = self.plan(epoch)
        loader = self._loader(epoch, plan)
        steps = self._steps(len(plan.indices))
        self.model.train()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        bar = progress.bar(loader, total=steps, desc=f"{self.name} epoch {epoch + 1}/{self.cfg.epochs} [{plan.mode}]",
                           disable=not self.info.is_main)
        last_batch = None
        for i, batch in enumerate(bar):
            if i >= steps:
                break
            batch = {k: model_input(v, self.device) if k == "image" else v.to(self.device, non_blocking=True)
                     for k, v in batch.items()}
            with torch.autocast(device_type=self.device.type, enabled=self.amp):
                loss, parts = self.step(self.model, batch, plan.mode)
            bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
            if all_reduce_mean(float(bad), self.info) > 0:
                raise self._diverged(f"loss became {loss.item()} at epoch {epoch + 1} step {i + 1} ({parts})")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            try:
                self.scaler.step(self.optimizer)
            except RuntimeError as exc:  # e.g. lr=1e39: the update itself overflows float32
                if "overflow" not in str(exc):
                    raise
                raise self._diverged(f"the optimizer update overflowed at epoch {epoch + 1} step {i + 1} ({exc}; "
                                     f"lr={self.optimizer.param_groups[0]['lr']:g})") from exc
            self.scaler.update()
            if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            mean_loss = totals["loss"] / counts["loss"]
            if hasattr(bar, "set_postfix"):  # a tqdm bar (terminal only)
                bar.set_postfix(loss=f"{mean_loss:.3f}")
            self.progress.step(epoch, i + 1, steps, mean_loss)
            last_batch = batch
        if last_batch is not None:
            self._check_last_update(epoch, last_batch, plan.mode)
        # Loss parts appear only in batches that have them (e.g. a task's CE needs a labelled image),
        # and ranks see different batches: merge sums and counts per key over all ranks.
        sums: dict[str, float] = {}
        seen: dict[str, int] = {}
        for rank_totals, rank_counts in gather_objects((totals, counts), self.info):
            for k, v in rank_totals.items():
                sums[k] = sums.get(k, 0.0) + v
                seen[k] = seen.get(k, 0) + rank_counts[k]
        return {f"train/{k}": sums[k] / seen[k] for k in sorted(sums)}

    def _check_last_update(self, epoch: int, batch: dict, mode: str) -> None:
        """Raise TrainingDiverged if the epoch's last update broke the weights.

        Each loss is checked before its update, so the last update of an epoch (the only one, with one
        step per epoch) would otherwise reach evaluation unchecked. The last batch's loss is recomputed
        with the new weights, in eval mode so that BatchNorm statistics and dropout are left alone."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
            self.model.eval()
            loss, _ = self.step(self.model, batch, mode)
            self.model.train()
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if all_reduce_mean(0.0 if finite else 1.0, self.info) > 0:
            raise self._diverged(f"the weights after the last update of epoch {epoch + 1} give a loss of "
                                 f"{loss.item()}")

    def _diverged(self, what: str) -> TrainingDiverged:
        """The divergence error: what happened, which checkpoint survives, and what to do."""
        kept = (f"the last good checkpoint is kept at {self.last_path}" if self.last_path.exists() else
                "no checkpoint was written yet (it diverged before the first validation)")
        return TrainingDiverged(
            f"[{self.name}] {what}; {kept}. Check the data, or lower the learning rate (optim.lr) and train "
            f"again under a new name (name=...) or after deleting {self.out_dir}.")

    # --- the run -----------------------------------------------------------------------------------
    def fit(self) -> Path:
        self._resume()
        self.progress = progress.TrainingProgress(self.name, self.epoch_steps, self.start_epoch, self.info.is_main)
        for line in self.describe():
            self.progress.say(line)
        if self.info.enabled and not isinstance(self.model, DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        writer = self._tensorboard()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self._fit_epoch(epoch, writer)
        except BaseException as exc:
            self.progress.failed(exc)
            raise
        finally:
            if writer is not None:
                writer.close()
        self.progress.finished(self.best_path)
        return self.best_path

    def _fit_epoch(self, epoch: int, writer) -> None:
        """Train one epoch; on a validation epoch also evaluate, checkpoint and log."""
        seed_everything(self.seed * 1000 + epoch)
        follow_thread_share()  # a parallel run's last jobs take the cores the finished ones freed
        t0 = time.perf_counter()
        logs = self._train_epoch(epoch)
        if (epoch + 1) % self.eval_every and epoch + 1 < self.cfg.epochs:
            # not a validation/checkpoint epoch (see TrainConfig.max_evals)
            self.progress.epoch_done(epoch, logs.get("train/loss"), None, False, time.perf_counter() - t0)
            return
        self.model.eval()
        score, val = self.evaluate(self._raw_model())
        score = float(broadcast_object(score, self.info))
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        record = {"epoch": epoch + 1, **logs, **val, "val/score": score,
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
        self.history.append(record)
        improved = score >= self.best_score  # a tie keeps the later (longer-trained) checkpoint
        if improved:
            self.best_score = score
        if self.info.is_main:
            if improved:
                save_model(self.best_path, self._raw_model(), {**self.meta, "epoch": epoch + 1, "val_score": score})
            self._save_last(epoch)
            self._write_logs(writer, record)
        self.progress.epoch_done(epoch, logs.get("train/loss"), score, improved, record["seconds"])
        barrier(self.info)

    def describe(self) -> list[str]:
        """The start-of-run summary: device (and CPU threads), AMP, backbone and weights, planned steps, output."""
        model_cfg = getattr(self._raw_model(), "cfg", None)
        o = self.cfg.optim
        # On the CPU the thread count changes the float summation order, and with it the trained weights
        # (the 70 % baseline moved 4.4 points of fine balanced accuracy between 1 and 2 threads): say it.
        threads = f" with {torch.get_num_threads()} thread(s)" if self.device.type == "cpu" else ""
        lines = [f"device {self.device}{threads}{f' x{self.info.world_size} (DDP)' if self.info.enabled else ''}, "
                 f"AMP {'on' if self.amp else 'off' + (' (CPU)' if self.device.type != 'cuda' else '')}"]
        if model_cfg is not None:
            lines.append(f"backbone {model_cfg.backbone}, weights: {weights_source(model_cfg.pretrained)}")
        pre = self.meta.get("preprocessing")
        if pre:  # the normalisation is per role (teachers/student): say which one this model sees
            stats = lambda v: "/".join(f"{x:g}" for x in v)  # noqa: E731
            lines.append(f"input {pre['size']} px ({pre['resize']}), mean {stats(pre['mean'])}, std {stats(pre['std'])}")
        lines.append(f"plan {self.cfg.epochs} epochs, {self.total_steps} optimizer steps (batch "
                     f"{self.cfg.batch_size}), {o.name} lr {o.lr:g} {o.schedule}, "
                     f"{loader_workers(self.cfg.num_workers)} loader worker(s)")
        lines.append(f"output {self.out_dir}")
        if self.start_epoch:
            lines.append(f"resuming after epoch {self.start_epoch} from {self.last_path}")
        return lines

    def _tensorboard(self):
        if not self.info.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but training must not die for a log
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def _write_logs(self, writer, record: dict) -> None:
        keys = sorted({k for r in self.history for k in r}, key=lambda k: (k != "epoch", k))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(self.out_dir / "metrics.csv", buf.getvalue())
        if writer is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["epoch"])
            writer.flush()
        # The PNG costs ~0.5 s of matplotlib: redrawn at most every CURVES_EVERY_S and after the last epoch
        # (metrics.csv and TensorBoard above are always current).
        last_epoch = record["epoch"] >= self.cfg.epochs
        if last_epoch or time.monotonic() - self._curves_drawn >= CURVES_EVERY_S:
            plot_curves(self.history, self.out_dir / "curves.png", title=self.name)
            self._curves_drawn = time.monotonic()

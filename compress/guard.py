"""The INT8 accuracy guard: quantize, compare with FP32 on the validation split, fall back, or fail.

Silent INT8 accuracy collapse (too few or unrepresentative calibration images) is the top complaint
of people deploying to Jetsons. Every INT8 model is therefore scored against its FP32 model with the
training metric code. A drop over its limit still passes when it is "within noise" (its paired
patient-bootstrap 95 % interval includes 0) and at most its noise cap (`noise_caps`); otherwise the
documented fallbacks are tried in order:

1. `method`: the other calibration methods (minmax / entropy / percentile);
2. `more_images`: twice the calibration images (all the training images there are, at most);
3. `sensitive_layers`: a per-layer sensitivity pass, then the most sensitive layers kept in float,
   one more at a time up to `max_float_layers`.

The first attempt that meets every threshold is kept. When none does, GuardFailed carries a report of
what was tried and what each attempt cost (drops, agreement, float layers, seconds).
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compress.calibration import calibrate, prepare_for_quantization
from compress.drops import format_drop, format_drops, within  # noqa: F401 (re-exported)
from compress.onnx_eval import evaluate_onnx
from compress.quantize_flavours import layer_sensitivity, quantize_cpu, quantize_tensorrt
from compress.settings import CALIBRATION_METHODS, CompressConfig, GuardConfig
from deploy.contract import TaskSpec
from deploy.errors import RunFailed
from deploy.fileio import atomic_write
from train.bootstrap import DEFAULT_RESAMPLES
from train.datasets import FundusImages
from train.evaluate import drop_intervals
from train.metrics import agreement, headline, present_ks, primary_metric, to_points

QUANTIZERS = {"int8-cpu": quantize_cpu, "int8-tensorrt": quantize_tensorrt}


def quantizer(flavour: str, ccfg: CompressConfig) -> Callable[..., Path]:
    """The function that makes `flavour`: ours, or ModelOpt's for int8-tensorrt when configured."""
    if flavour == "int8-tensorrt" and ccfg.tensorrt_quantizer == "modelopt":
        from compress.modelopt_quantizer import modelopt_quantize_fn, quantize_modelopt

        modelopt_quantize_fn()  # the install line now, not one crash per guard attempt
        return functools.partial(quantize_modelopt, high_precision_dtype=ccfg.modelopt_high_precision)
    return QUANTIZERS[flavour]


class GuardFailed(RunFailed):
    """No attempt kept the INT8 model within the configured accuracy drop."""

    def __init__(self, message: str, attempts: list[Attempt]):
        super().__init__(message)
        self.attempts = attempts


@dataclass
class Attempt:
    step: str
    method: str
    images: int
    float_layers: list[str]
    drops: dict[str, float]
    agreement: dict
    passed: bool
    seconds: float
    metrics: dict = field(default_factory=dict, repr=False)
    intervals: dict = field(default_factory=dict)  # paired 95 % interval of a drop over its limit, points

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("metrics")
        return data


def guarded_metrics(tasks: list[TaskSpec]) -> list[tuple[str, str]]:
    """(headline key, which threshold): each task's primary metric (train.metrics.primary_metric:
    balanced accuracy, kappa for ordinal tasks, BLEU) and top-5 where it can fail (more than 5 classes)."""
    out = []
    for t in tasks:
        out.append((primary_metric(t), "bleu" if t.kind == "text" else "accuracy"))
        if t.kind == "classification" and 5 in present_ks(t.num_classes):
            out.append((f"{t.name}/top5", "top5"))
    return out


def metric_drops(reference: dict, candidate: dict, tasks: list[TaskSpec]) -> dict[str, float]:
    """Drop in points (positive = worse) of each guarded metric; accuracies in %, BLEU as is."""
    ref, cand = headline(reference, tasks), headline(candidate, tasks)
    return {key: round(to_points(key, ref.get(key, 0.0) - cand.get(key, 0.0)), 3)
            for key, _ in guarded_metrics(tasks)}


def one_image_points(key: str, labels: np.ndarray, num_classes: int) -> float:
    """How many points one validation image can move `key`: 100/N for accuracy-like metrics and kappa;
    100/(classes present x smallest class) for balanced accuracy (an image of the rarest class)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    present = counts[counts > 0]
    if not present.size:
        return 0.0
    if key.endswith("/balanced_accuracy"):
        return 100.0 / (len(present) * present.min())
    return 100.0 / present.sum()


def noise_caps(guard: GuardConfig, tasks: list[TaskSpec], targets: dict | None = None) -> dict[str, float]:
    """The largest within-noise drop that passes, per guarded metric: `noise_cap_points`, or
    `noise_cap_images` validation images' worth on this split when that is more (`targets`: task ->
    class ids, -1 = no label), so a small validation split, where one image is many points, can still
    pass a drop it cannot tell from noise. BLEU: the points cap."""
    by_name = {t.name: t for t in tasks}
    caps = {}
    for key, kind in guarded_metrics(tasks):
        task = by_name[key.split("/")[0]]
        images = 0.0
        if kind != "bleu" and targets is not None and task.name in targets:
            images = guard.noise_cap_images * one_image_points(key, targets[task.name], task.num_classes)
        caps[key] = round(max(guard.noise_cap_points, images), 3)
    return caps


def metric_limits(guard: GuardConfig, tasks: list[TaskSpec]) -> dict[str, float]:
    """The allowed drop of each guarded metric, in points as configured."""
    points = {"accuracy": guard.max_drop_accuracy_points, "top5": guard.max_drop_top5_points,
              "bleu": guard.max_drop_bleu}
    return {key: points[kind] for key, kind in guarded_metrics(tasks)}


class Guard:
    """Quantizes one FP32 ONNX model into one flavour under the accuracy guard."""

    def __init__(self, fp32_path: Path, flavour: str, val: FundusImages, tasks: list[TaskSpec],
                 calibration_images: Callable[[int], np.ndarray], ccfg: CompressConfig, float_patterns: list[str],
                 range_cache: dict, reference: tuple[dict, dict], resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
        """`reference` = (outputs, metrics) of the FP32 model on `val`; `range_cache` is shared by flavours;
        `resamples`/`seed`: the paired patient bootstrap behind each drop's interval."""
        self.fp32_path, self.flavour, self.val, self.tasks = fp32_path, flavour, val, tasks
        self.images, self.cfg, self.patterns = calibration_images, ccfg, float_patterns
        self.ranges = range_cache  # (method, n_images) -> TensorsData, shared by the flavours
        self.fp32_outputs, self.fp32_metrics = reference
        self.limits = metric_limits(ccfg.guard, tasks)
        self.noise_caps = noise_caps(ccfg.guard, tasks, getattr(val, "targets", None))
        self.resamples, self.seed = resamples, seed
        self.attempts: list[Attempt] = []
        self.quantize = quantizer(flavour, ccfg)

    def ranges_for(self, method: str, n: int):
        """Calibration ranges of (method, n images), computed once and shared by the flavours and by the
        report's placement comparison (compress.quantize.placement_comparison)."""
        key = (method, n)
        if key not in self.ranges:
            self.ranges[key] = calibrate(self.fp32_path, self.images(n), method=method,
                                         percentile=self.cfg.percentile, batch_size=self.cfg.calibration_batch)
        return self.ranges[key]

    def _try(self, step: str, method: str, n: int, float_layers: list[str], out: Path) -> Attempt:
        t0 = time.perf_counter()
        try:
            self.quantize(self.fp32_path, out, self.ranges_for(method, n), nodes_to_exclude=float_layers,
                          exclude_patterns=self.patterns)
        except Exception as exc:  # noqa: BLE001 - e.g. a calibrator that fails on this graph: try the next
            attempt = Attempt(step, method, n, list(float_layers), {}, {"error": f"{type(exc).__name__}: {exc}"},
                              False, round(time.perf_counter() - t0, 2))
            self.attempts.append(attempt)
            print(f"  [{self.flavour}] {step}: {method}, {n} images failed ({type(exc).__name__}: {exc})", flush=True)
            return attempt
        outputs, metrics = evaluate_onnx(out, self.val, self.tasks, self.cfg.threads)
        drops = metric_drops(self.fp32_metrics, metrics, self.tasks)
        agree = agreement(outputs, self.fp32_outputs, self.tasks, self.val.dataset.vocabulary)
        intervals = self._intervals(outputs, drops)
        passed = within(drops, self.limits, intervals, self.noise_caps)
        attempt = Attempt(step, method, n, list(float_layers), drops, agree, passed,
                          round(time.perf_counter() - t0, 2), metrics, intervals)
        self.attempts.append(attempt)
        print(f"  [{self.flavour}] {step}: {method}, {n} images, {len(float_layers)} float layers -> "
              f"{format_drops(drops, self.limits, intervals)}: {'OK' if passed else 'over the limit'}", flush=True)
        return attempt

    def run(self, out_path: Path, available_images: int,
            finalize: Callable[[Path, Attempt], None] | None = None) -> Attempt:
        """Write the first passing model to out_path; raise GuardFailed with every attempt otherwise.

        `finalize(candidate, attempt)` may rewrite the kept candidate (e.g. stamp its contract) before
        it is moved into place atomically, so out_path never holds a half-finished model."""
        self._finalize = finalize
        cfg, guard = self.cfg, self.cfg.guard
        n = min(cfg.calibration_images, available_images)
        with tempfile.TemporaryDirectory(prefix="guard.") as tmp:
            candidate = Path(tmp) / "candidate.onnx"
            best = self._try("configured", cfg.calibration_method, n, [], candidate)
            if best.passed:
                return self._keep(best, candidate, out_path)
            method = cfg.calibration_method
            for step in guard.fallbacks:
                if step == "method":
                    for other in (m for m in CALIBRATION_METHODS if m != cfg.calibration_method):
                        a = self._try("fallback: method", other, n, [], candidate)
                        if a.passed:
                            return self._keep(a, candidate, out_path)
                        if self._worst(a) < self._worst(best):
                            best, method = a, other
                elif step == "more_images" and available_images > n:
                    n = min(2 * n, available_images)
                    a = self._try("fallback: more images", method, n, [], candidate)
                    if a.passed:
                        return self._keep(a, candidate, out_path)
                elif step == "sensitive_layers":
                    a = self._sensitive(method, n, candidate)
                    if a is not None and a.passed:
                        return self._keep(a, candidate, out_path)
        tried = "\n".join(f"  - {a.step}: {a.method}, {a.images} images, float layers {a.float_layers}: "
                          f"{format_drops(a.drops, self.limits, a.intervals)}" for a in self.attempts)
        raise GuardFailed(f"{self.fp32_path.name} [{self.flavour}]: no attempt stayed within the accuracy "
                          f"guard (limits in points {self.limits}):\n{tried}\nUse more or more representative "
                          f"calibration images, or relax compress.guard.", self.attempts)

    def _intervals(self, outputs: dict, drops: dict[str, float]) -> dict[str, list[float] | None]:
        """Paired patient-bootstrap 95 % interval of each drop over its limit (FP32 minus INT8 on the same
        resampled validation patients), in points; {} when the outputs are not at hand."""
        over = [k for k, d in drops.items() if d > self.limits.get(k, 0.0)]
        if not over or not outputs or not self.fp32_outputs or not hasattr(self.val, "rows"):
            return {}
        return drop_intervals(self.fp32_outputs, outputs, self.val, self.tasks, over, self.resamples, self.seed)

    def _sensitive(self, method: str, n: int, candidate: Path) -> Attempt | None:
        """Rank weighted layers by how much keeping each in float helps, then add them one by one."""
        with tempfile.TemporaryDirectory(prefix="sens.") as tmp:  # names as the quantizer sees them
            model = onnx.load(str(prepare_for_quantization(self.fp32_path, Path(tmp) / "prepared.onnx")))
        weighted = [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
                    and not any(re.search(p, node.name) for p in self.patterns)]
        limits = self.cfg.guard

        def score(path: Path) -> float:  # negative worst normalized drop: higher is better
            _, metrics = evaluate_onnx(path, self.val, self.tasks, self.cfg.threads)
            return -self._worst_drops(metric_drops(self.fp32_metrics, metrics, self.tasks))

        # The first and last weighted layers are the usual suspects; bound the pass's cost.
        k = limits.sensitivity_candidates
        candidates = list(dict.fromkeys(weighted[: k // 2] + weighted[-(k - k // 2):]))
        ranked = layer_sensitivity(self.fp32_path, self.ranges_for(method, n), self.flavour.removeprefix("int8-"),
                                   score, candidates, max_candidates=max(len(candidates), 1),
                                   exclude_patterns=self.patterns)
        attempt = None
        for m in range(1, min(limits.max_float_layers, len(ranked)) + 1):
            layers = [name for group, _ in ranked[:m] for name in group.split("+")]
            attempt = self._try(f"fallback: {m} sensitive layer(s) in float", method, n, layers, candidate)
            if attempt.passed:
                break
        return attempt

    def _worst_drops(self, drops: dict[str, float]) -> float:
        """The largest drop relative to its limit (> 1 means over the limit)."""
        return max((drops[k] / max(limit, 1e-9) for k, limit in self.limits.items() if k in drops), default=0.0)

    def _worst(self, attempt: Attempt) -> float:
        return self._worst_drops(attempt.drops) if attempt.drops else float("inf")

    def _keep(self, attempt: Attempt, candidate: Path, out_path: Path) -> Attempt:
        if self._finalize is not None:
            self._finalize(candidate, attempt)
        atomic_write(out_path, lambda tmp: shutil.copyfile(candidate, tmp))
        return attempt

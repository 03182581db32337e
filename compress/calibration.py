"""Post-training calibration: run ONNX Runtime's calibrator once and keep the tensor ranges.

Calibration (running the float model over representative images and recording every tensor's
range) is the slow part of static INT8 quantization. ``quantize_static`` redoes it on every call,
so here it runs once and the resulting ``TensorsData`` feeds every flavour in
``compress.quantize_flavours`` (CPU U8S8 and TensorRT S8S8 from the same numbers).

The ranges are computed on the *prepared* model (``prepare_for_quantization``: ORT's
``quant_pre_process``, which folds constants and fuses Conv+BN), because the flavours quantize that
prepared graph and ranges are looked up by tensor name.

    from compress.calibration import calibrate
    ranges = calibrate("student.onnx", batches, method="percentile")
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import (
    TensorsData,
    create_calibrator,
    load_tensors_data,
    save_tensors_data,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from deploy.errors import MissingInput

log = logging.getLogger(__name__)

METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def parse_method(name: str) -> CalibrationMethod:
    """Map a config string (minmax | entropy | percentile) to ORT's CalibrationMethod."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown calibration method {name!r}; choose one of {sorted(METHODS)}") from None


def model_input_name(model: str | Path | onnx.ModelProto) -> str:
    """Name of the single graph input (initializers listed as inputs by old exporters excluded)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {init.name for init in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(
            f"calibration expects a model with exactly one image input, found {names}; "
            "export the image encoder alone or feed a dict-producing reader"
        )
    return names[0]


class BatchReader(CalibrationDataReader):
    """CalibrationDataReader over preprocessed image batches (float32 [N,3,S,S]).

    ``batches`` is an array [M,3,S,S] (split into ``batch_size`` chunks) or an iterable of arrays;
    an iterable is materialised once so that ``rewind`` can replay it (memory: keep calibration
    sets to a few hundred images).
    """

    def __init__(self, batches: np.ndarray | Iterable[np.ndarray], input_name: str, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(batches, np.ndarray):
            items = [batches[i : i + batch_size] for i in range(0, len(batches), batch_size)]
        else:
            items = list(batches)
        if not items:
            raise ValueError("calibration needs at least one batch of images; got none")
        self._batches = [self._check(b, k) for k, b in enumerate(items)]
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(self._batches)

    @staticmethod
    def _check(batch: np.ndarray, index: int) -> np.ndarray:
        arr = np.ascontiguousarray(batch, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise ValueError(
                f"calibration batch {index} has shape {arr.shape}; expected [N,3,S,S] float32 "
                "as produced by deploy.preprocess"
            )
        return arr

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def by_shape(self) -> list[BatchReader]:
        """Readers over the batches of each shape (the full batches, then a smaller last one).

        ORT's histogram calibrators (entropy, percentile) stack every batch's outputs into one array,
        which fails ("inhomogeneous shape") as soon as the image count is not a multiple of the batch
        size; fed one shape at a time they merge the histograms instead."""
        groups: dict[tuple[int, ...], list[np.ndarray]] = {}
        for batch in self._batches:
            groups.setdefault(batch.shape, []).append(batch)
        return [BatchReader(batches, self.input_name) for batches in groups.values()]

    @property
    def num_images(self) -> int:
        """Total number of images over all batches (reported next to accuracy figures)."""
        return sum(len(b) for b in self._batches)


def prepare_for_quantization(src: str | Path, dst: str | Path) -> Path:
    """Run ORT's ``quant_pre_process`` (shape inference + basic graph optimisation) into ``dst``.

    Symbolic shape inference fails on some graphs (e.g. unrolled decoders with data-dependent
    shapes); then it is skipped, which only costs quantization coverage of tensors whose shape ONNX
    shape inference cannot infer. The outcome is logged so nobody wonders why.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MissingInput(f"model to quantize not found: {src}")
    try:
        quant_pre_process(str(src), str(dst))
    except Exception as err:  # symbolic inference raises many types; any of them means "skip it"
        log.warning(
            "symbolic shape inference failed on %s (%s); retrying with skip_symbolic_shape=True", src, err
        )
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


ENTROPY_BINS = 2048


def calibrate(
    model_path: str | Path,
    batches: np.ndarray | Iterable[np.ndarray] | CalibrationDataReader,
    method: str = "minmax",
    percentile: float = 99.999,
    num_bins: int | None = None,
    batch_size: int = 8,
    prepare: bool = True,
) -> TensorsData:
    """Calibrate ``model_path`` once and return the ranges of all its float tensors.

    ``method``: minmax | entropy | percentile (``percentile`` in (0, 100], default 99.999).
    Ranges are computed asymmetrically even for percentile (ORT's default there is symmetric) so
    the U8 CPU flavour keeps its full range on post-ReLU tensors; the TensorRT flavour symmetrises
    them itself (``ActivationSymmetric``). With ``prepare`` (default) the ranges belong to the
    ``prepare_for_quantization`` form of the model, which is what the flavours quantize.
    """
    calib_method = parse_method(method)
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    model_path = Path(model_path)
    options: dict[str, object] = {"symmetric": False}
    if calib_method == CalibrationMethod.Percentile:
        options["percentile"] = percentile
    if calib_method == CalibrationMethod.Entropy and num_bins is None:
        # ORT's default is 128 histogram bins for 128 quantized bins: the KL search then has a single
        # candidate, the full range, and entropy silently equals minmax. TensorRT's entropy calibrator
        # searches 2048 bins.
        num_bins = ENTROPY_BINS
    if num_bins is not None and calib_method != CalibrationMethod.MinMax:
        options["num_bins"] = num_bins
    with tempfile.TemporaryDirectory(prefix="calib.") as tmp:
        target = prepare_for_quantization(model_path, Path(tmp) / "prepared.onnx") if prepare else model_path
        reader = (
            batches
            if isinstance(batches, CalibrationDataReader)
            else BatchReader(batches, model_input_name(target), batch_size)
        )
        calibrator = create_calibrator(
            target,
            op_types_to_calibrate=None,  # every float tensor: any flavour may need any of them
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calib_method,
            extra_options=options,
        )
        # The histogram calibrators print progress to stdout; keep it in the debug log instead.
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            for part in reader.by_shape() if isinstance(reader, BatchReader) else [reader]:
                calibrator.collect_data(part)
            ranges = calibrator.compute_data()
        log.debug("calibrator output:\n%s", chatter.getvalue())
        del calibrator  # releases the session holding the augmented model before the dir goes
    log.info("calibrated %d tensors of %s with %s", len(ranges.data), model_path.name, method)
    return ranges


def symmetric_scale(ranges: TensorsData, tensor: str) -> float:
    """The symmetric INT8 scale of `tensor`'s calibrated range: max |range| / 127 (zero point 0), as
    TensorRT and ORT's symmetric activations use it."""
    low, high = (float(np.asarray(v).reshape(-1)[0]) for v in ranges[tensor].range_value)
    return max(abs(low), abs(high), 1e-8) / 127.0


def save_ranges(ranges: TensorsData, path: str | Path) -> Path:
    """Write ranges as ORT's JSON calibration cache (atomic), so a later run can skip calibration."""
    save_tensors_data(ranges, path)
    return Path(path)


def load_ranges(path: str | Path) -> TensorsData:
    """Read ranges written by ``save_ranges`` (or by ``quantize_static(calibration_cache_path=...)``)."""
    return load_tensors_data(path)

"""The int8-tensorrt flavour made by NVIDIA's Model Optimizer instead of our placement (optional).

    compress.tensorrt_quantizer: modelopt      # in the experiment config (default: ort)

`nvidia-modelopt` is an optional install (its `[onnx]` extra pins other onnx / onnxruntime versions than
the training stack, so it lives in its own environment: README, INT8 for TensorRT). It quantizes the same
prepared graph our calibration measured, with our activation ranges handed over as a TensorRT
calibration cache, so the guard's fallbacks (another method, more images, float layers) still apply and
the two placements differ only in where Q/DQ goes and in the FP16 remainder (`high_precision_dtype`).
"""

from __future__ import annotations

import re
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnxruntime.quantization.calibrate import TensorsData

from compress.calibration import prepare_for_quantization, symmetric_scale
from compress.quantize_flavours import FLOAT_OP_TYPES, resolve_exclusions
from deploy.errors import UserError

INSTALL_HINT = ("nvidia-modelopt is not installed: `pip install 'nvidia-modelopt[onnx]'` in a separate "
                "environment (its onnx/onnxruntime pins differ from the training stack), or set "
                "compress.tensorrt_quantizer: ort")


class ModelOptMissing(UserError):
    """compress.tensorrt_quantizer is modelopt but the package cannot be imported."""


def modelopt_quantize_fn():
    """modelopt.onnx.quantization.quantize, or ModelOptMissing with the install line."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise ModelOptMissing(f"{INSTALL_HINT} ({exc})") from exc
    return quantize


def tensorrt_calibration_cache(ranges: TensorsData, path: Path) -> Path:
    """Write symmetric INT8 scales (max |range| / 127) in TensorRT's calibration-cache text format:
    a header line, then `tensor: <big-endian float32 hex>` per tensor (what ModelOpt's
    import_scales_from_calib_cache and TensorRT's IInt8Calibrator read)."""
    lines = ["TRT-8501-MinMaxCalibration"]
    for name in ranges.keys():
        lines.append(f"{name}: {struct.pack('!f', symmetric_scale(ranges, name)).hex()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def quantize_modelopt(
    fp32_path: str | Path,
    out_path: str | Path,
    tensors_range: TensorsData,
    nodes_to_exclude: Iterable[str] = (),
    exclude_patterns: Iterable[str] = (),
    float_op_types: Iterable[str] = FLOAT_OP_TYPES,
    high_precision_dtype: str = "fp16",
) -> Path:
    """Same signature as compress.quantize_flavours.quantize_tensorrt (the guard calls either)."""
    quantize = modelopt_quantize_fn()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelopt.") as tmp:
        prepared = prepare_for_quantization(fp32_path, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(prepared))
        excluded = resolve_exclusions(model, nodes_to_exclude, exclude_patterns, float_op_types)
        image = model.graph.input[0]
        size = [d.dim_value for d in image.type.tensor_type.shape.dim][1:]
        cache = tensorrt_calibration_cache(tensors_range, Path(tmp) / "calibration.cache")
        quantize(
            str(prepared),
            quantize_mode="int8",
            calibration_cache_path=str(cache),  # our scales replace ModelOpt's own calibration
            calibration_shapes=f"{image.name}:1x" + "x".join(str(d) for d in size),
            calibration_eps=["cpu"],
            nodes_to_exclude=[re.escape(name) for name in excluded],
            high_precision_dtype=high_precision_dtype,
            output_path=str(out_path),
        )
    return out_path

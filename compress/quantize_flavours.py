"""The three reduced-precision flavours of one FP32 ONNX model, from one calibration.

* ``quantize_cpu``      INT8 QDQ for ONNX Runtime on x86: U8 activations, S8 per-channel weights,
                        after ``quant_pre_process`` (measured ~2x faster than FP32 on an AVX-512 VNNI
                        CPU at batch 1, e.g. efficientnet_lite0 1.06 vs 2.06 ms; no faster without it).
* ``quantize_tensorrt`` INT8 explicit-quantization QDQ that TensorRT 10 accepts: S8 activations and
                        weights, every zero point 0, per-channel weights on the output-channel axis,
                        Q/DQ on the inputs of weighted layers, of residual Adds (skip input only) and
                        pools (ModelOpt's placement); bias/Softmax/decoder left float.
                        (Slower than FP32 on the CPU; it is meant for Jetson.)
* ``convert_fp16``      FP16 weights/activations with FP32 I/O for GPUs.

    ranges = calibration.calibrate("student.onnx", images)
    quantize_cpu("student.onnx", "student.int8-cpu.onnx", ranges)
    quantize_tensorrt("student.onnx", "student.int8-trt.onnx", ranges, exclude_patterns=["decoder"])
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData

from compress.calibration import prepare_for_quantization, save_ranges
from compress.trt_placement import (
    POOL_OP_TYPES,
    non_residual_adds,
    quantize_pool_inputs,
    residual_adds,
    unquantize_inputs,
)

log = logging.getLogger(__name__)

Flavour = Literal["cpu", "tensorrt"]
FLAVOURS: tuple[str, ...] = ("cpu", "tensorrt")

# TensorRT quantizes weighted layers; everything else runs in the precision it is fed.
TRT_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ...plus, following ModelOpt's placement, residual Adds and pools (compress/trt_placement.py).
TRT_PLACED_OP_TYPES: tuple[str, ...] = (*TRT_OP_TYPES, "Add", *POOL_OP_TYPES)
# Ops kept in float by default: probabilities feed temperatures/KD and top-5; cheap anyway.
FLOAT_OP_TYPES: tuple[str, ...] = ("Softmax", "LogSoftmax")

TRT_EXTRA_OPTIONS: dict[str, object] = {
    "ActivationSymmetric": True,  # zero point 0 on activations (TensorRT rejects others)
    "WeightSymmetric": True,
    "QuantizeBias": False,  # TensorRT has no INT32 DequantizeLinear; it fuses float bias itself
    "OpTypesToExcludeOutputQuantization": list(TRT_PLACED_OP_TYPES),  # Q/DQ on inputs only
    "MatMulConstBOnly": True,  # activation x activation MatMuls stay float
    "DedicatedQDQPair": True,  # one pair per consumer: TensorRT fuses each into its own layer
    "QDQKeepRemovableActivations": True,  # keep Clip/Relu: symmetric Q does not clip at 0/6
}


def resolve_exclusions(
    model: onnx.ModelProto,
    nodes_to_exclude: Iterable[str] = (),
    exclude_patterns: Iterable[str] = (),
    float_op_types: Iterable[str] = FLOAT_OP_TYPES,
) -> list[str]:
    """Node names to keep in float: explicit names + names matching a regex + nodes of given op types.

    A pattern is a regular expression searched in the node name (so a plain ``decoder`` matches
    ``/decoder/gru/MatMul``). Unknown explicit names are an error: a typo would silently quantize.
    """
    names = {n.name for n in model.graph.node}
    explicit = list(nodes_to_exclude)
    missing = [n for n in explicit if n not in names]
    if missing:
        raise ValueError(
            f"nodes_to_exclude names not in the model: {missing[:5]}; list names with onnx.load(...).graph.node"
        )
    regexes = [re.compile(p) for p in exclude_patterns]
    op_types = set(float_op_types)
    chosen = set(explicit)
    for node in model.graph.node:
        if node.op_type in op_types or any(r.search(node.name) for r in regexes):
            chosen.add(node.name)
    for regex in regexes:
        if not any(regex.search(n) for n in names):
            log.warning("exclude pattern %r matches no node name", regex.pattern)
    return sorted(chosen)


def _check_coverage(model: onnx.ModelProto, ranges: TensorsData) -> None:
    """Fail early when the ranges were computed on a different graph (names do not match)."""
    inputs = [i.name for i in model.graph.input]
    if not any(name in ranges for name in inputs):
        raise ValueError(
            f"calibration ranges do not cover the model input(s) {inputs}; they were computed on another "
            "model. Calibrate this model with compress.calibration.calibrate (same prepare step)"
        )


def _quantize(
    fp32_path: str | Path,
    out_path: str | Path,
    tensors_range: TensorsData,
    *,
    activation_type: QuantType,
    op_types: Sequence[str] | None,
    extra_options: dict[str, object],
    nodes_to_exclude: Iterable[str],
    exclude_patterns: Iterable[str],
    float_op_types: Iterable[str],
    residual_rules: bool = False,
) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quant.") as tmp:
        prepared = prepare_for_quantization(fp32_path, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(prepared))
        _check_coverage(model, tensors_range)
        excluded = resolve_exclusions(model, nodes_to_exclude, exclude_patterns, float_op_types)
        # ModelOpt's placement (compress/trt_placement.py): only residual Adds are quantized, and
        # only on their skip input, which is fixed up after ORT has placed its pairs.
        skip_free = residual_adds(model) if residual_rules else {}
        if residual_rules:
            excluded = sorted(set(excluded) | set(non_residual_adds(model)))
        # quantize_static's calibration cache is its public door for precomputed ranges: with the
        # file present it skips calibration and quantizes with these numbers.
        cache = save_ranges(tensors_range, Path(tmp) / "ranges.json")
        quantize_static(
            str(prepared),
            str(out_path),
            calibration_data_reader=None,
            calibration_cache_path=cache,
            calibrate_method=tensors_range.calibration_method,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=True,
            reduce_range=False,
            activation_type=activation_type,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            extra_options=copy.deepcopy(extra_options),
        )
    _finish(out_path, {n: t for n, t in skip_free.items() if n not in excluded},
            tensors_range if residual_rules else None, excluded)
    log.info("wrote %s (%d nodes kept float)", out_path, len(excluded))
    return out_path


def _finish(path: Path, non_residual_inputs: dict[str, str], pool_ranges: TensorsData | None,
            excluded: list[str]) -> None:
    """TensorRT placement fix-ups (conv-branch input of residual Adds float, every pool's input
    quantized); keep only the opsets nodes use."""
    model = onnx.load(str(path))
    unquantize_inputs(model, non_residual_inputs)
    if pool_ranges is not None:
        quantize_pool_inputs(model, pool_ranges, skip=set(excluded))
    _drop_unused_opsets(model)
    onnx.save(model, str(path))


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """ORT's optimiser declares a dozen contrib domains; keep only those nodes use (parsers care)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def quantize_cpu(
    fp32_path: str | Path,
    out_path: str | Path,
    tensors_range: TensorsData,
    nodes_to_exclude: Iterable[str] = (),
    exclude_patterns: Iterable[str] = (),
    float_op_types: Iterable[str] = FLOAT_OP_TYPES,
) -> Path:
    """ONNX Runtime CPU flavour: QDQ, U8 asymmetric activations, S8 symmetric per-channel weights.

    ``reduce_range=False``: this machine (and any AVX-512 VNNI / AVX-VNNI x86) accumulates u8*s8
    without the 16-bit saturation that made 7-bit weights necessary on older AVX2 CPUs. All of ORT's
    quantizable op types are quantized except ``float_op_types`` and the excluded nodes.
    """
    return _quantize(
        fp32_path, out_path, tensors_range,
        activation_type=QuantType.QUInt8, op_types=None, extra_options={},
        nodes_to_exclude=nodes_to_exclude, exclude_patterns=exclude_patterns, float_op_types=float_op_types,
    )  # fmt: skip


def quantize_tensorrt(
    fp32_path: str | Path,
    out_path: str | Path,
    tensors_range: TensorsData,
    nodes_to_exclude: Iterable[str] = (),
    exclude_patterns: Iterable[str] = (),
    float_op_types: Iterable[str] = FLOAT_OP_TYPES,
) -> Path:
    """TensorRT explicit-quantization flavour (feed it to a STRONGLY_TYPED network).

    Weighted layers (Conv, ConvTranspose, MatMul with a constant B, Gemm), residual Adds on their skip
    input and pools, as NVIDIA's Model Optimizer places them (compress/trt_placement.py); weights per channel
    on the output-channel axis as ORT picks it: Conv 0, ConvTranspose 1, Gemm 0 with transB=1
    (1 otherwise), MatMul B [K,N] axis 1 (N) -- the axes TensorRT requires (checked by
    ``compress.trt_check.check_qdq_for_tensorrt``). Pass the decoder's node-name prefix in
    ``exclude_patterns`` to keep the text decoder float.
    """
    return _quantize(
        fp32_path, out_path, tensors_range,
        activation_type=QuantType.QInt8, op_types=TRT_PLACED_OP_TYPES, extra_options=TRT_EXTRA_OPTIONS,
        nodes_to_exclude=nodes_to_exclude, exclude_patterns=exclude_patterns, float_op_types=float_op_types,
        residual_rules=True,
    )  # fmt: skip


FP16_BLOCKED_OPS: tuple[str, ...] = ("ArgMax", "ArgMin", "Softmax", "LogSoftmax")


def convert_fp16(
    fp32_path: str | Path,
    out_path: str | Path,
    keep_io_types: bool = True,
    op_block_list: Iterable[str] = FP16_BLOCKED_OPS,
    node_block_list: Iterable[str] = (),
) -> Path:
    """FP16 copy of a float model (ORT's converter); inputs/outputs stay FP32 with ``keep_io_types``.

    ORT's default block list (TopK, Range, CumSum, Min/Max, ...) is always kept; ``op_block_list``
    adds ops whose decisions or normalisation we keep in FP32 (argmax ties, softmax sums).
    Integer tensors are untouched by the converter.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(fp32_path))
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list))
    fp16 = convert_float_to_float16(
        model, keep_io_types=keep_io_types, op_block_list=blocked, node_block_list=list(node_block_list)
    )
    onnx.save(fp16, str(out_path))
    return out_path


def _zero_point_info(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[str, bool]:
    """(dtype name, all-zero?) of a Q/DQ node's zero point; ONNX defaults to uint8 0 when absent."""
    if len(node.input) > 2 and node.input[2]:
        zp = inits.get(node.input[2])
        if zp is None:
            return "unknown (not an initializer)", False
        arr = numpy_helper.to_array(zp)
        return str(arr.dtype), bool(np.all(arr == 0))
    if node.op_type == "DequantizeLinear" and node.input[0] in inits:
        return str(numpy_helper.to_array(inits[node.input[0]]).dtype), True
    return "uint8", True


def qdq_summary(model: str | Path | onnx.ModelProto) -> dict[str, object]:
    """Counts and properties of the Q/DQ nodes of a model (for tests, checks and reports).

    Keys: quantize_linear, dequantize_linear (counts), zero_point_dtypes (dtype -> count),
    zero_points_all_zero (bool), weight_dq (DQs on int8 weight initializers), per_channel_axes
    (axis -> count over those), per_tensor_weights, bias_dq (DQs on int32 biases), quantized_nodes (names of non-Q/DQ nodes fed by
    a DequantizeLinear), dq_outputs (graph outputs produced directly by a DequantizeLinear).
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    dtypes: Counter[str] = Counter()
    all_zero = True
    axes: Counter[int] = Counter()
    per_tensor = bias = 0
    for node in qdq:
        dtype, zero = _zero_point_info(node, inits)
        dtypes[dtype] += 1
        all_zero &= zero
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            if inits[node.input[0]].data_type == onnx.TensorProto.INT32:
                bias += 1
                continue
            scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else np.ones(1)
            if scale.size > 1:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                axes[axis] += 1
            else:
                per_tensor += 1
    dq_out = {o for n in qdq if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sorted(
        {
            n.name
            for n in graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_out & set(n.input)
        }
    )
    return {
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in qdq),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in qdq),
        "zero_point_dtypes": dict(dtypes),
        "zero_points_all_zero": all_zero,
        "weight_dq": sum(axes.values()) + per_tensor,
        "per_channel_axes": dict(axes),
        "per_tensor_weights": per_tensor,
        "bias_dq": bias,
        "quantized_nodes": quantized,
        "dq_outputs": sorted(o.name for o in graph.output if o.name in dq_out),
    }


_QUANTIZERS: dict[str, Callable[..., Path]] = {"cpu": quantize_cpu, "tensorrt": quantize_tensorrt}


def layer_sensitivity(
    fp32_path: str | Path,
    tensors_range: TensorsData,
    flavour: Flavour,
    eval_fn: Callable[[Path], float],
    candidates: Sequence[str | Sequence[str]],
    max_candidates: int = 32,
    **quantize_kwargs: object,
) -> list[tuple[str, float]]:
    """Score each candidate by quantizing with it kept float; best (most sensitive) first.

    A candidate is a node name or a group of names (reported joined with '+'). ``eval_fn`` maps a
    model path to a metric where higher is better; compare the scores with ``eval_fn`` of the fully
    quantized model to see what each exclusion buys. Each candidate costs one quantization and one
    evaluation, hence the explicit ``max_candidates`` bound.
    """
    if flavour not in _QUANTIZERS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    if len(candidates) > max_candidates:
        raise ValueError(
            f"{len(candidates)} candidates exceed max_candidates={max_candidates}; pass the layers you "
            "suspect (e.g. the first conv, the heads) or raise max_candidates knowingly"
        )
    base_excluded = list(quantize_kwargs.pop("nodes_to_exclude", ()))  # type: ignore[call-overload]
    scores: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="sens.") as tmp:
        for k, cand in enumerate(candidates):
            group = [cand] if isinstance(cand, str) else list(cand)
            out = Path(tmp) / f"cand{k}.onnx"
            _QUANTIZERS[flavour](
                fp32_path, out, tensors_range, nodes_to_exclude=base_excluded + group, **quantize_kwargs
            )
            scores.append(("+".join(group), float(eval_fn(out))))
            out.unlink()
    return sorted(scores, key=lambda item: item[1], reverse=True)

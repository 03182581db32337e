"""TensorRT ONNX-parser operator support table, kept in the repo so the check runs without TensorRT.

Source: onnx/onnx-tensorrt ``docs/operators.md`` ("Operator Support Matrix"), the 10.x branch that
TensorRT 10.3 (JetPack 6) ships. The rows below were transcribed from a 10.x copy of that file and
cross-read with the 8.4 copy; the layout mirrors it so a diff against a newer file is easy.
Supported column: ``Y`` supported, ``N`` not supported, ``?`` supported in later 10.x docs but not
confirmed for 10.3 (the checker reports those as warnings, not errors). Types are those the doc
lists for the op's main tensor input. Restrictions quote the doc; the ones that can be checked
statically are enforced by ``attribute_rules`` below (called from ``compress.trt_check``).

General notes from the same doc (10.x): INT8/INT4/FP8 exist only as quantized types (the output of
QuantizeLinear / input of DequantizeLinear); UINT8 only as network input or output; DOUBLE is cast
down to FLOAT (clamped to +-FLT_MAX); INT64 is supported natively since 10.0 but most layers compute
in INT32, so int64 values beyond the int32 range are clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

SOURCE = "https://github.com/onnx/onnx-tensorrt/blob/release/10.3-GA/docs/operators.md"
# "TensorRT 10.x supports operators in the inclusive range of opset 9 to opset 20" (10.0-10.3 doc
# header; later 10.x releases raise the upper bound).
OPSET_RANGE = {"10.3": (9, 20)}

_F = "FP32, FP16, BF16"
_FI = "FP32, FP16, BF16, INT32, INT64"
_FIB = "FP32, FP16, BF16, INT32, INT64, BOOL"

# Operator | Supported | Types | Restrictions
_TABLE_10_3 = f"""
Abs | Y | {_FI} |
Acos | Y | {_F} |
Acosh | Y | {_F} |
Add | Y | {_FI} |
AffineGrid | N | |
And | Y | BOOL |
ArgMax | Y | {_FI} |
ArgMin | Y | {_FI} |
Asin | Y | {_F} |
Asinh | Y | {_F} |
Atan | Y | {_F} |
Atanh | Y | {_F} |
AveragePool | Y | {_F} | 2D or 3D Pooling only. `dilations` must be empty or all ones
BatchNormalization | Y | {_F} |
Bernoulli | N | |
BitShift | N | |
BitwiseAnd | N | |
BitwiseNot | N | |
BitwiseOr | N | |
BitwiseXor | N | |
BlackmanWindow | Y | FP32, FP16 |
Cast | Y | {_FIB}, UINT8 |
CastLike | Y | {_FIB}, UINT8 |
Ceil | Y | {_F} |
Celu | Y | {_F} |
CenterCropPad | N | |
Clip | Y | {_F} |
Col2Im | N | |
Compress | N | |
Concat | Y | {_FIB} |
ConcatFromSequence | N | |
Constant | Y | {_FIB}, FP8, INT4 | `sparse_value`, `value_string`, and `value_strings` attributes are unsupported
ConstantOfShape | Y | {_FIB} |
Conv | Y | {_F} |
ConvInteger | N | |
ConvTranspose | Y | {_F} |
Cos | Y | {_F} |
Cosh | Y | {_F} |
CumSum | Y | {_F} | `axis` must be a build-time constant
DFT | N | |
DeformConv | N | | added after 10.3
DepthToSpace | Y | {_FI} |
DequantizeLinear | Y | INT8, FP8, INT4 | `x_zero_point` must be zero
Det | N | |
Div | Y | {_FI} |
Dropout | Y | {_F} | `is_training` must be an initializer and evaluate to False
DynamicQuantizeLinear | N | |
Einsum | Y | {_F} |
Elu | Y | {_F} |
Equal | Y | {_FI} |
Erf | Y | {_F} |
Exp | Y | {_F} |
Expand | Y | {_FIB} |
EyeLike | Y | {_FIB} |
Flatten | Y | {_FIB} |
Floor | Y | {_F} |
Gather | Y | {_FIB} |
GatherElements | Y | {_FIB} |
GatherND | Y | {_FIB} |
Gelu | ? | {_F} | opset-20 op; listed in later 10.x docs
Gemm | Y | {_F} |
GlobalAveragePool | Y | {_F} |
GlobalLpPool | Y | {_F} |
GlobalMaxPool | Y | {_F} |
Greater | Y | {_FI} |
GreaterOrEqual | Y | {_FI} |
GridSample | Y | FP32, FP16 | Input must be 4D input
GroupNormalization | Y | {_F} |
GRU | Y | {_F} | For bidirectional GRUs, activation functions must be the same for both the forward and reverse pass
HammingWindow | Y | FP32, FP16 |
HannWindow | Y | FP32, FP16 |
HardSigmoid | Y | {_F} |
HardSwish | Y | {_F} |
Hardmax | ? | {_F} | `axis` dimension of input must be a build-time constant
Identity | Y | {_FIB} |
If | Y | {_FIB} | Output tensors of the two conditional branches must have the same rank and must have different names
ImageDecoder | N | |
ImageScaler | Y | {_F} |
InstanceNormalization | Y | {_F} |
IsInf | Y | {_F} |
IsNaN | Y | {_FI} |
LayerNormalization | Y | {_F} | Only the first output `Y` is supported
LeakyRelu | Y | {_F} |
Less | Y | {_FI} |
LessOrEqual | Y | {_FI} |
Log | Y | {_F} |
LogSoftmax | Y | {_F} |
Loop | Y | {_FIB} | Scan output length cannot be dynamic. The shape of Loop carried dependencies must be the same across all loop iterations
LRN | Y | {_F} |
LSTM | Y | {_F} | `input_forget` attribute must be 0. `layout` attribute must be 0
LpNormalization | Y | {_F} |
LpPool | Y | {_F} | `dilations` must be empty or all ones
MatMul | Y | {_F} |
MatMulInteger | N | |
Max | Y | {_FI} |
MaxPool | Y | {_F} | 2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or all ones
MaxRoiPool | N | |
MaxUnpool | N | |
Mean | Y | {_FI} |
MeanVarianceNormalization | Y | {_F} |
MelWeightMatrix | N | |
Min | Y | {_FI} |
Mish | ? | FP32, FP16 | listed in later 10.x docs
Mod | ? | {_FI} | `fmod` semantics; not confirmed for 10.3
Mul | Y | {_FI} |
Multinomial | N | |
Neg | Y | {_FI} |
NegativeLogLikelihoodLoss | N | |
NonMaxSuppression | Y | FP32, FP16 |
NonZero | Y | FP32, FP16 |
Not | Y | BOOL |
OneHot | Y | {_FIB} | `depth` must be a build-time constant
Optional | N | |
OptionalGetElement | N | |
OptionalHasElement | N | |
Or | Y | BOOL |
Pad | Y | {_FI} |
ParametricSoftplus | Y | {_F} |
Pow | Y | {_FI} |
PRelu | Y | {_F} |
QLinearConv | N | |
QLinearMatMul | N | |
QuantizeLinear | Y | {_F} | `y_zero_point` must be 0
RandomNormal | Y | {_F} | `seed` value is ignored by TensorRT
RandomNormalLike | Y | {_F} | `seed` value is ignored by TensorRT
RandomUniform | Y | {_F} | `seed` value is ignored by TensorRT
RandomUniformLike | Y | {_F} | `seed` value is ignored by TensorRT
Range | Y | {_FI} |
Reciprocal | Y | {_F} |
ReduceL1 | Y | {_FI} | `axes` must be an initializer
ReduceL2 | Y | {_FI} | `axes` must be an initializer
ReduceLogSum | Y | {_FI} | `axes` must be an initializer
ReduceLogSumExp | Y | {_FI} | `axes` must be an initializer
ReduceMax | Y | {_FI} | `axes` must be an initializer
ReduceMean | Y | {_FI} | `axes` must be an initializer
ReduceMin | Y | {_FI} | `axes` must be an initializer
ReduceProd | Y | {_FI} | `axes` must be an initializer
ReduceSum | Y | {_FI} | `axes` must be an initializer
ReduceSumSquare | Y | {_FI} | `axes` must be an initializer
RegexFullMatch | N | |
Relu | Y | {_FI} |
Reshape | Y | {_FIB} |
Resize | Y | {_F} | modes `nearest`, `linear`; transformation modes `half_pixel`, `pytorch_half_pixel`, `tf_half_pixel_for_nn`, `asymmetric`, `align_corners`; nearest modes `floor`, `ceil`, `round_prefer_floor`, `round_prefer_ceil`; aspect ratio policy `stretch`; no antialiasing
ReverseSequence | Y | {_FIB} |
RNN | Y | {_F} | For bidirectional RNNs, activation functions must be the same for both the forward and reverse pass
RoiAlign | Y | FP32, FP16 |
Round | Y | {_F} |
STFT | Y | FP32 | `frame_step` and `window` must be an initializer. Input must be real-valued
ScaledTanh | Y | {_F} |
Scan | Y | {_F} |
Scatter | Y | {_FI} |
ScatterElements | Y | {_FI} |
ScatterND | Y | {_FI} | `reduction` other than `none` is not supported
Selu | Y | {_F} |
SequenceAt | N | |
SequenceConstruct | N | |
SequenceEmpty | N | |
SequenceErase | N | |
SequenceInsert | N | |
SequenceLength | N | |
SequenceMap | N | |
Shape | Y | {_FIB} |
Shrink | ? | {_FI} | listed in later 10.x docs
Sigmoid | Y | {_F} |
Sign | Y | {_FI} |
Sin | Y | {_F} |
Sinh | Y | {_F} |
Size | Y | {_FIB} |
Slice | Y | {_FIB} |
Softmax | Y | {_F} |
SoftmaxCrossEntropyLoss | N | |
Softplus | Y | {_F} |
Softsign | Y | {_F} |
SpaceToDepth | Y | {_FI} |
Split | Y | {_FIB} |
SplitToSequence | N | |
Sqrt | Y | {_F} |
Squeeze | Y | {_FIB} | `axes` must be resolvable to a constant
StringConcat | N | |
StringNormalizer | N | |
StringSplit | N | |
Sub | Y | {_FI} |
Sum | Y | {_FI} |
Tan | Y | {_F} |
Tanh | Y | {_F} |
TfIdfVectorizer | N | |
ThresholdedRelu | Y | {_F} |
Tile | Y | {_FIB} |
TopK | Y | {_FI} | `sorted` must be 1. `K` input must be less than 3840
Transpose | Y | {_FIB} |
Trilu | Y | {_FIB} |
Unique | N | |
Unsqueeze | Y | {_FIB} | `axes` must be resolvable to a constant
Upsample | Y | {_F} |
Where | Y | {_FIB} |
Xor | Y | BOOL |
"""


@dataclass(frozen=True)
class OpSupport:
    """One row of the support matrix."""

    op: str
    supported: str  # "Y", "N" or "?" (see module docstring)
    types: frozenset[str]
    restrictions: str


def _parse(table: str) -> dict[str, OpSupport]:
    rows: dict[str, OpSupport] = {}
    for line in table.strip().splitlines():
        op, supported, types, restrictions = (cell.strip() for cell in line.split("|", 3))
        if supported not in ("Y", "N", "?") or op in rows:
            raise ValueError(f"bad or duplicate row in the TensorRT op table: {line!r}")
        rows[op] = OpSupport(
            op, supported, frozenset(t.strip() for t in types.split(",") if t.strip()), restrictions
        )
    return rows


TABLES: dict[str, dict[str, OpSupport]] = {"10.3": _parse(_TABLE_10_3)}
_UNKNOWN = OpSupport("?", "N", frozenset(), "not in the table")


# The current 10.x parser: ops marked Y in onnx-tensorrt's docs/operators.md whose header reads
# "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24" (names only,
# transcribed 2026-11-30 from the stored copy of that file). It lists DeformConv, Gelu, Hardmax, Mish,
# Mod, Shrink, the window ops and STFT as supported; the 10.3 rows above keep `?`/`N` for those because
# no 10.3 copy of the file was at hand to confirm them, so a model using them fails the check below.
# TensorRT 11.x is not transcribed (no copy of its operators.md was available); its parser is the
# 10.x parser plus additions, but that is NVIDIA's statement, not checked here.
SOURCE_CURRENT = "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.15 GA)"
SUPPORTED_10_15 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())
# The parsers this project claims to target: JetPack 6's and the current 10.x.
CLAIMED_VERSIONS = ("10.3", "10.15")


def unsupported_in_claimed(ops: set[str] | frozenset[str]) -> dict[str, list[str]]:
    """{op: [claimed versions whose ONNX parser does not support it]} for the ops given ('?' counts as
    not supported: unconfirmed); empty when every op runs on every claimed version."""
    missing: dict[str, list[str]] = {}
    for op in sorted(ops):
        where = [] if TABLES["10.3"].get(op, _UNKNOWN).supported == "Y" else ["10.3"]
        where += [] if op in SUPPORTED_10_15 else ["10.15"]
        if where:
            missing[op] = where
    return missing


def op_table(trt_version: str) -> dict[str, OpSupport]:
    """The op table for a TensorRT version (only versions transcribed here)."""
    try:
        return TABLES[trt_version]
    except KeyError:
        raise ValueError(
            f"no TensorRT op table for version {trt_version!r}; available: {sorted(TABLES)}. "
            f"Transcribe {SOURCE} for that release into compress/trt_ops.py"
        ) from None


# ONNX elem types in the table's vocabulary.
TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.DOUBLE: "DOUBLE",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4",
}  # fmt: skip
_TRT_CAST_TARGETS = {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL", "INT8"}


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Value of attribute ``name`` of ``node`` (``default`` when absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def attribute_rules(node: onnx.NodeProto, consts: set[str]) -> list[tuple[str, str, str]]:
    """(rule, message, severity) for the doc's statically checkable restrictions of ``node``.

    ``consts`` are the tensor names that are build-time constants in the node's scope.
    """
    op, found = node.op_type, []

    def need_const(index: int, what: str) -> None:
        if len(node.input) > index and node.input[index] and node.input[index] not in consts:
            found.append(("const-input", f"{what} must be a build-time constant (initializer)", "error"))

    if op in ("AveragePool", "MaxPool", "LpPool"):
        if len(attr(node, "kernel_shape", [])) not in (2, 3) and op != "LpPool":
            found.append(("pool-rank", "only 2D or 3D pooling is supported", "error"))
        if any(d != 1 for d in attr(node, "dilations", [])):
            found.append(("pool-dilations", "`dilations` must be empty or all ones", "error"))
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            found.append(("maxpool-indices", "the `Indices` output is unsupported", "error"))
    elif op in ("Squeeze", "Unsqueeze") or op.startswith("Reduce"):
        need_const(1, "`axes`")
    elif op == "CumSum":
        need_const(1, "`axis`")
    elif op == "OneHot":
        need_const(1, "`depth`")
    elif op == "Dropout":
        need_const(2, "`is_training`")
    elif op == "Resize":
        found += _resize_rules(node)
    elif op == "TopK" and attr(node, "sorted", 1) != 1:
        found.append(
            ("topk-sorted", "`sorted` must be 1 (doc of later 10.x; unconfirmed for 10.3)", "warning")
        )
    elif op == "Constant":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
        if bad:
            found.append(("constant-attr", f"attribute {bad[0]} is unsupported", "error"))
    elif op == "Cast":
        target = TYPE_NAMES.get(int(attr(node, "to", 0)), f"elem_type {attr(node, 'to')}")
        if target == "DOUBLE":
            found.append(("cast-down", "Cast to DOUBLE: TensorRT computes it as FLOAT", "warning"))
        elif target not in _TRT_CAST_TARGETS:
            found.append(("cast-type", f"Cast to {target} is not a TensorRT type", "error"))
    elif op == "LSTM" and (attr(node, "input_forget", 0) != 0 or attr(node, "layout", 0) != 0):
        found.append(("lstm-attr", "`input_forget` and `layout` must be 0", "error"))
    return found


def _resize_rules(node: onnx.NodeProto) -> list[tuple[str, str, str]]:
    allowed = {
        "mode": ({"nearest", "linear"}, "nearest"),
        "coordinate_transformation_mode": (
            {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"},
            "half_pixel",
        ),
        "nearest_mode": ({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}, "round_prefer_floor"),
        "keep_aspect_ratio_policy": ({"stretch"}, "stretch"),
    }
    found = []
    for name, (values, default) in allowed.items():
        value = attr(node, name, default)
        value = value.decode() if isinstance(value, bytes) else value
        if value not in values:
            found.append(
                ("resize-attr", f"Resize {name}={value!r} unsupported; use one of {sorted(values)}", "error")
            )
    if attr(node, "antialias", 0):
        found.append(("resize-attr", "Resize antialiasing is unsupported", "error"))
    return found

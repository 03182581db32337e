"""Static TensorRT compatibility check of ONNX models, without TensorRT installed.

Two independent checks, so a CPU-only INT8 model is not held to TensorRT's Q/DQ rules:

* ``check_model``            every node's op, main input dtype and checkable attributes against
                             TensorRT's ONNX-parser support table (``compress.trt_ops``), the opset
                             range, custom domains, and int64 constants TensorRT will clamp.
* ``check_qdq_for_tensorrt`` explicit-quantization rules: INT8 zero points equal to 0, constant
                             scales, per-channel weight scales on the output-channel axis, Q/DQ on the
                             inputs of weighted layers, every Q followed by DQ, none on graph outputs.

    python -m compress.trt_check runs/export/student.int8-trt.onnx [--ops-only] [--strict]

exits 1 when any model has an error (warnings too with ``--strict``), 2 when a file cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from compress.trt_ops import OPSET_RANGE, SOURCE, TYPE_NAMES, attr, attribute_rules, op_table
from deploy.errors import MissingInput, cli

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_NO_DTYPE_CHECK = {"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Constant", "If", "Loop", "Scan"}
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class Violation:
    """One finding: ``severity`` is "error" (TensorRT will refuse or miscompute) or "warning"."""

    node: str
    op: str
    rule: str
    message: str
    severity: str = "error"


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise MissingInput(f"ONNX model not found: {path}")
    return onnx.load(str(path))


def _walk(
    graph: onnx.GraphProto, outer_consts: frozenset[str] = frozenset()
) -> Iterator[tuple[onnx.NodeProto, set[str]]]:
    """Yield (node, names known constant in its scope), descending into If/Loop/Scan bodies."""
    consts = set(outer_consts) | {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        yield node, consts
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _walk(sub, frozenset(consts))


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor ONNX shape inference can type (empty on failure)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference rejects still gets the op checks
        return {}
    types: dict[str, int] = {i.name: i.data_type for i in inferred.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def check_model(model: str | Path | onnx.ModelProto, trt_version: str = "10.3") -> list[Violation]:
    """Ops, dtypes, attributes and opset of ``model`` against TensorRT ``trt_version``'s ONNX parser."""
    proto, table = _load(model), op_table(trt_version)
    found: list[Violation] = []
    lo, hi = OPSET_RANGE[trt_version]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not lo <= opset <= hi:
        found.append(
            Violation(
                "<graph>",
                "-",
                "opset",
                f"ai.onnx opset {opset} outside TensorRT {trt_version}'s {lo}..{hi}; re-export with opset_version in that range",
            )
        )
    types = _dtypes(proto)
    for node, consts in _walk(proto.graph):
        name, op = node.name or f"<unnamed {node.op_type}>", node.op_type
        if node.domain not in ("", "ai.onnx"):
            found.append(
                Violation(
                    name, op, "custom-domain", f"op from domain {node.domain!r} needs a TensorRT plugin"
                )
            )
            continue
        row = table.get(op)
        if row is None or row.supported == "N":
            why = "is not in the support table" if row is None else "is not supported"
            found.append(
                Violation(
                    name,
                    op,
                    "unsupported-op",
                    f"{op} {why} by TensorRT {trt_version}'s ONNX parser ({SOURCE})",
                )
            )
            continue
        if row.supported == "?":
            found.append(
                Violation(
                    name,
                    op,
                    "unconfirmed-op",
                    f"{op} is listed only in later 10.x docs: {row.restrictions}",
                    "warning",
                )
            )
        found += [Violation(name, op, r, m, s) for r, m, s in attribute_rules(node, consts)]
        found += _dtype_rule(node, name, row.types, types)
    found += _int64_rule(proto)
    return found


def _dtype_rule(
    node: onnx.NodeProto, name: str, allowed: frozenset[str], types: dict[str, int]
) -> list[Violation]:
    if node.op_type in _NO_DTYPE_CHECK or not node.input:
        return []
    index = 1 if node.op_type == "Where" else 0  # Where's input 0 is the BOOL condition
    tensor = node.input[index] if len(node.input) > index else ""
    dtype = TYPE_NAMES.get(types.get(tensor, -1))
    if dtype is None or dtype in allowed:
        return []
    if dtype == "DOUBLE":
        return [
            Violation(
                name, node.op_type, "cast-down", f"DOUBLE input {tensor!r} is computed as FLOAT", "warning"
            )
        ]
    return [
        Violation(
            name,
            node.op_type,
            "dtype",
            f"input {tensor!r} is {dtype}; TensorRT supports {sorted(allowed)} here",
        )
    ]


def _int64_rule(proto: onnx.ModelProto) -> list[Violation]:
    """int64 constants beyond int32 range get clamped (the Slice end sentinel INT64_MAX is fine)."""
    slice_bounds = {i for n in proto.graph.node if n.op_type == "Slice" for i in n.input[1:3]}
    found = []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.INT64 or init.name in slice_bounds:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size and (arr.max() > _INT32.max or arr.min() < _INT32.min):
            found.append(
                Violation(
                    init.name,
                    "initializer",
                    "int64-clamp",
                    "INT64 values beyond the INT32 range are clamped by TensorRT",
                    "warning",
                )
            )
    return found


def _zero_point(
    node: onnx.NodeProto, inits: dict[str, np.ndarray], producer: dict[str, onnx.NodeProto]
) -> np.ndarray | None:
    """The zero point array; ONNX's default (absent) is uint8 0 for Q, the input's type for DQ."""
    if len(node.input) > 2 and node.input[2]:
        return inits.get(node.input[2])
    if node.op_type == "QuantizeLinear":
        return np.zeros(1, np.uint8)
    if node.input[0] in inits:
        return np.zeros(1, inits[node.input[0]].dtype)
    q = producer.get(node.input[0])
    return _zero_point(q, inits, producer) if q is not None and q.op_type == "QuantizeLinear" else None


def _output_channel_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    op = consumer.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if attr(consumer, "transB", 0) else 1
    if op == "MatMul":
        return rank - 1
    return None


def check_qdq_for_tensorrt(model: str | Path | onnx.ModelProto) -> list[Violation]:
    """TensorRT explicit-quantization rules for the Q/DQ nodes of ``model`` (top-level graph)."""
    graph = _load(model).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    found: list[Violation] = []
    for node in (n for n in graph.node if n.op_type in _QDQ):
        name, op = node.name or f"<unnamed {node.op_type}>", node.op_type
        zp = _zero_point(node, inits, producer)
        if zp is None:
            found.append(Violation(name, op, "qdq-zero-point", "zero point is not a constant initializer"))
        elif zp.dtype == np.int32:
            found.append(
                Violation(
                    name,
                    op,
                    "qdq-dtype",
                    "INT32 DequantizeLinear (quantized bias) is unsupported; keep biases float",
                )
            )
        elif zp.dtype != np.int8:
            found.append(
                Violation(
                    name, op, "qdq-dtype", f"zero point is {zp.dtype}; TensorRT needs INT8 with zero point 0"
                )
            )
        elif np.any(zp != 0):
            found.append(
                Violation(
                    name,
                    op,
                    "qdq-zero-point",
                    "zero point must be 0 (quantize with ActivationSymmetric/WeightSymmetric)",
                )
            )
        if node.input[1] not in inits:
            found.append(Violation(name, op, "qdq-scale", "scale must be a constant initializer"))
        if node.output[0] in outputs:
            found.append(
                Violation(
                    name, op, "qdq-output", f"{op} feeds graph output {node.output[0]!r}; keep outputs float"
                )
            )
        if op == "QuantizeLinear" and any(
            c.op_type != "DequantizeLinear" for c in consumers.get(node.output[0], [])
        ):
            found.append(
                Violation(name, op, "qdq-pair", "QuantizeLinear must be consumed only by DequantizeLinear")
            )
        if op == "DequantizeLinear" and node.input[0] in inits:
            found += _weight_axis_rule(node, name, inits, consumers)
    found += _placement_rule(graph, producer)
    return found


def _weight_axis_rule(
    node: onnx.NodeProto, name: str, inits: dict[str, np.ndarray], consumers: dict[str, list[onnx.NodeProto]]
) -> list[Violation]:
    weight, scale = inits[node.input[0]], inits.get(node.input[1])
    if scale is None or scale.size <= 1:
        return []  # per-tensor weights are fine
    axis = int(attr(node, "axis", 1)) % weight.ndim
    found = []
    if scale.ndim != 1 or scale.size != weight.shape[axis]:
        found.append(
            Violation(
                name,
                node.op_type,
                "qdq-weight-scale",
                f"scale shape {scale.shape} does not match weight {weight.shape} on axis {axis}",
            )
        )
    for consumer in consumers.get(node.output[0], []):
        want = _output_channel_axis(consumer, weight.ndim)
        if (
            want is not None
            and want != axis
            and len(consumer.input) > 1
            and consumer.input[1] == node.output[0]
        ):
            found.append(
                Violation(
                    name,
                    node.op_type,
                    "qdq-weight-axis",
                    f"per-channel axis {axis}, but {consumer.op_type} {consumer.name!r} needs its output-channel axis {want}",
                )
            )
    return found


def _placement_rule(graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto]) -> list[Violation]:
    """A weighted layer with a quantized weight needs Q/DQ on its activation input too.

    (The reverse -- a float layer reading a tensor that is also quantized for another consumer, as
    ORT does for an excluded decoder fed by the pooled features -- is intended and not reported.)
    """
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        act, wgt = (producer.get(i) for i in node.input[:2])
        if (
            wgt is not None
            and wgt.op_type == "DequantizeLinear"
            and (act is None or act.op_type != "DequantizeLinear")
        ):
            message = "weight is quantized but the activation input is not; TensorRT will not run it in INT8"
            found.append(Violation(node.name, node.op_type, "qdq-placement", message, "warning"))
    return found


def format_table(violations: Sequence[Violation]) -> str:
    """Aligned text table of violations (severity, rule, op, node, message)."""
    rows = [("severity", "rule", "op", "node", "message")]
    rows += [(v.severity, v.rule, v.op, v.node, v.message) for v in violations]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.trt_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files meant for TensorRT")
    parser.add_argument(
        "--trt-version", default="10.3", help="TensorRT version of the op table (default 10.3, JetPack 6)"
    )
    parser.add_argument(
        "--ops-only", action="store_true", help="skip the Q/DQ rules (float or CPU-INT8 models)"
    )
    parser.add_argument("--strict", action="store_true", help="warnings fail too")
    args = parser.parse_args(argv)
    failed = False
    for path in args.models:
        try:
            model = _load(path)
            found = check_model(model, args.trt_version)
            if not args.ops_only:
                found += check_qdq_for_tensorrt(model)
        except (OSError, ValueError, DecodeError) as err:
            print(f"{path}: cannot check: {err}", file=sys.stderr)
            return 2
        bad = [v for v in found if v.severity == "error" or args.strict]
        failed |= bool(bad)
        status = "FAIL" if bad else "ok"
        print(f"{path}: {status} ({len(found)} finding(s), TensorRT {args.trt_version})")
        if found:
            print(format_table(found))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

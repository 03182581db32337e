"""Where the TensorRT INT8 flavour puts Q/DQ beyond the weighted layers: NVIDIA Model Optimizer's rules.

TensorRT runs a layer in INT8 only where explicit Q/DQ says so. Quantizing the weighted layers alone
leaves every residual Add and pooling layer in float, so each block ends with a dequantize, a float
Add and a requantize, and the INT8 engine can be no faster than FP16 on a Jetson. ModelOpt's ONNX PTQ
(modelopt.onnx.quantization.int8, graph_utils.build_non_residual_input_map) places Q/DQ so that:

* a **residual Add** (two activation inputs whose branches meet at a common ancestor) gets Q/DQ on its
  *residual* input only, the skip connection; the other input, on the longer path from the common
  ancestor (the branch that ends in a Conv), stays unquantized so TensorRT fuses Conv + Add into one
  INT8 kernel;
* **pooling** (MaxPool, AveragePool, GlobalAveragePool) gets Q/DQ on its input, so it runs in INT8
  after the convolution that feeds it.

Adds with a constant input (biases) or a graph input are not residual and stay float.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.calibration import symmetric_scale

POOL_OP_TYPES: tuple[str, ...] = ("MaxPool", "AveragePool", "GlobalAveragePool")


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _ancestor_depths(start: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> dict[str, int]:
    """Node name -> shortest number of edges from `start` upwards (start itself at 0)."""
    depths = {start.name: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for tensor in node.input:
            parent = producer.get(tensor)
            if parent is not None and parent.name not in depths:
                depths[parent.name] = depths[node.name] + 1
                queue.append(parent)
    return depths


def residual_adds(model: onnx.ModelProto) -> dict[str, str]:
    """Residual Add node name -> the name of its NON-residual input (the one to leave unquantized).

    An Add is residual when both inputs are produced by nodes and the two branches share an ancestor;
    the non-residual input is the one on the longer path to the lowest common ancestor (ModelOpt's rule).
    """
    graph = model.graph
    producer = _producers(graph)
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or set(node.input) & constants:
            continue
        left, right = (producer.get(t) for t in node.input)
        if left is None or right is None or left is right:
            continue
        d_left, d_right = _ancestor_depths(left, producer), _ancestor_depths(right, producer)
        common = set(d_left) & set(d_right)
        if not common:
            continue
        lca = min(common, key=lambda name: max(d_left[name], d_right[name]))
        if d_left[lca] == d_right[lca]:
            continue  # two symmetric branches: no skip connection to tell apart
        found[node.name] = node.input[0] if d_left[lca] > d_right[lca] else node.input[1]
    return found


def pool_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in POOL_OP_TYPES]


def non_residual_adds(model: onnx.ModelProto) -> list[str]:
    """Add nodes that must stay float (biases, symmetric or input-fed sums)."""
    residual = residual_adds(model)
    return [n.name for n in model.graph.node if n.op_type == "Add" and n.name not in residual]


def unquantize_inputs(model: onnx.ModelProto, inputs: dict[str, str]) -> int:
    """Remove the Q -> DQ pair in front of each (node name -> original tensor) input; returns the count.

    ORT places a dedicated pair per consumer (DedicatedQDQPair), so the pair feeding one Add input can be
    dropped without touching the other consumers of the same tensor.
    """
    graph = model.graph
    producer = _producers(graph)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers[tensor] = consumers.get(tensor, 0) + 1
    removed: list[onnx.NodeProto] = []
    by_name = {n.name: n for n in graph.node}
    for name, original in inputs.items():
        node = by_name.get(name)
        if node is None:
            continue
        for k, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear" or consumers.get(tensor) != 1:
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] != original or consumers.get(q.output[0]) != 1:
                continue
            node.input[k] = original
            removed += [q, dq]
    for node in removed:
        graph.node.remove(node)
    return len(removed) // 2


def quantize_pool_inputs(model: onnx.ModelProto, ranges, skip: set[str] = frozenset()) -> int:
    """Insert a symmetric INT8 Q -> DQ pair in front of every pool whose input ORT left float.

    ORT treats MaxPool/AveragePool as "same scale in and out" ops that it quantizes only when their input
    already is; after a residual Add (whose output stays float) it leaves them float. `ranges` are the
    calibration's TensorsData; a tensor without a range, or a pool named in `skip` (kept float by
    the user's exclusions), is left alone. Returns the number of pairs added.
    """
    graph = model.graph
    producer = _producers(graph)
    added = 0
    for node in [n for n in graph.node if n.op_type in POOL_OP_TYPES and n.name not in skip]:
        tensor = node.input[0]
        fed_by = producer.get(tensor)
        if (fed_by is not None and fed_by.op_type == "DequantizeLinear") or tensor not in ranges:
            continue
        scale = symmetric_scale(ranges, tensor)
        stem = f"{node.name}_input"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{stem}_scale"),
                                  numpy_helper.from_array(np.array(0, np.int8), f"{stem}_zero_point")])
        q = helper.make_node("QuantizeLinear", [tensor, f"{stem}_scale", f"{stem}_zero_point"],
                             [f"{stem}_q"], name=f"{stem}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_scale", f"{stem}_zero_point"],
                              [f"{stem}_dq"], name=f"{stem}_DequantizeLinear")
        node.input[0] = f"{stem}_dq"
        position = list(graph.node).index(node)
        graph.node.insert(position, dq)
        graph.node.insert(position, q)
        added += 1
    return added

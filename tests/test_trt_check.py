"""Static TensorRT checks: op table, attribute rules, Q/DQ rules and the CLI, on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.trt_check import Violation, check_model, check_qdq_for_tensorrt, format_table, main
from compress.trt_ops import SUPPORTED_10_15, TABLES, op_table, unsupported_in_claimed


def _model(nodes, inits=(), inputs=None, outputs=None, opset=17) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _qdq_conv(zp_dtype=np.int8, zp_value=0, w_axis=0, dq_to_output=False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(W: DQ per-channel) [-> Q -> DQ -> y]."""
    w = np.ones((6, 4, 3, 3), np.int8)
    inits = [
        ("s", np.array(0.1, np.float32)), ("zp", np.array(zp_value, zp_dtype)),
        ("w", w), ("ws", np.full(w.shape[w_axis], 0.01, np.float32)), ("wzp", np.zeros(w.shape[w_axis], np.int8)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], name="dq_w", axis=w_axis),
        helper.make_node(
            "Conv", ["xd", "wd"], ["c" if dq_to_output else "y"], name="conv", pads=[1, 1, 1, 1]
        ),
    ]
    if dq_to_output:
        nodes += [
            helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["cq"], name="q_out"),
            helper.make_node("DequantizeLinear", ["cq", "s", "zp"], ["y"], name="dq_out"),
        ]
    return _model(nodes, inits)


def _rules(violations: list[Violation], severity: str = "error") -> set[str]:
    return {v.rule for v in violations if v.severity == severity}


def test_table_covers_what_our_exports_produce():
    table = op_table("10.3")
    ours = """Conv BatchNormalization Relu Clip Add Mul Sub Div MatMul Gemm Sigmoid Tanh Softmax Gather ArgMax
    Concat Reshape Flatten Unsqueeze Squeeze Shape Slice Cast Constant ConstantOfShape Identity GlobalAveragePool
    AveragePool MaxPool ReduceMean Transpose Expand Equal Where Split QuantizeLinear DequantizeLinear Pad Range
    Less Greater Not And Or Pow Sqrt Exp Log Erf HardSigmoid HardSwish Loop If NonZero TopK""".split()
    assert [op for op in ours if table[op].supported != "Y"] == []
    assert table["Unique"].supported == "N" and table["StringNormalizer"].supported == "N"
    assert "INT8" not in table["QuantizeLinear"].types and "INT8" in table["DequantizeLinear"].types
    with pytest.raises(ValueError, match="available"):
        op_table("7.0")
    assert list(TABLES) == ["10.3"]


def test_plain_float_graph_passes():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    assert check_model(_model(nodes)) == []


@pytest.mark.parametrize(
    ("node", "rule"),
    [
        (helper.make_node("Unique", ["x"], ["y"], name="u"), "unsupported-op"),
        (helper.make_node("NoSuchOp", ["x"], ["y"], name="n"), "unsupported-op"),
        (helper.make_node("FusedConv", ["x"], ["y"], name="f", domain="com.microsoft"), "custom-domain"),
        (
            helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2], dilations=[2, 2]),
            "pool-dilations",
        ),
        (helper.make_node("MaxPool", ["x"], ["y", "idx"], name="p", kernel_shape=[2, 2]), "maxpool-indices"),
        (helper.make_node("Resize", ["x", "", "sc"], ["y"], name="r", mode="cubic"), "resize-attr"),
        (helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.STRING), "cast-type"),
        (helper.make_node("Unsqueeze", ["x", "axes_dyn"], ["y"], name="un"), "const-input"),
    ],
)
def test_unsupported_ops_and_attributes_are_errors(node, rule):
    inits = [("sc", np.array([1, 1, 2, 2], np.float32))]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
        helper.make_tensor_value_info("axes_dyn", TensorProto.INT64, [1]),
    ]
    found = check_model(_model([node], inits, inputs))
    assert rule in _rules(found), found


def test_opset_dtype_and_warning_rules():
    assert "opset" in _rules(check_model(_model([helper.make_node("Relu", ["x"], ["y"])], opset=21)))
    uint8_in = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])]
    assert "dtype" in _rules(
        check_model(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], inputs=uint8_in))
    )
    big = [("big", np.array([2**40], np.int64))]
    nodes = [helper.make_node("Reshape", ["x", "big"], ["y"], name="rs")]
    found = check_model(_model(nodes, big))
    assert "int64-clamp" in _rules(found, "warning") and not _rules(found)


def test_symmetric_int8_qdq_passes_both_checks():
    model = _qdq_conv()
    assert _rules(check_model(model)) == set()
    assert check_qdq_for_tensorrt(model) == []


def test_uint8_zero_point_is_rejected():
    found = check_qdq_for_tensorrt(_qdq_conv(zp_dtype=np.uint8, zp_value=128))
    assert "qdq-dtype" in _rules(found)
    assert {v.node for v in found if v.rule == "qdq-dtype"} == {"q_in", "dq_in"}


def test_nonzero_zero_point_wrong_axis_and_output_qdq_are_rejected():
    assert "qdq-zero-point" in _rules(check_qdq_for_tensorrt(_qdq_conv(zp_value=3)))
    assert "qdq-weight-axis" in _rules(check_qdq_for_tensorrt(_qdq_conv(w_axis=1)))
    assert "qdq-output" in _rules(check_qdq_for_tensorrt(_qdq_conv(dq_to_output=True)))


def test_half_quantized_layer_is_a_warning():
    model = _qdq_conv()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[0] = "x"  # activation bypasses its Q/DQ pair
    found = check_qdq_for_tensorrt(model)
    assert "qdq-placement" in _rules(found, "warning") and "qdq-placement" not in _rules(found)


def test_cli_exit_codes_and_table(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_qdq_conv(), str(good))
    onnx.save(_qdq_conv(zp_dtype=np.uint8, zp_value=128), str(bad))
    assert main([str(good)]) == 0
    assert main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.onnx: FAIL" in out and "qdq-dtype" in out
    assert main([str(bad), "--ops-only"]) == 0
    assert main([str(tmp_path / "missing.onnx")]) == 2
    assert "severity" in format_table([Violation("n", "Op", "rule", "msg")])


def test_claimed_versions_agree_where_they_should():
    table = op_table("10.3")
    # Support does not regress between releases: everything 10.3 supports, 10.15 does too.
    assert sorted(op for op, row in table.items() if row.supported == "Y" and op not in SUPPORTED_10_15) == []
    # The ops the issue found disputed: supported in 10.15, unconfirmed for 10.3, so not "everywhere".
    disputed = {"DeformConv", "Gelu", "Hardmax", "Mish", "Mod", "Shrink"}
    assert disputed <= SUPPORTED_10_15 and set(unsupported_in_claimed(disputed)) == disputed
    assert unsupported_in_claimed({"Conv", "Relu", "QuantizeLinear"}) == {}
    assert unsupported_in_claimed({"Unique", "MadeUpOp"}) == {"MadeUpOp": ["10.3", "10.15"], "Unique": ["10.3", "10.15"]}

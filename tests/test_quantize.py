"""INT8 (CPU / TensorRT) and FP16 flavours from one calibration, on a tiny exported model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from compress.calibration import BatchReader, calibrate, load_ranges, parse_method, save_ranges  # noqa: E402
from compress.quantize_flavours import (  # noqa: E402
    convert_fp16,
    layer_sensitivity,
    qdq_summary,
    quantize_cpu,
    quantize_tensorrt,
    resolve_exclusions,
)
from compress.trt_check import check_model, check_qdq_for_tensorrt  # noqa: E402

SIZE = 32


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 12)
        self.out = nn.Parameter(torch.randn(12, 7) * 0.3)

    def forward(self, feat):
        return torch.matmul(torch.tanh(self.proj(feat)), self.out)


class Tiny(nn.Module):
    """Conv-BN-ReLU6 x2 -> GAP -> Linear + Softmax, a MatMul head, and a 'decoder' (Gemm, Tanh, MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        )  # fmt: skip
        self.head = nn.Linear(16, 5)
        self.aux = nn.Parameter(torch.randn(16, 4) * 0.3)
        self.decoder = _Decoder()

    def forward(self, x):
        feat = self.features(x).mean(dim=(2, 3))
        return torch.softmax(self.head(feat), dim=1), torch.matmul(feat, self.aux), self.decoder(feat)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 3, SIZE, SIZE)).astype(np.float32)


def _run(path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    net = Tiny()
    with torch.no_grad():  # non-trivial BN statistics so folding and ranges matter
        for bn in (net.features[1], net.features[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    net.eval()
    out = tmp_path_factory.mktemp("quant")
    fp32 = out / "tiny.onnx"
    torch.onnx.export(
        net, torch.randn(1, 3, SIZE, SIZE), str(fp32), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["probs", "aux", "text"],
        dynamic_axes={"image": {0: "n"}, "probs": {0: "n"}, "aux": {0: "n"}, "text": {0: "n"}},
    )  # fmt: skip
    ranges = calibrate(fp32, _images(32, 1), method="minmax")  # the one calibration
    paths = {
        "fp32": fp32,
        "cpu": quantize_cpu(fp32, out / "cpu.onnx", ranges),
        "trt": quantize_tensorrt(fp32, out / "trt.onnx", ranges, exclude_patterns=["decoder"]),
        "fp16": convert_fp16(fp32, out / "fp16.onnx"),
    }
    return paths, ranges


def test_tensorrt_flavour_is_symmetric_int8_per_channel(models):
    paths, _ = models
    model = onnx.load(str(paths["trt"]))
    summary = qdq_summary(model)
    assert summary["quantize_linear"] > 0
    assert set(summary["zero_point_dtypes"]) == {"int8"}
    assert summary["zero_points_all_zero"] is True
    assert summary["bias_dq"] == 0 and summary["dq_outputs"] == []
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumer = {i: n for n in model.graph.node for i in n.input}
    weight_axes = {}
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits):
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert scale.shape == (weight.shape[axis],)
        weight_axes.setdefault(consumer[dq.output[0]].op_type, set()).add(axis)
    # Conv out-channels = axis 0; Linear exports as Gemm(transB=1) -> axis 0; MatMul B [K,N] -> axis 1.
    assert weight_axes == {"Conv": {0}, "Gemm": {0}, "MatMul": {1}}


def test_tensorrt_flavour_keeps_decoder_and_softmax_float(models):
    paths, _ = models
    model = onnx.load(str(paths["trt"]))
    quantized = qdq_summary(model)["quantized_nodes"]
    assert not [n for n in quantized if "decoder" in n]
    kinds = {n.op_type for n in model.graph.node if n.name in quantized}
    assert kinds <= {"Conv", "Gemm", "MatMul"}
    decoder_ops = {n.op_type for n in model.graph.node if "decoder" in n.name}
    assert decoder_ops == {"Gemm", "Tanh", "MatMul"}


def test_cpu_flavour_uses_u8_activations_and_s8_weights(models):
    paths, _ = models
    model = onnx.load(str(paths["cpu"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q_zp = {inits[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear"}
    w_dtypes = {
        inits[n.input[0]].dtype
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    assert q_zp == {np.dtype(np.uint8)}
    assert np.dtype(np.int8) in w_dtypes and np.dtype(np.uint8) not in w_dtypes
    softmax_out = next(n.output[0] for n in model.graph.node if n.op_type == "Softmax")
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == softmax_out]


@pytest.mark.parametrize("flavour", ["cpu", "trt"])
def test_int8_flavours_stay_close_to_fp32(models, flavour):
    paths, _ = models
    x = _images(64, 2)
    ref, got = _run(paths["fp32"], x), _run(paths[flavour], x)
    agreement = np.mean(ref[0].argmax(1) == got[0].argmax(1))
    assert agreement >= 0.9, f"top-1 agreement {agreement:.2f}"
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() <= 0.1 * np.abs(r).max() + 1e-3


def test_fp16_runs_in_ort_and_matches_fp32(models):
    paths, _ = models
    x = _images(8, 3)
    assert onnx.load(str(paths["fp16"])).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for r, g in zip(_run(paths["fp32"], x), _run(paths["fp16"], x)):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2)


def test_static_trt_check_accepts_all_flavours(models):
    paths, _ = models
    for name in ("fp32", "cpu", "trt", "fp16"):
        errors = [v for v in check_model(paths[name]) if v.severity == "error"]
        assert errors == [], (name, errors)
    assert [v for v in check_qdq_for_tensorrt(paths["trt"]) if v.severity == "error"] == []
    assert any(v.rule == "qdq-dtype" for v in check_qdq_for_tensorrt(paths["cpu"]))


def test_saved_ranges_reproduce_the_same_model(models, tmp_path):
    paths, ranges = models
    again = load_ranges(save_ranges(ranges, tmp_path / "ranges.json"))
    out = quantize_tensorrt(paths["fp32"], tmp_path / "again.onnx", again, exclude_patterns=["decoder"])
    x = _images(4, 4)
    for a, b in zip(_run(paths["trt"], x), _run(out, x)):
        np.testing.assert_array_equal(a, b)


def test_ranges_from_another_model_are_rejected(models, tmp_path):
    paths, _ = models
    other = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        ), opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8,
    )  # fmt: skip
    onnx.save(other, str(tmp_path / "other.onnx"))
    wrong = calibrate(tmp_path / "other.onnx", _images(1, 5), method="minmax")
    with pytest.raises(ValueError, match="another model"):
        quantize_cpu(paths["fp32"], tmp_path / "x.onnx", wrong)


def test_calibration_inputs_are_validated():
    with pytest.raises(ValueError, match="minmax"):
        parse_method("kl")
    with pytest.raises(ValueError, match=r"\[N,3,S,S\]"):
        BatchReader([np.zeros((2, SIZE, SIZE), np.float32)], "image")
    reader = BatchReader(_images(10, 0), "image", batch_size=4)
    assert len(reader) == 3 and reader.num_images == 10
    assert [len(reader.get_next()["image"]) for _ in range(3)] == [4, 4, 2] and reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is not None


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_give_ranges(models, method):
    paths, minmax = models
    ranges = calibrate(paths["fp32"], _images(8, 6), method=method, percentile=99.9, num_bins=128)
    assert set(ranges.data) == set(minmax.data)
    lo, hi = ranges.data["image"].range_value
    assert lo < 0 < hi and hi <= minmax.data["image"].range_value[1] + 1e-6


def test_exclusions_and_sensitivity(models):
    paths, ranges = models
    model = onnx.load(str(paths["fp32"]))
    with pytest.raises(ValueError, match="not in the model"):
        resolve_exclusions(model, ["no_such_node"])
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert set(convs) <= set(resolve_exclusions(model, exclude_patterns=["Conv"]))
    seen = []

    def eval_fn(path):
        seen.append(path)
        return float(len(qdq_summary(path)["quantized_nodes"]))

    scores = layer_sensitivity(
        paths["fp32"], ranges, "tensorrt", eval_fn, [convs[0], convs], exclude_patterns=["decoder"]
    )
    assert len(seen) == 2
    # Keeping one conv float leaves more layers quantized than keeping both: ranked first.
    assert scores[0][0] == convs[0] and scores[0][1] > scores[1][1]
    with pytest.raises(ValueError, match="max_candidates"):
        layer_sensitivity(paths["fp32"], ranges, "cpu", eval_fn, convs, max_candidates=1)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_take_an_image_count_that_is_not_a_multiple_of_the_batch(models, method):
    paths, minmax = models
    images = _images(21, 7)  # batches of 8, 8 and 5: ORT stacked them into one ragged array and crashed
    images[20] = 7.0  # the brightest pixel is in the short last batch: it must count
    ranges = calibrate(paths["fp32"], images, method=method, percentile=100.0, num_bins=128, batch_size=8)
    assert set(ranges.data) == set(minmax.data)
    hi = ranges.data["image"].range_value[1]
    assert (hi == pytest.approx(7.0, rel=0.02)) if method == "percentile" else hi > 0


class _Residual(nn.Module):
    """Stem conv -> [conv-BN-ReLU6 -> conv-BN] + skip -> MaxPool -> GAP -> Linear (an EfficientNet-style block)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                                   nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = self.pool(y + self.block(y))
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def test_tensorrt_flavour_places_qdq_like_modelopt(tmp_path):
    """Residual Add quantized on its skip input only (the conv branch stays fusible), pools quantized,
    bias Adds float; the result still passes the TensorRT Q/DQ check and stays close to FP32."""
    from compress.trt_placement import residual_adds

    torch.manual_seed(0)
    net = _Residual().eval()
    fp32 = tmp_path / "res.onnx"
    torch.onnx.export(net, torch.randn(1, 3, SIZE, SIZE), str(fp32), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "n"}})
    ranges = calibrate(fp32, _images(16, 1), method="minmax")
    out = quantize_tensorrt(fp32, tmp_path / "trt.onnx", ranges)
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 1
    fed = [producer[t].op_type for t in adds[0].input]
    assert sorted(fed) == ["Conv", "DequantizeLinear"]  # skip input quantized, conv branch fused

    pools = [n for n in model.graph.node if n.op_type in ("MaxPool", "GlobalAveragePool", "AveragePool")]
    assert pools and all(producer[n.input[0]].op_type == "DequantizeLinear" for n in pools)
    assert [v for v in check_qdq_for_tensorrt(out) if v.severity == "error"] == []
    assert len(residual_adds(onnx.load(str(fp32)))) == 1
    x = _images(8, 2)
    ref, got = _run(fp32, x)[0], _run(out, x)[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.75


def test_calibration_cache_is_tensorrt_format_with_symmetric_scales(models, tmp_path):
    import struct

    from compress.modelopt_quantizer import tensorrt_calibration_cache

    _, ranges = models
    lines = tensorrt_calibration_cache(ranges, tmp_path / "c.cache").read_text().splitlines()
    assert lines[0].startswith("TRT-") and len(lines) == len(list(ranges.keys())) + 1
    name, hexed = lines[1].split(": ")
    low, high = (float(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value)
    assert struct.unpack("!f", bytes.fromhex(hexed))[0] == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)


def test_modelopt_quantizer_gets_our_ranges_and_exclusions(models, tmp_path, monkeypatch):
    """A stand-in for modelopt.onnx.quantization.quantize records its documented keyword arguments."""
    import sys
    import types

    from compress.modelopt_quantizer import quantize_modelopt

    calls = {}

    def fake_quantize(onnx_path, **kwargs):
        calls.update(kwargs, onnx_path=onnx_path, cache=open(kwargs["calibration_cache_path"]).read())
        onnx.save(onnx.load(onnx_path), kwargs["output_path"])

    module = types.ModuleType("modelopt.onnx.quantization")
    module.quantize = fake_quantize
    for name in ("modelopt", "modelopt.onnx"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", module)
    paths, ranges = models
    out = quantize_modelopt(paths["fp32"], tmp_path / "mo.onnx", ranges, exclude_patterns=["decoder"],
                            high_precision_dtype="fp32")
    assert out.exists() and calls["quantize_mode"] == "int8" and calls["high_precision_dtype"] == "fp32"
    assert calls["calibration_shapes"] == f"image:1x3x{SIZE}x{SIZE}"
    assert any("decoder" in n for n in calls["nodes_to_exclude"])
    assert any("Softmax" in n for n in calls["nodes_to_exclude"])  # float op types stay float there too
    assert calls["cache"].count("\n") == len(list(ranges.keys())) + 1


def test_modelopt_missing_is_one_line_and_exit_2(monkeypatch, capsys):
    import sys

    from compress import quantize
    from deploy.errors import cli

    monkeypatch.setitem(sys.modules, "modelopt", None)  # import fails as if not installed
    code = cli(quantize.main, ["--quantizer", "modelopt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nvidia-modelopt is not installed" in err[0]


def test_compress_report_compares_modelopt_placement_with_ours():
    from compress.quantize import markdown

    def entry(q, drop):
        return {"quantize_linear": q, "dequantize_linear": q + 3}, {"coarse/balanced_accuracy": drop}

    theirs, t_drops = entry(40, 0.5)
    ours, o_drops = entry(31, 0.8)
    flav = {"status": "passed", "path": "x", "summary": theirs,
            "kept": {"drops": t_drops, "method": "minmax", "images": 500, "float_layers": []}}
    report = {"student": {"flavours": {"int8-tensorrt": {**flav, "ours": {"summary": ours, "drops": o_drops}}}}}
    md = markdown(report)
    assert "ModelOpt's placement vs ours" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("- student: ModelOpt"))
    assert "40 Q / 43 DQ" in line and "ours 31 Q / 34 DQ" in line
    assert "placement vs ours" not in markdown({"student": {"flavours": {"int8-tensorrt": flav}}})


def test_entropy_calibration_is_not_minmax_in_disguise(models):
    """With ORT's default 128 histogram bins for 128 quantized bins the KL search has one candidate,
    the full range; the default bins must leave entropy room to clip outliers."""
    paths, _ = models
    x = _images(16, 7)
    minmax = calibrate(paths["fp32"], x, method="minmax")
    entropy = calibrate(paths["fp32"], x, method="entropy")
    narrower = [k for k in minmax.data if k in entropy.data
                and entropy.data[k].range_value[1] < minmax.data[k].range_value[1] - 1e-6]
    assert narrower

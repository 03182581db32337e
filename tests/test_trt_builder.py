"""deploy.build_engine against a stand-in TensorRT builder: what TensorRT 8.5, 10.x and 11.x accept,
checked per version (the runtime stand-ins: tests/fake_tensorrt.py)."""

from __future__ import annotations

import types
from pathlib import Path

import onnx
import pytest
from fake_tensorrt import DataType, retyped
from onnx import TensorProto, helper
from test_deploy import tiny_contract, write_image, write_tiny_model  # tests/ is on sys.path

from deploy.build_engine import build_engine, default_engine_path
from deploy.build_engine import main as build_main
from deploy.contract import Contract, sidecar_path
from deploy.errors import cli
from deploy.fileio import sha256_file
from deploy.predictor import Predictor

_BUILDER_FLAGS = {8: ("FP16", "INT8", "TF32"), 10: ("FP16", "INT8", "TF32"), 11: ("TF32",)}


class _FakeBuilder:
    """Records what build_engine asks of TensorRT's builder and refuses what that version would:
    removed flags do not exist (AttributeError, as in 11.x), precision flags on a strongly typed network
    fail the build (as 10.x does), and 'builds' a fake engine of the ONNX."""

    def __init__(self, logger):
        _FakeBuilder.last = self

    def create_network(self, flags: int):
        self.network_flags = flags
        tensor = types.SimpleNamespace(name="image", shape=(-1, 3, 32, 32), dtype="FLOAT")
        return types.SimpleNamespace(num_inputs=1, get_input=lambda i: tensor, num_outputs=0, get_output=None,
                                     num_layers=0, get_layer=None, onnx=None, flags=flags)

    def create_builder_config(self):
        config = self.config = types.SimpleNamespace(flags={"TF32"}, profiles=[], cache=None)  # TF32: default on
        config.set_memory_pool_limit = lambda pool, size: setattr(config, "workspace", size)
        config.set_flag = config.flags.add
        config.clear_flag = config.flags.discard
        config.add_optimization_profile = config.profiles.append
        config.create_timing_cache = lambda data: types.SimpleNamespace(data=data)
        config.set_timing_cache = lambda cache, ignore_mismatch: setattr(config, "cache", cache)
        config.get_timing_cache = lambda: types.SimpleNamespace(serialize=lambda: config.cache.data + b"+")
        return config

    def create_optimization_profile(self):
        shapes = {}
        return types.SimpleNamespace(shapes=shapes, set_shape=lambda name, *s: shapes.__setitem__(name, s))

    def build_serialized_network(self, network, config):
        strongly_typed = bool(network.flags & (1 << 5))
        if strongly_typed and config.flags & {"FP16", "INT8"}:
            return None  # TensorRT 10: precision flags are an error on a strongly typed network
        return b"FAKE" + network.onnx.encode()



@pytest.fixture(params=["10.3.0", "11.0.0"])
def fake_builder(request, fake_trt):
    trt, _ = fake_trt
    trt.__version__ = request.param

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data: bytes, path: str) -> bool:
            """Layers typed as TensorRT would type the ONNX: Q/DQ layers, HALF outputs after FP16 casts."""
            model = onnx.load_from_string(data)
            layers = []
            for node in model.graph.node:
                half = node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT16
                out = types.SimpleNamespace(dtype=DataType.HALF if half else DataType.FLOAT)
                layers.append(types.SimpleNamespace(type=node.op_type, num_outputs=1, get_output=lambda j, o=out: o))
            self.network.num_layers, self.network.get_layer = len(layers), layers.__getitem__
            self.network.onnx = path
            return True

    major = int(request.param.split(".")[0])
    trt.Builder, trt.OnnxParser = _FakeBuilder, Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in _BUILDER_FLAGS[major]})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY="names", DETAILED="detailed")
    trt.LayerType = types.SimpleNamespace(QUANTIZE="QuantizeLinear", DEQUANTIZE="DequantizeLinear")
    return trt


def test_build_engine_writes_engine_sidecar_and_timing_cache(fake_builder, tmp_path: Path, capsys):
    onnx_path = retyped(write_tiny_model(tmp_path), "fp16")
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"old")
    assert cli(build_main, [str(onnx_path), "--precision", "fp16", "--min-batch", "2", "--opt-batch", "3",
                            "--max-batch", "4", "--workspace-mb", "64", "--timing-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "network input 'image': shape [-1, 3, 32, 32]" in out and f"TensorRT {fake_builder.__version__}" in out
    builder = _FakeBuilder.last
    assert builder.network_flags == 1 << 5 and builder.config.flags == {"TF32"}  # strongly typed, no FP16 flag
    assert builder.config.workspace == 64 << 20
    assert builder.config.profiling_verbosity == "detailed"  # the inspector can see layer precisions
    assert builder.config.profiles[0].shapes["image"] == ((2, 3, 32, 32), (3, 3, 32, 32), (4, 3, 32, 32))
    assert cache.read_bytes() == b"old+"  # loaded, then saved after the build
    engine = default_engine_path(onnx_path)
    contract = Contract.load(sidecar_path(engine))
    build = contract.extra["tensorrt"]
    assert build["version"] == fake_builder.__version__ and build["gpu"] == "Fake GPU"
    assert build["precision"] == "fp16" and (build["min_batch"], build["opt_batch"], build["max_batch"]) == (2, 3, 4)
    assert build["onnx_sha256"] == sha256_file(onnx_path)
    assert contract.output_names == tiny_contract().output_names
    with Predictor(engine) as predictor:  # the fake engine runs the ONNX: a full round trip
        (pred,) = predictor.predict([write_image(tmp_path / "r.jpg", (230, 20, 20))])
    assert pred.tasks["diagnosis"].text == "red disc"


def test_build_engine_every_precision_strongly_typed(fake_builder, tmp_path: Path, capsys):
    fp32 = write_tiny_model(tmp_path)
    for onnx_path, precision in ((retyped(fp32, "int8"), "int8"), (fp32, "fp32")):
        build_engine(onnx_path, precision=precision, log=lambda _: None)
        assert _FakeBuilder.last.network_flags == 1 << 5
        assert _FakeBuilder.last.config.flags == (set() if precision == "fp32" else {"TF32"})  # fp32: TF32 off
    # The model's own types decide: a float32 ONNX cannot become an fp16 or int8 engine by flag.
    for precision, needs in (("fp16", "FP16 ONNX"), ("int8", "Q/DQ ONNX")):
        assert cli(build_main, [str(fp32), "--precision", precision]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and needs in err and "this model is fp32" in err


@pytest.mark.parametrize("fake_builder", ["8.5.2.2"], indirect=True)
def test_build_engine_on_tensorrt_8_uses_weak_typing_flags(fake_builder, tmp_path: Path):
    fp32 = write_tiny_model(tmp_path)
    build_engine(fp32, precision="fp16", log=lambda _: None)
    assert _FakeBuilder.last.network_flags == 1 << 0 and _FakeBuilder.last.config.flags == {"FP16", "TF32"}
    build_engine(retyped(fp32, "int8"), precision="int8", log=lambda _: None)
    assert _FakeBuilder.last.config.flags == {"FP16", "INT8", "TF32"}

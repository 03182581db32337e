"""Export parity, INT8 flavours, the accuracy guard and on-device prediction, on a tiny trained run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.export import ExportMismatch, export_all, verify_export
from compress.guard import Guard, GuardFailed
from compress.onnx_eval import evaluate_onnx
from compress.quantize import calibration_source
from compress.quantize import main as quantize_main
from compress.quantize_flavours import qdq_summary
from compress.settings import CompressConfig, GuardConfig
from compress.trt_check import check_model, check_qdq_for_tensorrt
from compress.trt_ops import CLAIMED_VERSIONS, unsupported_in_claimed
from deploy.contract import METADATA_KEY, Contract, TaskSpec, read_sidecar
from train.experiment import load_experiment
from train.models.multitask import ExportModel
from train.models.saved import load_model
from train.stage import image_set, load_splits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """This module's copy of the session's tiny trained and exported run (its tests write into it)."""
    cfg_path = trained_run.copy(tmp_path_factory.mktemp("compress"))
    return cfg_path, load_experiment(cfg_path), trained_run.export_reports


def test_export_matches_pytorch_and_carries_the_contract(run):
    _, cfg, reports = run
    for name in ("student", "ensemble"):
        rep = reports[name]
        assert rep["coarse"]["max_abs_diff"] <= 1e-4 and rep["coarse"]["top1_agreement"] >= 0.995
        assert rep["diagnosis"]["text_agreement"] >= 0.995
        path = cfg.layout.onnx(name)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        embedded = Contract.from_json(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
        assert embedded.to_dict() == read_sidecar(path).to_dict()
        assert [o.name for o in model.graph.output] == embedded.output_names
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_export_check_fails_loudly_when_onnx_differs(run):
    _, cfg, _ = run
    path = cfg.layout.onnx("student")
    model, _ = load_model(cfg.run_dir / "student" / "best.safetensors")
    with torch.no_grad():  # a different model than the one exported
        model.heads["coarse"][-1].bias[0] += 2.0  # (a shift of every logit would not change softmax)
    splits = load_splits(cfg)
    contract = read_sidecar(path)
    data = image_set(splits, splits.val, contract.tasks, contract.preprocessing)
    with pytest.raises(ExportMismatch, match="coarse: max"):
        verify_export(path, ExportModel(model), contract, data, CompressConfig())


def test_compress_writes_every_flavour_with_the_right_quantization(run):
    cfg_path, cfg, _ = run
    assert quantize_main(["--config", str(cfg_path)]) == 0
    report = json.loads((cfg.run_dir / "onnx" / "compress_report.json").read_text())["student"]
    assert {k: v["status"] for k, v in report["flavours"].items()} == \
        {"int8-cpu": "passed", "int8-tensorrt": "passed", "fp16": "passed"}
    trt = qdq_summary(cfg.layout.onnx("student", "int8-tensorrt"))
    assert trt["zero_points_all_zero"] and set(trt["zero_point_dtypes"]) == {"int8"}
    assert trt["per_channel_axes"] and trt["dq_outputs"] == []
    assert not any("/heads/diagnosis/" in n for n in trt["quantized_nodes"])  # decoder stays float
    cpu = qdq_summary(cfg.layout.onnx("student", "int8-cpu"))
    assert "uint8" in cpu["zero_point_dtypes"] and "int8" in cpu["zero_point_dtypes"]
    for flavour in ("fp32", "fp16", "int8-cpu", "int8-tensorrt"):
        path = cfg.layout.onnx("student", flavour)
        assert [v for v in check_model(path) if v.severity == "error"] == [], flavour
        sidecar = read_sidecar(path)  # each flavour has its own sidecar, equal to its embedded contract
        embedded = next(p.value for p in onnx.load(str(path)).metadata_props if p.key == METADATA_KEY)
        assert Contract.from_json(embedded).to_dict() == sidecar.to_dict()
        assert sidecar.extra.get("precision", "fp32") == flavour or flavour == "fp32"
    assert not [p.name for p in (cfg.run_dir / "onnx").iterdir() if p.name.startswith(".")]  # no stray temp files
    assert [v for v in check_qdq_for_tensorrt(cfg.layout.onnx("student", "int8-tensorrt"))
            if v.severity == "error"] == []


def test_guard_fires_on_blank_calibration_and_more_images_recover(run):
    _, cfg, _ = run
    splits = load_splits(cfg)
    fp32 = cfg.layout.onnx("student")
    contract = read_sidecar(fp32)
    val = image_set(splits, splits.val, contract.tasks, contract.preprocessing)
    real, available = calibration_source(splits, contract, seed=0)

    def images(n: int) -> np.ndarray:  # a handful of blank frames, as from a misconfigured camera export
        return np.zeros((n, 3, 32, 32), np.float32) - 1.0 if n <= 2 else real(n)

    # Zero point limits: only a drop within noise (its paired 95 % interval includes 0, at most 10 points
    # on this tiny split) passes; the blank calibration's drop is beyond noise.
    ccfg = CompressConfig(calibration_images=2, guard=GuardConfig(
        max_drop_accuracy_points=0.0, max_drop_top5_points=0.0, max_drop_bleu=0.0, noise_cap_points=10.0,
        fallbacks=["more_images"]))
    reference = evaluate_onnx(fp32, val, contract.tasks)
    out = cfg.run_dir / "guard" / "student.int8-cpu.onnx"
    guard = Guard(fp32, "int8-cpu", val, contract.tasks, images, ccfg, ["/heads/diagnosis/"], {}, reference)
    kept = guard.run(out, available)
    first = guard.attempts[0]
    assert not first.passed and max(first.drops.values()) > 0  # the blank calibration is caught
    assert kept.passed and kept.images > 2 and out.exists()  # and the fallback recovers

    strict = Guard(fp32, "int8-cpu", val, contract.tasks, lambda n: np.zeros((n, 3, 32, 32), np.float32) - 1.0,
                   ccfg, ["/heads/diagnosis/"], {}, reference)
    with pytest.raises(GuardFailed, match="no attempt stayed within"):
        strict.run(cfg.run_dir / "guard" / "never.onnx", 2)
    assert not (cfg.run_dir / "guard" / "never.onnx").exists()


def test_deploy_predict_equals_the_evaluation_of_every_flavour(run, tmp_path):
    """Train/serve skew check: the device CLI's probabilities and text for a set of images are those
    the evaluation (the numbers in the reports) computed for the same model and images."""
    cfg_path, cfg, _ = run
    if not cfg.layout.onnx("student", "int8-cpu").exists():
        assert quantize_main(["--config", str(cfg_path)]) == 0
    splits = load_splits(cfg)
    rows = splits.test[:6]
    images = [str(splits.data.image_path(r)) for r in rows]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    for flavour in ("fp32", "fp16", "int8-cpu", "int8-tensorrt"):
        path = cfg.layout.onnx("student", flavour)
        cmd = [sys.executable, "-m", "deploy.predict", str(path), *images, str(broken), "--json", "--batch-size", "4"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr  # one image failed, the others were predicted
        records = json.loads(proc.stdout)["predictions"]
        assert [r["error"] is None for r in records] == [True] * len(rows) + [False]
        assert "broken.jpg" in records[-1]["error"]
        contract = read_sidecar(path)
        expected, _ = evaluate_onnx(path, image_set(splits, rows, contract.tasks, contract.preprocessing),
                                    contract.tasks)
        vocab = contract.vocabulary
        for i, rec in enumerate(records[:-1]):
            for task in contract.tasks:
                got = rec["tasks"][task.name]
                if task.kind == "classification":
                    probs = [got["probabilities"][c] for c in task.classes]
                    np.testing.assert_allclose(probs, expected[task.name][i], atol=1e-5, err_msg=flavour)
                else:
                    assert got["text"] == vocab.decode(expected[task.name][i]), flavour


def test_export_refuses_a_model_off_by_a_thousandth(run):
    """The parity check's tolerance (1e-4) is tight enough to catch a model that differs by 1e-3."""
    _, cfg, _ = run
    path = cfg.layout.onnx("student")
    model, _ = load_model(cfg.run_dir / "student" / "best.safetensors")
    exported = ExportModel(model)

    class Nudged(torch.nn.Module):
        def forward(self, image):
            coarse, *rest = exported(image)
            shift = torch.zeros_like(coarse)
            shift[:, 0], shift[:, 1] = 1e-3, -1e-3  # probabilities still sum to 1
            return (coarse + shift, *rest)

    splits = load_splits(cfg)
    contract = read_sidecar(path)
    data = image_set(splits, splits.val, contract.tasks, contract.preprocessing)
    with pytest.raises(ExportMismatch, match=r"coarse: max \|p_onnx - p_torch\| = 1\.00e-03 > 0\.0001"):
        verify_export(path, Nudged(), contract, data, CompressConfig())
    assert verify_export(path, exported, contract, data, CompressConfig())["coarse"]["max_abs_diff"] <= 1e-4


def test_a_failed_export_check_leaves_no_model_behind(run, monkeypatch):
    # Last in this module: it removes the ensemble's ONNX.
    cfg_path, cfg, _ = run
    import compress.export as export_mod

    def mismatch(path, *args, **kwargs):
        raise ExportMismatch(f"{path}: injected mismatch")

    monkeypatch.setattr(export_mod, "verify_export", mismatch)
    with pytest.raises(ExportMismatch):
        export_all(str(cfg_path), ["compress.models=[ensemble]"])
    assert not cfg.layout.onnx("ensemble").exists()
    assert not cfg.layout.onnx("ensemble").with_suffix(".json").exists()


def test_exported_graphs_use_only_ops_every_claimed_tensorrt_parses(run):
    _, cfg, _ = run
    files = sorted((Path(cfg.run_dir) / "onnx").glob("*.onnx"))
    # student + teachers/ensemble, and the INT8/FP16 flavours when the compress test ran first
    assert "student.onnx" in {f.name for f in files} and len(files) >= 2
    for path in files:
        model = onnx.load(str(path))
        ops = {n.op_type for g in [model.graph] + [a.g for n in model.graph.node for a in n.attribute if a.g.node]
               for n in g.node}
        assert unsupported_in_claimed(ops) == {}, f"{path.name}: not parsed by TensorRT {CLAIMED_VERSIONS}"


# --- the exported text decoder: node budget per step, greedy parity in every flavour ------------------
# Nodes per unrolled decoder step of the exported student (context feature on / off): Gemm (logits and
# the next hidden gates), Split, Gather (token-gate table), [Add context], Split, Add, Sigmoid, Split,
# Mul, Add, Tanh, Sub, Mul, Add, ArgMax. Before the rework: 50 per step (26 of them Constant).
STEP_BUDGET = {True: 15, False: 14}
FIXED_BUDGET = 14  # decoder nodes outside the steps (initial state, context gates, token stacking)


def _decoder_counts(context: bool, max_len: int, tmp_path: Path):
    from tiny import COARSE, tiny_model

    from compress.export import export_onnx
    from compress.graph_split import decoder_op_counts
    from deploy.preprocess import PreprocessSpec
    from deploy.vocab import Vocabulary
    from train.models.multitask import ModelConfig, MultiTaskNet

    tasks = [TaskSpec("coarse", "classification", COARSE), TaskSpec("diagnosis", "text")]
    vocab = Vocabulary.build(["a b c d e f g h i j k"], max_len=max_len)
    model = MultiTaskNet(ModelConfig(**{**tiny_model(), "decoder_context": context}), tasks, len(vocab), max_len)
    contract = Contract(model_name="m", model_version="1", tasks=tasks, preprocessing=PreprocessSpec(size=32),
                        vocabulary=vocab)
    path = export_onnx(ExportModel(model.eval()), contract, tmp_path / f"d{int(context)}{max_len}.onnx")
    return decoder_op_counts(onnx.load(str(path)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("context", [True, False])
def test_exported_decoder_stays_within_its_node_budget_per_step(context, tmp_path):
    short, long = _decoder_counts(context, 4, tmp_path), _decoder_counts(context, 8, tmp_path)
    per_step = {op: (long[op] - short[op]) / 4 for op in long | short if long[op] != short[op]}
    assert sum(per_step.values()) <= STEP_BUDGET[context], per_step
    assert not {"Constant", "Slice", "Unsqueeze", "MatMul"} & set(per_step), per_step  # no churn per step
    fixed = sum(short.values()) - 4 * sum(per_step.values())
    assert fixed <= FIXED_BUDGET, short


def test_greedy_tokens_of_every_flavour_equal_pytorch_on_every_validation_image(run, tmp_path):
    """Whole fp32 graph: tokens identical to the PyTorch model's greedy decoding on every validation
    image. Every flavour's decoder (cut out at the pooled features, fed PyTorch's features): identical too."""
    from compress.graph_split import split_text_decoder

    cfg_path, cfg, _ = run
    if not cfg.layout.onnx("student", "int8-cpu").exists():
        assert quantize_main(["--config", str(cfg_path)]) == 0
    model, _ = load_model(cfg.run_dir / "student" / "best.safetensors")
    splits = load_splits(cfg)
    contract = read_sidecar(cfg.layout.onnx("student"))
    val = image_set(splits, splits.val, contract.tasks, contract.preprocessing)
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    with torch.no_grad():
        features = model.features(images)
        want = model.decoder.greedy(features)[1].numpy()
    assert len({tuple(r) for r in want.tolist()}) > 1  # the images do not all get the same sentence
    session = ort.InferenceSession(str(cfg.layout.onnx("student")), providers=["CPUExecutionProvider"])
    got = session.run(["diagnosis_tokens"], {"image": images.numpy()})[0]
    np.testing.assert_array_equal(got, want)
    for flavour in ("fp32", "fp16", "int8-cpu", "int8-tensorrt"):
        _, decoder, cut = split_text_decoder(cfg.layout.onnx("student", flavour), tmp_path / flavour)
        session = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
        [feed] = session.get_inputs()
        dtype = np.float16 if feed.type == "tensor(float16)" else np.float32
        got = session.run(None, {feed.name: features.numpy().astype(dtype)})[0]
        np.testing.assert_array_equal(got, want, err_msg=flavour)

"""Predictor, ONNX Runtime backend and the predict CLI, on a tiny ONNX model built here (torch-free).

The tiny model averages each colour channel and maps it through fixed weights, so a red image is
coarse class c0 / text "red disc" and a green one c1 / "green cup cup": predictions can be asserted.
test_watch.py, test_trt.py and test_trt_builder.py import `write_tiny_model` and `write_image` from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from deploy.backend import ModelError
from deploy.contract import METADATA_KEY, Contract, ContractError, TaskSpec, sidecar_path
from deploy.errors import cli
from deploy.predict import main as _predict_main
from deploy.predictor import Predictor
from deploy.preprocess import PreprocessSpec
from deploy.vocab import SPECIALS, Vocabulary

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "disc", "cup"]
RED_TEXT, GREEN_TEXT = ["red", "disc", "<eos>", "<pad>"], ["green", "cup", "cup", "<eos>"]


def predict_main(argv: list[str]) -> int:
    """`python -m deploy.predict ARGV` in-process: the CLI boundary maps errors to exit codes."""
    return cli(_predict_main, argv)


def tiny_contract(coarse_classes: int = 5, size: int = 32) -> Contract:
    vocab = Vocabulary(tokens=[*SPECIALS, *WORDS], max_len=4)
    return Contract(
        model_name="tiny", model_version="1",
        tasks=[TaskSpec("coarse", "classification", tuple(f"c{i}" for i in range(coarse_classes))),
               TaskSpec("fine", "classification", tuple(f"f{i}" for i in range(7))),
               TaskSpec("diagnosis", "text")],
        preprocessing=PreprocessSpec(size=size), vocabulary=vocab)


def tiny_onnx(contract: Contract, embed: bool = True) -> onnx.ModelProto:
    """image -> channel means -> (softmax heads, argmax token head); weights make colours separable."""
    vocab, size = contract.vocabulary, contract.preprocessing.size
    n_vocab, length = len(vocab), vocab.max_len
    w_coarse = np.zeros((3, 5), np.float32)
    w_coarse[0, 0] = w_coarse[1, 1] = w_coarse[2, 2] = 4.0
    w_fine = np.zeros((3, 7), np.float32)
    w_fine[0, 5] = w_fine[1, 6] = 3.0
    w_text = np.zeros((3, length * n_vocab), np.float32)
    for channel, words in ((0, RED_TEXT), (1, GREEN_TEXT)):
        for pos, word in enumerate(words):
            w_text[channel, pos * n_vocab + vocab.tokens.index(word)] += 5.0
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w_coarse, "w_coarse"), (np.zeros(5, np.float32), "b_coarse"), (w_fine, "w_fine"), (w_text, "w_text"),
        (np.array([-1, length, n_vocab], np.int64), "text_shape"))]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["feat"], axis=1),
        helper.make_node("MatMul", ["feat", "w_coarse"], ["coarse_mm"]),
        helper.make_node("Add", ["coarse_mm", "b_coarse"], ["coarse_logits"]),
        helper.make_node("Softmax", ["coarse_logits"], ["coarse_probs"], axis=1),
        helper.make_node("MatMul", ["feat", "w_fine"], ["fine_logits"]),
        helper.make_node("Softmax", ["fine_logits"], ["fine_probs"], axis=1),
        helper.make_node("MatMul", ["feat", "w_text"], ["text_flat"]),
        helper.make_node("Reshape", ["text_flat", "text_shape"], ["text_logits"]),
        helper.make_node("ArgMax", ["text_logits"], ["diagnosis_tokens"], axis=2, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("coarse_probs", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("fine_probs", TensorProto.FLOAT, ["N", 7]),
         helper.make_tensor_value_info("diagnosis_tokens", TensorProto.INT64, ["N", length])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if embed:
        helper.set_model_props(model, {METADATA_KEY: contract.to_json()})
    onnx.checker.check_model(model)
    return model


def write_tiny_model(folder: Path, name: str = "tiny", sidecar: Contract | None | bool = True,
                     embed: bool = True) -> Path:
    """Write folder/name.onnx (+ name.json unless sidecar=False; a Contract writes that sidecar instead)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(tiny_onnx(tiny_contract(), embed=embed), path)
    if sidecar is not False:
        (tiny_contract() if sidecar is True else sidecar).save(sidecar_path(path))
    return path


def write_image(path: Path, color=(220, 30, 30), size=(64, 48), mode: str = "RGB") -> Path:
    """A flat-colour image in any PIL mode/format (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)  # 16-bit grayscale
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "model")


def test_predicts_labels_top5_and_text(model: Path, tmp_path: Path):
    red = write_image(tmp_path / "red.jpg", (230, 20, 20))
    green = write_image(tmp_path / "green.png", (20, 230, 20), size=(40, 60))
    with Predictor(model) as predictor:
        red_p, green_p = predictor.predict([red, green])
    assert red_p.ok and green_p.ok
    assert red_p.tasks["coarse"].label == "c0" and green_p.tasks["coarse"].label == "c1"
    assert red_p.tasks["coarse"].probability > 0.9
    assert sum(red_p.tasks["coarse"].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    top5 = red_p.tasks["fine"].top5
    assert len(top5) == 5 and top5[0][0] == "f5" and [p for _, p in top5] == sorted([p for _, p in top5], reverse=True)
    assert green_p.tasks["fine"].top5[0][0] == "f6"
    assert red_p.tasks["diagnosis"].text == "red disc"
    assert green_p.tasks["diagnosis"].text == "green cup cup"
    assert set(red_p.timing_ms) == {"preprocess", "inference", "postprocess"}
    record = json.loads(json.dumps(red_p.to_dict()))
    assert record["tasks"]["coarse"]["label"] == "c0" and record["error"] is None
    assert record["tasks"]["fine"]["top5"][0][0] == "f5"


def test_bad_images_fail_alone_and_the_batch_goes_on(model: Path, tmp_path: Path):
    good = write_image(tmp_path / "good.jpg", (230, 20, 20), size=(300, 200))
    full = good.read_bytes()
    bad = {
        "corrupt.jpg": full[:20] + bytes(range(256)) * 8,
        "zero.jpg": b"",
        "truncated.jpg": full[: len(full) // 2],
        "notes.jpg": b"patient notes, not an image\n" * 20,
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    tiny = write_image(tmp_path / "tiny.png", size=(8, 8))
    strip = write_image(tmp_path / "strip.png", size=(400, 50))
    green = write_image(tmp_path / "green.bmp", (20, 230, 20))
    paths = [good, *(tmp_path / n for n in bad), tmp_path / "missing.jpg", tiny, strip, green]
    with Predictor(model) as predictor:
        preds = predictor.predict(paths, batch_size=3)
    assert [p.path for p in preds] == [str(p) for p in paths]
    assert preds[0].ok and preds[0].tasks["coarse"].label == "c0"
    assert preds[-1].ok and preds[-1].tasks["coarse"].label == "c1"
    errors = {Path(p.path).name: p.error for p in preds[1:-1]}
    assert all(err and name in err for name, err in errors.items())
    assert "empty" in errors["zero.jpg"] and "not found" in errors["missing.jpg"]
    assert "truncated" in errors["truncated.jpg"] and "not an image" in errors["notes.jpg"]
    assert "smaller than 32" in errors["tiny.png"] and "aspect" in errors["strip.png"]
    assert all(not p.tasks for p in preds[1:-1])


@pytest.mark.parametrize("mode, suffix", [("RGBA", ".png"), ("L", ".png"), ("I;16", ".png"), ("P", ".png"),
                                          ("CMYK", ".jpg"), ("1", ".bmp"), ("RGB", ".tiff")])
def test_any_colour_mode_is_converted(model: Path, tmp_path: Path, mode: str, suffix: str):
    path = write_image(tmp_path / f"img{suffix}", (200, 40, 40), mode=mode)
    with Predictor(model) as predictor:
        (pred,) = predictor.predict([path])
    assert pred.ok, pred.error


def test_predict_arrays_and_batch_size_parity(model: Path, tmp_path: Path):
    paths = [write_image(tmp_path / f"{i}.png", (25 * i, 200 - 20 * i, 90)) for i in range(7)]
    with Predictor(model) as predictor:
        outputs = predictor.predict_arrays(np.zeros((3, 3, 32, 32), np.float32))
        one = predictor.predict(paths, batch_size=1)
        many = predictor.predict(paths, batch_size=4)
        with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
            predictor.predict_arrays(np.zeros((1, 3, 64, 64), np.float32))
    assert list(outputs) == ["coarse_probs", "fine_probs", "diagnosis_tokens"]
    assert outputs["coarse_probs"].shape == (3, 5) and outputs["diagnosis_tokens"].shape == (3, 4)
    assert outputs["diagnosis_tokens"].dtype == np.int64
    for a, b in zip(one, many):
        assert a.tasks["fine"].probabilities == pytest.approx(b.tasks["fine"].probabilities, abs=1e-6)


def test_file_that_is_not_a_model(tmp_path: Path):
    fake = tmp_path / "photo.onnx"
    fake.write_bytes(write_image(tmp_path / "photo.jpg").read_bytes())
    tiny_contract().save(sidecar_path(fake))
    with pytest.raises(ModelError, match="JPEG image"):
        Predictor(fake)
    with pytest.raises(ModelError, match="not found"):
        Predictor(tmp_path / "absent.onnx")


def test_contract_must_match_the_model(tmp_path: Path):
    wrong = write_tiny_model(tmp_path / "a", sidecar=tiny_contract(coarse_classes=4), embed=False)
    with pytest.raises(ContractError, match=r"coarse_probs has shape \[None, 5\].*4 classes"):
        Predictor(wrong)
    wrong_size = write_tiny_model(tmp_path / "b", sidecar=tiny_contract(size=64), embed=False)
    with pytest.raises(ContractError, match="input shape"):
        Predictor(wrong_size)
    disagree = write_tiny_model(tmp_path / "c", sidecar=tiny_contract(coarse_classes=4), embed=True)
    with pytest.raises(ContractError, match="disagree on .*tasks"):
        Predictor(disagree)
    bare = write_tiny_model(tmp_path / "d", sidecar=False, embed=False)
    with pytest.raises(ContractError, match="no contract"):
        Predictor(bare)


def test_embedded_contract_is_enough(tmp_path: Path):
    model = write_tiny_model(tmp_path, sidecar=False, embed=True)
    with Predictor(model) as predictor:
        (pred,) = predictor.predict([write_image(tmp_path / "g.png", (10, 240, 10))])
    assert pred.tasks["coarse"].label == "c1"
    assert predictor.describe()["providers"] == ["CPUExecutionProvider"]


def test_unknown_provider_is_refused(model: Path):
    with pytest.raises(ModelError, match="not in this onnxruntime build"):
        Predictor(model, providers=["NoSuchExecutionProvider"])


def test_sessions_take_their_options_from_one_place(model: Path):
    """deploy.runtime.session_options: the device's session and the benchmark's encoder-only and
    architecture sessions share the optimization level and thread count, so ratios compare like with like."""
    import onnxruntime as ort

    from deploy.runtime import OrtBackend, session_options

    options = OrtBackend(model, threads=3).session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(None).intra_op_num_threads == ort.SessionOptions().intra_op_num_threads
    with pytest.raises(ModelError, match="threads must be >= 1"):
        session_options(0)


def test_cli_output_and_exit_codes(model: Path, tmp_path: Path, capsys):
    images = tmp_path / "images"
    write_image(images / "a.jpg", (230, 20, 20))
    write_image(images / "b.png", (20, 230, 20))
    assert predict_main([str(model), str(images), "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "coarse: c0" in out[0] and 'diagnosis: "green cup cup"' in out[1]
    assert "fine top-5: f6" in out[1]

    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    assert predict_main([str(model), str(images / "broken.jpg"), str(images / "a.jpg"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "ort" and len(doc["predictions"]) == 2
    assert "broken.jpg" in doc["predictions"][0]["error"]
    assert doc["predictions"][1]["tasks"]["coarse"]["label"] == "c0"

    assert predict_main([str(tmp_path / "nope.onnx"), str(images / "a.jpg")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert predict_main([str(model)]) == 2
    assert predict_main([str(model), "--watch", str(images)]) == 2



def test_an_empty_folder_is_an_error_not_silent_success(model: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert predict_main([str(model), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no image files in" in err and "empty" in err and "Traceback" not in err


def test_a_name_that_is_not_utf8_is_printed_escaped_under_a_strict_encoding(model: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    write_image(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"scan\xe9.jpg"))), (230, 20, 20))
    for args in ([str(folder)], [str(folder), "--json"]):
        proc = subprocess.run([sys.executable, "-m", "deploy.predict", str(model), *args], cwd=REPO,
                              capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"})
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert b"scan\\udce9.jpg" in proc.stdout and b"c0" in proc.stdout


def test_an_implausibly_large_image_is_one_clear_error(model: Path, tmp_path: Path, monkeypatch):
    import warnings

    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)  # as a 12000 x 12000 PNG meets the real limit
    big = write_image(tmp_path / "big.png", size=(80, 80))  # above the limit (Pillow warns), below twice it
    good = write_image(tmp_path / "ok.png", size=(50, 50))
    with warnings.catch_warnings(record=True) as caught, Predictor(model) as predictor:
        warnings.simplefilter("always")
        bad, ok = predictor.predict([big, good])
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "big.png" in bad.error and "implausibly large" in bad.error and ok.ok


@pytest.mark.parametrize("text, match", [("[]", "must be a JSON object"), ("null", "must be a JSON object"),
                                         ('"x"', "must be a JSON object")])
def test_a_sidecar_that_is_json_but_not_an_object_is_refused_clearly(tmp_path: Path, text: str, match: str):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ContractError, match=match) as info:
        Contract.load(path)
    assert str(path) in str(info.value) and "re-export" in str(info.value)


@pytest.mark.parametrize("key, value", [("tasks", None), ("tasks", [1]), ("preprocessing", []),
                                        ("vocabulary", [1]), ("hashes", [1]), ("output_names", 3)])
def test_a_contract_with_a_wrongly_typed_part_is_refused_clearly(tmp_path: Path, key: str, value):
    data = tiny_contract().to_dict()
    data[key] = value
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=str(path)):
        Contract.load(path)


BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "timm", "onnx", "train", "compress", "benchmarks"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: deploy/ must not need it")
sys.meta_path.insert(0, Block())
import deploy.build_engine, deploy.watch, deploy.trt_runtime
from deploy.predict import main
code = main(sys.argv[1:])
assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
raise SystemExit(code)
"""


def test_deploy_runs_without_torch_or_training_code(model: Path, tmp_path: Path):
    image = write_image(tmp_path / "r.jpg", (230, 20, 20))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(model), str(image)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "coarse: c0" in proc.stdout and '"red disc"' in proc.stdout

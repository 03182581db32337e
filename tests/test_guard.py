"""The INT8 accuracy guard's rules, with the quantizer and the evaluation replaced by fakes whose
accuracy depends on what was tried: units of the drops, and each fallback run through Guard.run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compress.guard as guard_mod
from compress.guard import Guard, GuardFailed, metric_drops, metric_limits, within
from compress.quantize import markdown
from compress.settings import CompressConfig, GuardConfig
from deploy.contract import TaskSpec
from train.metrics import primary_metric

TASKS = [TaskSpec("coarse", "classification", ("a", "b", "c")),
         TaskSpec("fine", "classification", tuple("abcdefg")), TaskSpec("diagnosis", "text")]


def _metric(task: TaskSpec) -> str:
    """The metric the guard watches for `task` (its choice belongs to train.metrics.primary_metric)."""
    return primary_metric(task).split("/", 1)[1]


def _metrics(coarse: float = 0.80, fine: float = 0.90, bleu: float = 30.0) -> dict:
    """Evaluation results: coarse's primary metric, fine's top-5 (7 classes: guarded too), BLEU."""
    coarse_task, fine_task, _ = TASKS
    return {"coarse": {_metric(coarse_task): coarse}, "fine": {_metric(fine_task): 0.5, "top5": fine},
            "diagnosis": {"bleu": bleu}}


FP32 = _metrics()


@pytest.mark.parametrize("coarse, fine, bleu, ok", [
    (0.795, 0.90, 30.0, True), (0.785, 0.90, 30.0, False),  # T1's metric: 0.5 / 1.5 points
    (0.80, 0.895, 30.0, True), (0.80, 0.885, 30.0, False),  # top-5: 0.5 / 1.5 points
    (0.80, 0.90, 29.5, True), (0.80, 0.90, 28.5, False),  # BLEU is already in points
])
def test_drops_are_in_points_and_the_limit_is_one_point(coarse, fine, bleu, ok):
    drops = metric_drops(FP32, _metrics(coarse, fine, bleu), TASKS)
    assert max(drops.values()) == pytest.approx(0.5 if ok else 1.5)
    assert set(drops) == {primary_metric(TASKS[0]), primary_metric(TASKS[1]), "fine/top5", "diagnosis/bleu"}
    assert within(drops, metric_limits(GuardConfig(), TASKS)) is ok


@pytest.mark.parametrize("drop, interval, ok", [
    (0.9, None, True),  # within the 1-point limit: no interval needed
    (2.0, [-0.5, 4.0], True),  # over the limit, but the paired interval includes 0 and 2 <= the 3-point cap
    (2.0, [0.4, 4.0], False),  # over the limit and beyond noise
    (3.5, [-0.5, 7.0], False),  # within noise but over the cap: a tiny validation split cannot pass anything
    (2.0, None, False),  # no interval measured: the limit alone
])
def test_a_drop_over_its_limit_passes_only_within_noise_and_under_the_cap(drop, interval, ok):
    key = primary_metric(TASKS[0])
    limits = metric_limits(GuardConfig(), TASKS)
    assert limits == {key: 1.0, primary_metric(TASKS[1]): 1.0, "fine/top5": 1.0, "diagnosis/bleu": 1.0}
    intervals = {key: interval} if interval else {}
    assert within({key: drop}, limits, intervals, GuardConfig().noise_cap_points) is ok
    assert within({key: drop}, limits, intervals, 0.0) is (drop <= 1.0)  # cap 0: the limits alone


def _val_split(counts: list[int]) -> SimpleNamespace:
    """A validation split (two images per patient) with the attributes the guard's bootstrap reads."""
    labels = np.repeat(np.arange(len(counts)), counts)
    rows = [SimpleNamespace(patient_id=f"P{i // 2}") for i in range(len(labels))]
    return SimpleNamespace(rows=rows, targets={"coarse": labels},
                           dataset=SimpleNamespace(vocabulary=None, spec=SimpleNamespace(joint=[])))


@pytest.mark.parametrize("flipped, passes", [(2, True), (8, False)])
def test_the_guard_reports_whether_a_drop_is_within_noise(monkeypatch, tmp_path, flipped, passes):
    """FP32 right on all 198 images. INT8 wrong on 2 images of the 40-image class (1.67 points of balanced
    accuracy; two patients: within noise) passes at the first attempt; wrong on 8 images of the 100-image
    class (2.67 points, eight patients: beyond noise) fails, although both are under the 3-point cap."""
    from train.metrics import evaluate as score

    task = TaskSpec("coarse", "classification", ("a", "b", "c"))
    val = _val_split([100, 58, 40])
    labels = val.targets["coarse"]
    fp32 = {"coarse": np.eye(3)[labels]}
    wrong = np.flatnonzero(labels == (2 if passes else 0))[::2][:flipped]  # one image per patient
    int8 = {"coarse": np.eye(3)[np.where(np.isin(np.arange(len(labels)), wrong), (labels + 1) % 3, labels)]}
    monkeypatch.setattr(guard_mod, "calibrate", lambda *a, **k: {})
    monkeypatch.setitem(guard_mod.QUANTIZERS, "int8-cpu", lambda fp32, out, *a, **k: Path(out).write_text("q"))
    monkeypatch.setattr(guard_mod, "evaluate_onnx", lambda *a: (int8, score(int8, val.targets, [task], None)))
    monkeypatch.setattr(guard_mod, "agreement", lambda *args: {})
    ccfg = CompressConfig(calibration_images=4, guard=GuardConfig(fallbacks=[]))
    guard = Guard(tmp_path / "m.onnx", "int8-cpu", val, [task], lambda n: np.zeros((n, 3, 4, 4), np.float32),
                  ccfg, [], {}, (fp32, score(fp32, val.targets, [task], None)), resamples=500)
    key = primary_metric(task)
    if passes:
        kept = guard.run(tmp_path / "m.int8-cpu.onnx", 10)
        assert kept.drops[key] == pytest.approx(2 * 100 / 120, abs=1e-3) and kept.intervals[key][0] <= 0
        entry = {"status": "passed", "kept": kept.to_dict(), "limits": guard.limits, "attempts": []}
        assert "1.67 worse (limit 1.00; 95 % CI 0.00 to" in markdown({"m": {"flavours": {"int8-cpu": entry}}})
        assert "within noise" in markdown({"m": {"flavours": {"int8-cpu": entry}}})
    else:
        with pytest.raises(GuardFailed, match="beyond noise"):
            guard.run(tmp_path / "m.int8-cpu.onnx", 10)
        assert guard.attempts[0].drops[key] == pytest.approx(8 * 100 / 300, abs=1e-3)
        assert guard.attempts[0].intervals[key][0] > 0


@pytest.fixture()
def fakes(monkeypatch, tmp_path):
    """Fake calibration/quantization/evaluation: `world["accuracy"](method, images, float_layers)`
    gives the quantized model's coarse accuracy; `world["crash"]` the methods whose calibration fails."""
    world = {"accuracy": lambda method, n, layers: 0.80, "crash": set(), "calibrated": []}

    def calibrate(path, images, method, percentile, batch_size):
        world["calibrated"].append((method, len(images)))
        if method in world["crash"]:
            raise ValueError("setting an array element with a sequence (inhomogeneous shape)")
        return {"method": method, "images": len(images)}

    def quantize(fp32, out, ranges, nodes_to_exclude, exclude_patterns):
        Path(out).write_text(json.dumps({**ranges, "float_layers": list(nodes_to_exclude)}))

    def evaluate(path, val, tasks, threads):
        q = json.loads(Path(path).read_text())
        return {}, _metrics(coarse=world["accuracy"](q["method"], q["images"], q["float_layers"]))

    def prepare(src, dst):  # a graph with three weighted layers, as the quantizer would see it
        nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"layer_{i}") for i in range(3)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                                  [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1, 2])])
        onnx.save(helper.make_model(graph), str(dst))
        return Path(dst)

    def sensitivity(fp32, ranges, flavour, score, candidates, max_candidates, exclude_patterns):
        world["sensitivity_candidates"] = list(candidates)
        return [("layer_2", 3.0), ("layer_0", 2.0), ("layer_1", 1.0)]  # most sensitive first

    monkeypatch.setattr(guard_mod, "calibrate", calibrate)
    monkeypatch.setitem(guard_mod.QUANTIZERS, "int8-cpu", quantize)
    monkeypatch.setattr(guard_mod, "evaluate_onnx", evaluate)
    monkeypatch.setattr(guard_mod, "agreement", lambda *args: {})
    monkeypatch.setattr(guard_mod, "prepare_for_quantization", prepare)
    monkeypatch.setattr(guard_mod, "layer_sensitivity", sensitivity)
    fp32 = tmp_path / "student.onnx"
    fp32.write_bytes(b"fp32")
    val = SimpleNamespace(dataset=SimpleNamespace(vocabulary=None))

    def run(fallbacks, method="minmax", images=4, available=10):
        ccfg = CompressConfig(calibration_images=images, calibration_method=method,
                              guard=GuardConfig(fallbacks=fallbacks))
        guard = Guard(fp32, "int8-cpu", val, TASKS, lambda n: np.zeros((n, 3, 4, 4), np.float32), ccfg, [], {},
                      ({}, FP32))
        out = tmp_path / "student.int8-cpu.onnx"
        out.unlink(missing_ok=True)
        try:
            kept = guard.run(out, available)
        finally:
            world["attempts"] = guard.attempts
        return kept, json.loads(out.read_text())

    world["run"] = run
    return world


def test_method_fallback_keeps_the_first_other_method_that_passes(fakes):
    fakes["accuracy"] = lambda method, n, layers: 0.80 if method == "percentile" else 0.70
    kept, written = fakes["run"](["method"])
    assert (kept.step, kept.method) == ("fallback: method", "percentile") and written["method"] == "percentile"
    assert [a.method for a in fakes["attempts"]] == ["minmax", "entropy", "percentile"]


def test_more_images_fallback_doubles_the_calibration_set(fakes):
    fakes["accuracy"] = lambda method, n, layers: 0.80 if n >= 8 else 0.70
    kept, written = fakes["run"](["more_images"], images=4, available=10)
    assert (kept.step, kept.images, written["images"]) == ("fallback: more images", 8, 8)


def test_sensitive_layers_fallback_keeps_layers_in_float_one_more_at_a_time(fakes):
    fakes["accuracy"] = lambda method, n, layers: 0.80 if {"layer_2", "layer_0"} <= set(layers) else 0.70
    kept, written = fakes["run"](["sensitive_layers"])
    assert kept.float_layers == written["float_layers"] == ["layer_2", "layer_0"]
    assert [a.float_layers for a in fakes["attempts"]] == [[], ["layer_2"], ["layer_2", "layer_0"]]
    assert set(fakes["sensitivity_candidates"]) == {"layer_0", "layer_1", "layer_2"}


def test_no_passing_attempt_fails_with_every_attempt(fakes, tmp_path):
    fakes["accuracy"] = lambda method, n, layers: 0.70
    with pytest.raises(GuardFailed, match="no attempt stayed within") as info:
        fakes["run"](["method", "more_images", "sensitive_layers"])
    assert len(info.value.attempts) == 1 + 2 + 1 + 3  # configured, 2 methods, more images, 3 float layers
    assert not (tmp_path / "student.int8-cpu.onnx").exists()


def test_a_crashing_calibration_method_is_reported_not_hidden_by_the_fallback(fakes):
    fakes["crash"] = {"entropy"}
    kept, _ = fakes["run"](["method"], method="entropy")
    assert kept.method == "minmax"
    crashed = fakes["attempts"][0]
    assert crashed.method == "entropy" and "inhomogeneous" in crashed.agreement["error"]
    entry = {"status": "passed", "kept": kept.to_dict(), "attempts": [a.to_dict() for a in fakes["attempts"]]}
    md = markdown({"student": {"flavours": {"int8-cpu": entry}}})
    assert "1 attempt(s) crashed" in md
    assert "configured (entropy, 4 images, 0 float layers): **crashed**: ValueError: setting an array" in md


def test_an_improvement_is_never_printed_as_a_negative_drop():
    from compress.guard import format_drops

    text = format_drops({"fine/top5": -0.505, "coarse/accuracy": 1.37, "diagnosis/bleu": 0.001}, {"coarse/accuracy": 2.0})
    assert text == "fine/top5 0.51 better, coarse/accuracy 1.37 worse (limit 2.00), diagnosis/bleu same"
    assert "-0" not in text
    noisy = format_drops({"coarse/accuracy": 1.37}, {"coarse/accuracy": 1.0}, {"coarse/accuracy": [-0.5, 3.0]})
    assert noisy == "coarse/accuracy 1.37 worse (limit 1.00; 95 % CI -0.50 to 3.00, within noise)"
    assert "beyond noise" in format_drops({"coarse/accuracy": 1.37}, None, {"coarse/accuracy": [0.5, 3.0]})


def test_the_noise_cap_is_two_images_worth_on_a_small_split():
    """One image of a 2-image class is 25 points of 2-class balanced accuracy: a within-noise drop of one
    such image passes on a tiny split (where the points cap alone would leave nothing to deploy), a
    drop of three such images does not."""
    from compress.guard import noise_caps

    key = primary_metric(TASKS[0])
    targets = {TASKS[0].name: np.array([0, 0, 1, 1, 1, 1]), TASKS[1].name: np.arange(6)}
    caps = noise_caps(GuardConfig(), TASKS, targets)
    one = 100.0 / (len(set(targets[TASKS[0].name].tolist())) * 2)
    assert caps[key] == pytest.approx(2 * one) and caps["diagnosis/bleu"] == GuardConfig().noise_cap_points
    limits = metric_limits(GuardConfig(), TASKS)
    assert within({key: one}, limits, {key: [-10.0, 60.0]}, caps)
    assert not within({key: 3 * one}, limits, {key: [-10.0, 90.0]}, caps)
    assert noise_caps(GuardConfig(noise_cap_images=0), TASKS, targets)[key] == GuardConfig().noise_cap_points

"""Tests of the benchmarks wing: headline ratios, MAC counting, floors, Pareto front, and
`python -m benchmarks.bench` end to end on the session's tiny trained run (tests/conftest.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import bench, latency
from benchmarks.accuracy import Floor, floor_violations, parse_floor, retention, unmatched_floors
from benchmarks.artifacts import PredictorRunner, discover, onnx_graph_stats
from benchmarks.encoder_only import EncoderOnly, encoder_decoder_ms
from benchmarks.report import headline, pareto_front, targets
from deploy.contract import TaskSpec
from deploy.predictor import decode_row
from deploy.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]

# --- headline ratios and device post-processing ------------------------------------------------


def test_headline_ratios_come_from_rounds_with_their_spread():
    tasks = [TaskSpec("coarse", "classification", ("a", "b"))]

    def rec(name: str, rounds: dict[int, list[float]], split: dict | None = None) -> dict:
        r = _record(name, 0.0, 0.9)
        r["latency"] = {str(b): {"per_image_ms": float(np.median(v)), "rounds_ms": v} for b, v in rounds.items()}
        return {**r, "encoder_decoder_ms": split} if split else r

    split = encoder_decoder_ms([1.5, 1.8, 1.6], [1.0, 1.0, 0.8])
    assert split["encoder_ms"] == pytest.approx(1.0) and split["decoder_ms"] == pytest.approx(0.8)  # of 0.5 .8 .8
    assert split["full_over_encoder"]["median"] == pytest.approx(1.8)  # of 1.5, 1.8, 2.0
    records = [rec("ensemble.fp32", {1: [100.0, 90.0, 120.0]}), rec("student.fp32", {1: [4.0, 3.0, 6.0], 8: [2.0]}),
               rec("student.int8-cpu", {1: [2.0, 2.0, 2.0], 8: [0.5]}, split)]
    head = headline(records, tasks)
    assert head["latency_fp32_over_int8_student"] == pytest.approx(2.0)  # median of 2.0, 1.5, 3.0
    assert head["latency_spread"]["latency_fp32_over_int8_student"]["min"] == pytest.approx(1.5)
    assert head["latency_spread"]["latency_fp32_over_int8_student"]["max"] == pytest.approx(3.0)
    assert head["latency_ensemble_over_student_int8"] == pytest.approx(50.0)  # median of 50, 45, 60
    assert head["largest_batch"] == 8 and head["latency_fp32_over_int8_student_largest_batch"] == pytest.approx(4.0)
    assert head["latency_int8_student_over_its_encoder"] == pytest.approx(1.8)
    found = {t["target"].split(" ")[0] + str(t["goal"]): t for t in targets(records, tasks)}
    assert found["decoder:2.0"]["status"] == "met" and found["INT82.5"]["status"] == "met"


def test_postprocess_times_the_device_decoder(monkeypatch):
    vocab = Vocabulary.build(["mild retinopathy", "normal fundus"], max_len=6)
    tasks = [TaskSpec("coarse", "classification", ("a", "b", "c")), TaskSpec("diagnosis", "text")]
    tokens = np.array([vocab.encode_padded("normal fundus")])
    outputs = {"coarse": np.array([[0.2, 0.5, 0.3]]), "diagnosis": tokens}  # keyed by task, as runners give
    out = decode_row({t.output_name: outputs[t.name] for t in tasks}, 0, tasks, vocab)
    assert out["coarse"].top5 == [("b", 0.5), ("c", 0.3), ("a", 0.2)]
    assert out["diagnosis"].text == "normal fundus"
    calls = []
    monkeypatch.setattr(latency, "decode_row", lambda *a: calls.append(a))  # the benchmark times that code
    assert latency.time_postprocess(outputs, tasks, vocab, runs=3) >= 0 and len(calls) == 3


# --- MACs, floors, Pareto front -------------------------------------------------------------------


def test_onnx_graph_stats_counts_conv_and_gemm(tmp_path: Path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = numpy_helper.from_array(np.ones((4, 5), np.float32), "g")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w, g])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    stats = onnx_graph_stats(path)
    # Conv: 4x8x8 outputs x 3x3x3 each; Gemm: 5 outputs x 4 inputs; at batch 1 whatever N is.
    assert stats["macs"] == 4 * 8 * 8 * 27 + 5 * 4
    assert stats["params"] == 4 * 27 + 20 and stats["uncounted"] == []


def test_floors_parse_apply_and_report():
    floor = parse_floor("student.*:coarse/accuracy=80")  # percent, as the reports print it
    assert floor == Floor("student.*", "coarse/accuracy", 80.0)
    assert floor.applies("student.int8-cpu") and not floor.applies("baseline.fp32")
    assert floor.violation({"coarse/accuracy": 0.85}) is None
    assert "75 % < 80 %" in floor.violation({"coarse/accuracy": 0.75})
    bleu = parse_floor("student.*:diagnosis/bleu=30")  # BLEU 0-100, computed 0-100
    assert bleu.violation({"diagnosis/bleu": 31.0}) is None and "29 BLEU < 30 BLEU" in bleu.violation({"diagnosis/bleu": 29.0})
    assert "not measured" in floor.violation({})
    ceiling = parse_floor("student.fp32:coarse/ece=0.1")
    assert ceiling.is_ceiling and ceiling.violation({"coarse/ece": 0.05}) is None
    assert floor_violations([floor, ceiling], "student.fp32", {"coarse/accuracy": 0.9, "coarse/ece": 0.2})
    assert unmatched_floors([floor], ["baseline.fp32"]) == [floor]
    for bad in ("student.fp32:coarse/accuracy", "coarse/accuracy=80", "a:b=x"):
        with pytest.raises(ValueError, match="ARTIFACT:METRIC=VALUE"):
            parse_floor(bad)


@pytest.mark.parametrize("text, message", [
    ("s:coarse/accuracy=0.8", "did you mean 80"),  # a fraction where percent is meant
    ("s:diagnosis/bleu=0.6", "did you mean 60"),
    ("s:coarse/accuracy=101", "percent (0 to 100)"),
    ("s:diagnosis/bleu=-1", "BLEU points"),
    ("s:coarse/ece=5", "fraction (0-1)"),
    ("s:dr_grade/mae=-0.5", "cannot be negative"),
])
def test_floors_are_range_checked_in_the_reports_units(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_floor(text)
    assert parse_floor("s:dr_grade/kappa=-20").value == -20 and parse_floor("s:coarse/ece=0.05").value == 0.05


def test_retention_skips_lower_is_better():
    assert retention({"coarse/accuracy": 0.6, "coarse/ece": 0.1}, {"coarse/accuracy": 0.8, "coarse/ece": 0.2}) \
        == {"coarse/accuracy": pytest.approx(0.75)}


def test_pareto_front():
    # (ms, accuracy): c is dominated by a (faster and more accurate); d ties a on speed but is worse.
    pts = [(1.0, 80.0), (5.0, 90.0), (2.0, 70.0), (1.0, 75.0), (10.0, 89.0)]
    assert pareto_front(pts) == [0, 1]
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other


def test_discover_names_and_skip_reasons(tmp_path: Path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "student.onnx").write_bytes(b"x")
    (tmp_path / "onnx" / "student.fp16.onnx").write_bytes(b"x")
    arts = {a.name: a for a in discover(tmp_path, {"t1": tmp_path / "t1.safetensors"}, cuda=False, ort_gpu=False,
                                        tensorrt=False)}
    assert list(arts)[:4] == ["ensemble.pytorch", "ensemble.fp32", "t1.pytorch", "t1.fp32"]
    assert arts["student.fp32"].skip is None
    assert "GPU" in arts["student.fp16"].skip and "make compress" in arts["student.int8-cpu"].skip
    assert "tensorrt not installed" in arts["student.engine"].skip
    assert "student.pytorch-fp16" not in arts


# --- end to end on tiny artifacts -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(trained_run, tmp_path_factory) -> Path:
    """This module's copy of the session's tiny trained run (teachers, student, baseline; ONNX of the
    student, baseline and ensemble), with quick benchmark settings."""
    return trained_run.copy(tmp_path_factory.mktemp("bench"),
                            bench={"warmup": 1, "min_runs": 2, "duration_s": 0.02, "batch_duration_s": 0.02,
                                   "batch_sizes": [1, 2], "memory": "off", "stage_images": 2,
                                   "threads": 1})


def _report(cfg_path: Path, out: str) -> dict:
    return json.loads((cfg_path.parent / out / "report.json").read_text())


def _table(md: str, first_header: str = "| Artifact | Format") -> dict[str, dict[str, str]]:
    lines = md[md.index(first_header):].split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def test_bench_end_to_end_report_and_floor_met(tiny_run: Path, capsys, monkeypatch):
    out = tiny_run.parent / "out_ok"
    reopened = []  # every ONNX Runtime session, whole model and encoder-only, is renewed each round
    for cls in (PredictorRunner, EncoderOnly):
        monkeypatch.setattr(cls, "reopen", lambda self, real=cls.reopen: reopened.append(self) or real(self))
    code = bench.main(["--config", str(tiny_run), "--out", str(out), "--only", "ensemble.*", "--only", "student.*",
                       "--memory", "deploy", "--min-metric", "student.fp32:coarse/accuracy=0.0",
                       "--min-metric", "student.*:coarse/ece=1.0"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    records = {r["name"]: r for r in report["artifacts"]}
    for name in ("ensemble.pytorch", "ensemble.fp32", "student.pytorch", "student.fp32"):
        assert records[name]["status"] == "passed", records[name]
        assert set(records[name]["latency"]) == {"1", "2"}
        assert records[name]["latency"]["1"]["runs"] >= 2
    assert records["student.fp16"]["status"] == "skipped"
    assert report["reference"] == "ensemble.pytorch"
    # ONNX reproduces PyTorch: identical accuracy, full agreement of the ONNX ensemble with the reference.
    assert records["student.fp32"]["metrics"]["coarse/accuracy"] == records["student.pytorch"]["metrics"]["coarse/accuracy"]
    assert records["ensemble.fp32"]["agreement"]["coarse/top1_agreement"] == 1.0
    assert records["student.fp32"]["memory"]["model_mb"] > 0 and "memory" not in records["student.pytorch"]
    assert records["student.fp32"]["macs"] > 0 and records["student.pytorch"]["macs"] == records["student.fp32"]["macs"]
    assert {t["status"] for t in report["targets"]} <= {"met", "missed", "n/a"}
    assert (out / "accuracy_vs_latency.png").is_file() and "accuracy_vs_latency.png" in report["plots"]
    onnx_runs = [r for r in records.values() if r["status"] == "passed" and r["format"] == "onnx"]
    with_encoder = [r for r in onnx_runs if r.get("encoder_decoder_ms")]
    rounds = report["settings"]["rounds"]
    assert onnx_runs and with_encoder and rounds > 1
    assert len(reopened) == (rounds - 1) * (2 * len(onnx_runs) + len(with_encoder))  # b1 and b2; encoders at b1

    # The Markdown table shows the JSON's numbers.
    md = (out / "report.md").read_text()
    assert md in capsys.readouterr().out
    table = _table(md)
    for name, rec in records.items():
        row = table[name]
        assert row["Status"] == rec["status"]
        if rec["status"] != "passed":
            assert row["ms/im (b1)"] == "—"
            continue
        assert float(row["ms/im (b1)"]) == pytest.approx(rec["latency"]["1"]["per_image_ms"], abs=0.006)
        assert float(row["img/s (b2)"]) == pytest.approx(rec["latency"]["2"]["images_per_s"], abs=0.06)
        assert float(row["coarse acc"]) == pytest.approx(100 * rec["metrics"]["coarse/accuracy"], abs=0.06)
        assert float(row["fine top-5"]) == pytest.approx(100 * rec["metrics"]["fine/top5"], abs=0.06)
        assert float(row["diagnosis BLEU"]) == pytest.approx(rec["metrics"]["diagnosis/bleu"], abs=0.06)
        assert float(row["Size (MB)"]) == pytest.approx(rec["size_mb"], abs=0.06)
    details = _table(md, "| Artifact | Params")
    assert float(details["student.fp32"]["GMACs"]) == pytest.approx(records["student.fp32"]["macs"] / 1e9, abs=6e-4)
    # Each measured accuracy comes with its 95 % patient-bootstrap interval, in the report's units.
    for name in ("ensemble.fp32", "student.fp32"):
        ci95, metrics = records[name]["ci95"], records[name]["metrics"]
        assert {"coarse/accuracy", "fine/top5", "diagnosis/bleu"} <= set(ci95)
        for key, (lo, hi) in ci95.items():  # a mean lies inside its percentile interval (BLEU need not)
            assert key.endswith("/bleu") or lo - 0.006 <= 100 * metrics[key] <= hi + 0.006, (name, key)  # 2 decimals
    # The same patients, resamples and outputs as summary.md: the same intervals for the same model.
    from train.experiment import load_experiment

    summary = json.loads(load_experiment(tiny_run).layout.summary("json").read_text())
    for key, ci in summary["ci95"]["student"].items():
        assert records["student.pytorch"]["ci95"][key] == pytest.approx(ci, abs=0.011), key
    intervals = _table(md, "| Artifact | coarse acc")
    lo, hi = records["student.fp32"]["ci95"]["coarse/accuracy"]
    assert intervals["student.fp32"]["coarse acc"].endswith(f"({lo:.1f}–{hi:.1f})")


def test_floors_fail_the_command(tiny_run: Path):
    code = bench.main(["--config", str(tiny_run), "--out", str(tiny_run.parent / "out_floor"), "--only",
                       "student.fp32", "--min-metric", "student.fp32:coarse/ece=0"])
    assert code == 1
    record = _report(tiny_run, "out_floor")["artifacts"][0]
    assert record["status"] == "below floor" and "coarse/ece" in record["reason"]  # a ceiling of 0 always fails
    # A floor that names no measured artifact cannot pass silently.
    code = bench.main(["--config", str(tiny_run), "--out", str(tiny_run.parent / "out_typo"), "--only",
                       "student.fp32", "--min-metric", "studnet.fp32:coarse/accuracy=0.0"])
    assert code == 1 and _report(tiny_run, "out_typo")["unmatched_floors"] == ["studnet.fp32:coarse/accuracy=0"]
    assert bench.main(["--config", str(tiny_run), "--min-metric", "nonsense"]) == 2
    assert bench.main(["--config", str(tiny_run), "--min-metric", "student.*:coarse/accuracy=0.9"]) == 2  # percent
    # Nothing measured (all filtered out or missing) is not a success either.
    assert bench.main(["--config", str(tiny_run), "--out", str(tiny_run.parent / "out_none"),
                       "--only", "no-such-artifact"]) == 1


def test_corrupt_artifact_fails_alone(tiny_run: Path):
    run_dir = tiny_run.parent / "runs" / "tiny" / "onnx"
    (run_dir / "baseline.int8-cpu.onnx").write_bytes(b"\x08\x07 this is not a protobuf")
    (run_dir / "baseline.int8-cpu.json").write_text((run_dir / "baseline.json").read_text())
    try:
        code = bench.main(["--config", str(tiny_run), "--out", str(tiny_run.parent / "out_bad"),
                           "--only", "baseline.*", "--memory", "off"])
    finally:
        (run_dir / "baseline.int8-cpu.onnx").unlink()
    assert code == 1
    records = {r["name"]: r for r in _report(tiny_run, "out_bad")["artifacts"]}
    assert records["baseline.int8-cpu"]["status"] == "failed"
    assert re.search(r"baseline\.int8-cpu\.onnx.*not a loadable ONNX model", records["baseline.int8-cpu"]["reason"])
    assert records["baseline.pytorch"]["status"] == records["baseline.fp32"]["status"] == "passed"
    assert records["baseline.fp32"]["agreement"]  # the reference was evaluated although --only left it out


def _record(name: str, ms: float, acc: float, top5: float = 0.9, status: str = "passed") -> dict:
    model, flavour = name.split(".", 1)
    return {"name": name, "model": model, "precision": "int8-cpu" if "int8" in flavour else "fp32",
            "status": status, "metrics": {"coarse/balanced_accuracy": acc, "fine/balanced_accuracy": top5},
            "latency": {"1": {"per_image_ms": ms}}}


def test_headline_and_targets_compare_like_with_like():
    tasks = [TaskSpec("coarse", "classification", ("a", "b")), TaskSpec("fine", "classification", ("x", "y"))]
    records = [_record("ensemble.pytorch", 400.0, 0.90), _record("student.pytorch", 10.0, 0.80),
               _record("student.fp32", 4.0, 0.88), _record("student.int8-cpu", 1.6, 0.875, top5=0.88)]
    head = headline(records, tasks)
    # No ONNX ensemble: the pair is PyTorch vs PyTorch, never PyTorch ensemble vs ONNX student.
    assert head["compared"] == {"ensemble": "ensemble.pytorch", "student": "student.pytorch",
                                "student_int8": "student.int8-cpu"}
    assert head["latency_ensemble_over_student"] == pytest.approx(40.0)
    assert head["latency_ensemble_over_student_int8"] is None  # needs ensemble.fp32 (same runtime)
    assert head["latency_fp32_over_int8_student"] == pytest.approx(2.5)
    # Ratios of each task's primary metric (balanced accuracy here), the metric checkpoints are chosen by.
    assert head["accuracy_student_over_ensemble"]["coarse/balanced_accuracy"] == pytest.approx(0.8 / 0.9)
    found = {t["target"].split(" ")[0] + str(t["goal"]): t for t in targets(records, tasks)}
    assert found["INT82.0"]["status"] == "met" and found["INT82.0"]["margin"] == pytest.approx(0.5)
    assert found["student50.0"]["status"] == "n/a"
    assert found["every1.0"]["status"] == "missed"  # fine dropped 2 points
    assert found["every1.0"]["value"] == pytest.approx(2.0) and "fine/balanced_accuracy" in found["every1.0"]["detail"]
    assert found["KD3.0"]["status"] == "missed" and found["KD3.0"]["value"] == pytest.approx(10.0)
    records.append(_record("ensemble.fp32", 300.0, 0.90))
    head = headline(records, tasks)
    assert head["compared"]["student"] == "student.fp32"
    assert head["latency_ensemble_over_student_int8"] == pytest.approx(187.5)


# --- the architecture benchmark (random weights) ---------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False (TorchScript exporter) is "legacy"
def test_architecture_benchmark_builds_the_papers_models_without_weights(tmp_path, monkeypatch):
    """configs/paper.yaml as written (7 ResNet-50 teachers, the Lite0 student with its GRU decoder), at a
    tiny input size: built from random weights (no weight file is opened), exported, the student
    quantized, all timed in one interleaved run; the report says it is latency only."""
    from tiny import make_tiny_dataset

    from benchmarks import architectures
    from train.models import pretrained

    def no_weights(*args, **kwargs):
        raise AssertionError("the architecture benchmark must not load weights")

    monkeypatch.setattr(pretrained, "load_lite_weights", no_weights)
    renewed = []  # each model gets a fresh session at every round after the first
    monkeypatch.setattr(architectures, "_renew", lambda sessions, name, open_session, real=architectures._renew:
                        renewed.append(name) or real(sessions, name, open_session))
    data = make_tiny_dataset(tmp_path / "data", patients=12, unlabeled_patients=0)
    out = tmp_path / "arch"
    code = architectures.main(["--config", str(REPO / "configs" / "paper.yaml"), f"data.root={data}",
                               "image_size=32", "--threads", "1", "--rounds", "2", "--duration", "0.02",
                               "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    models = report["summary"]["models"]
    teachers = {n: m for n, m in models.items() if m["role"] == "teacher"}
    assert len(teachers) == 7 and {m["backbone"] for m in teachers.values()} == {"resnet50"}
    assert models["student"]["backbone"] == models["student.int8-cpu"]["backbone"] == "efficientnet_lite0"
    assert {m["image_size"] for m in models.values()} == {32}
    for key in ("ensemble_over_student_int8", "ensemble_over_student_fp32", "student_fp32_over_int8"):
        assert report["summary"][key]["rounds"] == 2 and report["summary"][key]["median"] > 0
    assert report["summary"]["ensemble_ms"] == pytest.approx(
        np.median([sum(teachers[n]["rounds_ms"][r] for n in teachers) for r in range(2)]))
    assert "random weights" in report["label"] and "**Random weights.**" in (out / "report.md").read_text()
    assert sorted(renewed) == sorted(models)  # 2 rounds: one renewal of each of the 9 models

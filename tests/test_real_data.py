"""A user's own dataset, end to end: raw release folders (IDRiD, ODIR-5K, APTOS look-alikes) -> our
adapters -> `make all DATA=...` (or the same stage entry points) -> bench report -> torch-free prediction.
Plus overrides that make used to mangle, the metrics, imbalance and sampling rules real data needs, and
the adapters' options for graded CSVs. Config/dataset mismatches and stale models: tests/test_preflight.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import write_aptos, write_idrid, write_odir
from test_deploy import BLOCKER
from tiny import tiny_model, write_yaml

from deploy.errors import cli
from train import experiment
from train.data.adapt import main as adapt_main
from train.data.manifest import load_dataset
from train.experiment import load_experiment
from train.stage import load_splits

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(path: Path, runs: Path, **extra) -> Path:
    """A partial config (OVERRIDES_FILE) that shrinks configs/real.yaml to seconds on tiny images."""
    train = {"epochs": 3, "min_steps": 0, "batch_size": 16, "eval_batch_size": 32, "augment": {"enabled": False},
             "optim": {"lr": 0.01}}
    data = {"runs_root": str(runs), "device": "cpu", "image_size": 32, "allow_random_init": True,
            "teachers": {"model": tiny_model(), "train": train},
            "student": {"model": tiny_model(), "train": train},
            "compress": {"calibration_images": 16},
            "bench": {"duration_s": 0.02, "batch_duration_s": 0.02, "warmup": 1, "min_runs": 2, "rounds": 2,
                      "memory": "off"}}
    return write_yaml(path, data, extra)


def _predict_without_torch(model: Path, images: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCKER, str(model), *map(str, images), "--json"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_make_all_on_an_aptos_download(tmp_path):
    """The documented command on an APTOS-style grading CSV: one ordinal task, no text, no unlabelled pool."""
    data = tmp_path / "aptos"
    raw = write_aptos(tmp_path / "raw")
    assert adapt_main(["csv", "--src", str(raw), "--images", str(raw.parent / "train_images"), "--path-column",
                       "id_code", "--label-columns", "diagnosis", "--ordinal-columns", "diagnosis",
                       "--out", str(data)]) == 0
    over = tiny_overrides(tmp_path / "over.yaml", tmp_path / "runs")
    stamp = tmp_path / "stamp"
    stamp.touch()  # the venv is the one running this test: no reinstall
    proc = subprocess.run(["make", "-C", str(REPO), "all", f"DATA={data}", f"OVERRIDES_FILE={over}",
                           f"PYTHON={sys.executable}", f"STAMP={stamp}"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "aptos"  # the run folder follows the dataset
    summary = json.loads((run / "summary.json").read_text())
    assert {"diagnosis/kappa", "diagnosis/mae", "diagnosis/balanced_accuracy"} <= set(summary["rows"]["student"])
    assert "diagnosis/top5" not in summary["rows"]["student"] and "diagnosis/bleu" not in summary["rows"]["student"]
    # One accuracy per model: the bench scores the whole test split, like the summary.
    report = json.loads((run / "bench" / "report.json").read_text())
    final = json.loads((run / "student" / "final.json").read_text())
    assert report["settings"]["images"] == summary["test_images"] == final["metrics"]["diagnosis"]["n"]
    for name in ("student.pytorch", "student.fp32"):
        record = next(r for r in report["artifacts"] if r["name"] == name)
        for key, value in final["headline"].items():
            assert record["metrics"][key] == pytest.approx(value, abs=1e-6), (name, key)
    assert (run / "onnx" / "baseline.int8-cpu.onnx").is_file() and (run / "onnx" / "teacher_diagnosis.onnx").is_file()
    images = [load_dataset(data).image_path(r) for r in load_dataset(data).split("test")[:3]]
    pred = _predict_without_torch(run / "onnx" / "student.int8-cpu.onnx", images, tmp_path)
    assert pred.returncode == 0, pred.stderr
    assert list(json.loads(pred.stdout)["predictions"][0]["tasks"]) == ["diagnosis"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["idrid", "odir"])
def test_pipeline_on_idrid_and_odir_downloads(tmp_path, source):
    """The stage entry points `make all` calls, in-process: IDRiD (ordinal grade, 3-class oedema risk, the
    joint score, a text task) and ODIR-5K (category, keyword finding, diagnosis)."""
    from benchmarks.bench import main as bench_main
    from compress.export import main as export_main
    from compress.quantize import main as quantize_main
    from train.student import main as student_main
    from train.teachers import main as teachers_main

    data = tmp_path / source
    if source == "odir":
        argv = ["odir", "--src", str(write_odir(tmp_path / "raw")), "--min-fine-count", "2"]
    else:
        argv = ["idrid", "--src", str(write_idrid(tmp_path / "raw"))]
    assert adapt_main([*argv, "--out", str(data)]) == 0
    # Every stage runs; exports, INT8 and latency are limited to the student and the ensemble (the seven
    # teachers' ONNX files would add a minute and test nothing the APTOS run does not).
    over = tiny_overrides(tmp_path / "over.yaml", tmp_path / "runs", **{
        "compress.models": ["student", "ensemble"], "compress.quantize": ["student"],
        "bench.only": ["student.*", "ensemble.*"]})
    args = ["--config", "configs/real.yaml", f"data.root={data}", f"name={source}", "--overrides-file", str(over)]
    os.chdir(REPO)
    for main in (teachers_main, student_main, export_main, quantize_main, bench_main):
        assert cli(main, args) == 0, main.__module__
    run = tmp_path / "runs" / source
    student = json.loads((run / "summary.json").read_text())["rows"]["student"]
    tasks = load_dataset(data).spec.tasks
    if source == "idrid":
        assert {"dr_grade/kappa", "dr_grade/mae", "edema_risk/kappa", "dr_grade+edema_risk/joint_accuracy"} <= set(student)
        assert not any(k.endswith("/top5") for k in student)  # 5 and 3 classes: top-5 cannot fail
        assert (run / "confusion_student_edema_risk.png").is_file()
    else:
        assert [t.name for t in tasks] == ["category", "finding", "diagnosis"]
    assert (run / "bench" / "report.md").is_file()
    test_image = load_dataset(data).image_path(load_dataset(data).split("test")[0])
    pred = _predict_without_torch(run / "onnx" / "student.int8-cpu.onnx", [test_image], tmp_path)
    assert pred.returncode == 0, pred.stderr
    assert set(json.loads(pred.stdout)["predictions"][0]["tasks"]) == {t.name for t in tasks}


# --- make passes overrides intact ------------------------------------------------------------------------
def test_make_passes_overrides_with_spaces_commas_and_braces(tmp_path):
    over = tmp_path / "o.yaml"
    over.write_text("student:\n  kd:\n    alpha: 0.25\n")
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "--no-print-directory", "-n", "student", "DATA=data/mine",
         "OVERRIDES=student.kd.temperatures={a: 1, b: 2} name='my run'", f"OVERRIDES_FILE={over}"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    # Run the recipe's command line through bash (as make would) with python replaced by an echo of argv.
    probe = "import sys, json; print(json.dumps(sys.argv[1:]))"
    env = {**os.environ, "OVERRIDES": "student.kd.temperatures={a: 1, b: 2} name='my run'",
           "OVERRIDES_FILE": str(over)}
    shown = subprocess.run(["bash", "-c", command.replace("-m train.student", f"-c '{probe}'", 1)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    argv = json.loads(shown.stdout)
    parsed = experiment.config_overrides(_stage_parser().parse_args(argv))
    assert parsed[:2] == ["data.root=data/mine", "name=mine"]
    assert parsed[2:] == ["student.kd.alpha=0.25", "student.kd.temperatures={a: 1, b: 2}", "name=my run"]
    cfg = load_experiment("configs/real.yaml", parsed)
    assert cfg.student.kd.temperatures == {"a": 1.0, "b": 2.0} and cfg.name == "my run"
    assert cfg.student.kd.alpha == 0.25 and cfg.data.root == "data/mine"


def _stage_parser():
    import argparse

    parser = argparse.ArgumentParser()
    experiment.add_config_args(parser)
    return parser


def test_make_commands_follow_the_dataset_run_folder(tmp_path):
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "--no-print-directory", "-n", "engine",
                           "DATA=/data/idrid/", "OVERRIDES=runs_root=/elsewhere"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "/elsewhere/idrid/onnx/student.int8-tensorrt.onnx" in proc.stdout


def test_class_balance_weights_favour_rare_classes_and_keep_the_loss_scale():
    import numpy as np
    import torch

    from train.losses import class_balance_weights

    labels = np.array([0] * 90 + [1] * 9 + [2] * 1 + [-1] * 5)
    w = class_balance_weights(labels, 4, "sqrt_inverse")
    counts = np.array([90, 9, 1, 0])
    assert w[3] == 0 and w[2] > w[1] > w[0]
    assert float((w.numpy()[:3] * counts[:3]).sum() / counts.sum()) == pytest.approx(1.0)  # mean weight 1
    assert float(w[2] / w[0]) == pytest.approx(np.sqrt(90))
    inv = class_balance_weights(labels, 4, "inverse")
    assert float(inv[2] / inv[0]) == pytest.approx(90.0)
    assert class_balance_weights(labels, 4, "none") is None
    from deploy.contract import TaskSpec
    from train.losses import MultiTaskLoss

    task = TaskSpec("g", "classification", ("a", "b", "c", "d"))
    logits, target = torch.zeros(3, 4), torch.tensor([0, 2, -1])
    plain, _ = MultiTaskLoss([task])({"g": logits}, {"g": target}, None, torch.ones(3, dtype=torch.bool))
    weighted, _ = MultiTaskLoss([task], class_weights={"g": w})({"g": logits}, {"g": target}, None,
                                                                torch.ones(3, dtype=torch.bool))
    assert float(weighted) == pytest.approx(float(plain) * float(w[0] + w[2]) / 2)


def test_a_tie_keeps_the_later_checkpoint(tmp_path):
    import numpy as np
    import torch

    from deploy.contract import TaskSpec
    from train.checkpoint import load_checkpoint
    from train.distributed import DistInfo
    from train.experiment import AugmentConfig, ModelConfig, TrainConfig
    from train.loop import EpochPlan, Trainer
    from train.models.multitask import MultiTaskNet

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.ones(3, 32, 32), "index": torch.tensor(i), "labelled": torch.tensor(True)}

    model = MultiTaskNet(ModelConfig(**tiny_model()), [TaskSpec("g", "classification", ("a", "b"))], None, 1)
    cfg = TrainConfig(epochs=3, batch_size=4, max_evals=3, augment=AugmentConfig(enabled=False))
    trainer = Trainer(name="t", model=model, train_set=Images(), plan=lambda e: EpochPlan(np.arange(4), "labels"),
                      step=lambda m, b, mode: (m(b["image"])["g"].pow(2).mean(), {}),
                      evaluate=lambda m: (0.5, {}),  # every evaluation scores the same
                      cfg=cfg, out_dir=tmp_path, seed=0, device=torch.device("cpu"), info=DistInfo(),
                      meta={"config": {}})
    assert load_checkpoint(trainer.fit())[1]["epoch"] == 3  # not the first of three equal scores


def test_the_bench_samples_the_split_at_random_not_its_first_rows():
    from benchmarks.accuracy import sample_rows

    rows = list(range(100))
    assert sample_rows(rows, None, 0) == rows and sample_rows(rows, 500, 0) == rows
    picked = sample_rows(rows, 20, seed=3)
    assert len(picked) == 20 and picked == sorted(picked) and picked != rows[:20] and max(picked) > 50
    assert picked == sample_rows(rows, 20, seed=3) and picked != sample_rows(rows, 20, seed=4)


def test_csv_adapter_groups_eyepacs_eyes_by_patient_pattern(tmp_path):
    import numpy as np
    from raw_fixtures import fundus_like

    rng = np.random.default_rng(0)
    lines = ["image,level"]
    for pid in range(12):
        for eye in ("left", "right"):
            fundus_like(tmp_path / "train" / f"{pid}_{eye}.jpeg", pid % 3, 0, rng, size=24)
            lines.append(f"{pid}_{eye},{pid % 3}")
    (tmp_path / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eyepacs"
    assert adapt_main(["csv", "--src", str(tmp_path / "trainLabels.csv"), "--images", str(tmp_path / "train"),
                       "--path-column", "image", "--label-columns", "level", "--ordinal-columns", "level",
                       "--patient-pattern", r"^(\d+)_", "--out", str(out)]) == 0
    rows = load_dataset(out).rows
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert len(by_patient) == 12 and all(len(s) == 1 for s in by_patient.values())
    assert {r.eye for r in rows} == {"left", "right"}
    assert load_dataset(out).spec.task("level").ordinal


def test_csv_adapter_joint_columns_and_numeric_grades(tmp_path):
    from train.data.manifest import DatasetError

    raw = write_aptos(tmp_path / "raw", images=30)
    text = raw.read_text().splitlines()
    (tmp_path / "two.csv").write_text("\n".join([text[0] + ",risk"] + [f"{r},{i % 3}" for i, r in enumerate(text[1:])]))
    args = ["csv", "--src", str(tmp_path / "two.csv"), "--images", str(raw.parent / "train_images"),
            "--path-column", "id_code", "--label-columns", "diagnosis,risk"]
    assert adapt_main([*args, "--joint", "diagnosis,risk", "--out", str(tmp_path / "j")]) == 0
    assert load_dataset(tmp_path / "j").spec.joint == [("diagnosis", "risk")]
    named = tmp_path / "named.csv"
    named.write_text("\n".join([text[0]] + [f"{r.split(',')[0]},{'abc'[i % 3]}" for i, r in enumerate(text[1:])]))
    with pytest.raises(DatasetError, match="non-numeric"):
        adapt_main(["csv", "--src", str(named), "--images", str(raw.parent / "train_images"), "--path-column",
                    "id_code", "--label-columns", "diagnosis", "--ordinal-columns", "diagnosis",
                    "--out", str(tmp_path / "n")])


def test_summary_columns_and_per_class_recall(tmp_path):
    from deploy.contract import TaskSpec
    from train.stage import class_weights
    from train.summary import per_class_section, summary_columns

    five = TaskSpec("g", "classification", tuple("abcde"), ordinal=True)
    seven = TaskSpec("f", "classification", tuple("abcdefg"))
    keys = [k for k, _ in summary_columns([five, seven], [("g", "f")])]
    assert "g/top5" not in keys and "f/top5" in keys and "g/kappa" in keys and "f/balanced_accuracy" in keys
    assert keys[-1] == "g+f/joint_accuracy"
    cm = [[1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0] * 5, [0, 0, 0, 0, 1], [0] * 5]  # rows = true class
    metrics = {"g": {"n": 4, "per_class_recall": {"a": 0.5, "b": 1.0, "c": None, "d": 0.0, "e": None},
                     "support": {"a": 2, "b": 1, "c": 0, "d": 1, "e": 0}, "confusion_matrix": cm}}
    lines = per_class_section("student", metrics, [five], tmp_path)  # sensitivity / specificity (support)
    assert "a 50% / 100% (2)" in lines[-1] and "b 100% / 67% (1)" in lines[-1] and "c — / 100% (0)" in lines[-1]
    assert (tmp_path / "confusion_student_g.png").is_file()
    stub = type("S", (), {"targets": {"g": np.array([0, 0, 0, 1, -1])}})()
    assert class_weights(stub, [five], "inverse")["g"] is not None and class_weights(stub, [five], "none")["g"] is None


def test_the_bench_scores_the_whole_split_by_default(idrid_data):
    from benchmarks.accuracy import TestImages, sample_rows
    from train.experiment import BenchConfig

    assert BenchConfig().max_test_images is None
    for config in REPO.glob("configs/*.yaml"):
        assert "max_test_images" not in config.read_text(), config
    splits = load_splits(load_experiment("configs/real.yaml", [f"data.root={idrid_data}"]))
    assert TestImages(splits).rows == list(splits.test)
    assert TestImages(splits, 3, seed=1).rows == sample_rows(list(splits.test), 3, 1)

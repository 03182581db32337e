"""Fail before training, and never use a model of another dataset: every stage's config checked against
the dataset's tasks (train/preflight.py), and checkpoints/ONNX files refused when the dataset's tasks,
class order or vocabulary changed since they were trained (train/fit_check.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.errors import cli
from train import check, experiment
from train.config import ConfigError
from train.data.manifest import load_dataset
from train.experiment import load_experiment
from train.stage import load_splits

REPO = Path(__file__).resolve().parents[1]




def test_the_default_configs_temperatures_name_tasks_this_dataset_lacks(idrid_data, capsys):
    """The crash of the real-data report, now in well under a second, before anything trains."""
    start = time.perf_counter()
    code = cli(check.main, ["--config", "configs/default.yaml", f"data.root={idrid_data}"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 1.0, elapsed
    assert "student.kd.temperatures names unknown task(s) ['coarse', 'fine']" in err
    assert "['dr_grade', 'edema_risk', 'diagnosis']" in err and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("teachers.train.select_metric=coarse/accuracy", "select_metric='coarse/accuracy' is not a metric"),
    ("student.train.select_metric=f2", "use one of"),
    ("bench.floors=['student.*:dr_grade/top5=50']", "names metric 'dr_grade/top5'"),
    ("student.image_size=8", "student.image_size=8 must be between"),
    ("data.stratify_task=diagnosis", "data.stratify_task='diagnosis' is not a classification task"),
    ("teachers.members=[{name: t, tasks: [grade]}]", "must be a non-empty subset"),
    ("student.model.pretrained=efficientnet-lite1", "backbone is 'efficientnet_lite0'"),
    ("compress.quantize=[ensemble]", "compress.quantize: unknown ['ensemble']"),
    ("bench.floors=['student.*:edema_risk/joint_accuracy=50']", "names metric 'edema_risk/joint_accuracy'"),
    ("student.model.tasks=[grade]", "student.model.tasks names unknown task(s) ['grade']"),
    ("student.model.pretrained=/nope.safetensors", "/nope.safetensors not found"),
    ("compress.models=[stduent]", "compress.models: unknown ['stduent']"),
    ("student.train.select_metric=dr_grade/mae", "is lower-is-better"),
    ("student.train.select_metric=mae", "use one of"),
    ("teachers.model.pretrained=none", "teachers.model.pretrained: none trains from random weights"),
])
def test_every_stage_section_is_checked_against_the_dataset(idrid_data, override, message):
    cfg = load_experiment("configs/real.yaml", [f"data.root={idrid_data}", override])
    with pytest.raises(ConfigError) as err:
        load_splits(cfg)
    assert message in str(err.value)


def test_tasks_the_config_does_not_name_use_the_global_temperature(idrid_data):
    cfg = load_experiment("configs/real.yaml", [f"data.root={idrid_data}", "student.kd.temperatures={dr_grade: 3}"])
    load_splits(cfg)  # no error: the other tasks fall back to default_temperature
    from train.losses import MultiTaskLoss

    loss = MultiTaskLoss(load_dataset(idrid_data).spec.tasks, temperatures=cfg.student.kd.temperatures,
                         default_temperature=cfg.student.kd.default_temperature)
    assert loss.temperature("dr_grade") == 3 and loss.temperature("edema_risk") == cfg.student.kd.default_temperature


def _saved_model(tmp_path: Path, data_root: Path) -> Path:
    from tiny import tiny_model as small

    from train.experiment import ModelConfig
    from train.fit_check import dataset_fingerprint
    from train.models.saved import save_model
    from train.stage import build_model

    data = load_dataset(data_root)
    model = build_model(ModelConfig(**small()), data, data.spec.task_names)
    return save_model(tmp_path / "teacher" / "best.safetensors", model,
                      {"config": {"dataset": dataset_fingerprint(data)}})


def test_a_model_is_refused_after_the_class_order_changes(idrid_data, tmp_path):
    import shutil

    from train.data.manifest import DatasetError
    from train.fit_check import check_checkpoint

    data_root = tmp_path / "idrid"
    shutil.copytree(idrid_data, data_root)
    ckpt = _saved_model(tmp_path, data_root)
    check_checkpoint(ckpt, load_dataset(data_root))  # same dataset: fine
    spec = (data_root / "dataset.yaml").read_text()
    (data_root / "dataset.yaml").write_text(spec.replace("  - low\n  - high\n", "  - high\n  - low\n"))
    with pytest.raises(DatasetError, match=r"edema_risk.*\['no_risk', 'low', 'high'\].*now lists \['no_risk', "
                                           r"'high', 'low'\].*retrain it"):
        check_checkpoint(ckpt, load_dataset(data_root))
    (data_root / "dataset.yaml").write_text(spec)
    vocab = json.loads((data_root / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"][:-2] + vocab["tokens"][-1:] + vocab["tokens"][-2:-1]  # two words swapped
    (data_root / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DatasetError, match="another vocabulary"):
        check_checkpoint(ckpt, load_dataset(data_root))


def test_the_teacher_fingerprint_covers_the_dataset_spec_and_vocabulary(idrid_data, tmp_path):
    import shutil

    from train.fit_check import dataset_fingerprint

    data_root = tmp_path / "d"
    shutil.copytree(idrid_data, data_root)
    before = dataset_fingerprint(load_dataset(data_root))
    spec = (data_root / "dataset.yaml").read_text()
    (data_root / "dataset.yaml").write_text(spec.replace("  - severe\n  - proliferative\n",
                                                         "  - proliferative\n  - severe\n"))
    assert dataset_fingerprint(load_dataset(data_root)) != before


def test_reading_and_checking_a_config_loads_no_torch(idrid_data):
    """make computes RUN and `make check` fails a wrong config without importing torch/timm (seconds each)."""
    code = ("import sys\nfrom deploy.errors import cli\nfrom train import check, experiment\n"
            f"rc = cli(check.main, ['--config', 'configs/default.yaml', 'data.root={idrid_data}'])\n"
            "assert rc == 2, rc\nassert cli(experiment.main, ['--print', 'run_dir']) == 0\n"
            "print(sorted({'torch', 'timm'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_joint_and_ordinal_keys_are_valid_names_for_an_idrid_dataset(idrid_data):
    spec = load_dataset(idrid_data).spec
    assert spec.task("dr_grade").ordinal and spec.task("edema_risk").ordinal
    assert spec.joint == [("dr_grade", "edema_risk")]
    cfg = load_experiment("configs/real.yaml", [f"data.root={idrid_data}",
                                                "student.train.select_metric=dr_grade+edema_risk/joint_accuracy",
                                                "bench.floors=['student.*:dr_grade/kappa=10']"])
    load_splits(cfg)  # accepted


def test_many_tasks_do_not_silently_make_dozens_of_teachers(idrid_data):
    from train.preflight import experiment_problems

    spec = load_dataset(idrid_data).spec
    from deploy.contract import TaskSpec

    wide = type(spec)(name="wide", tasks=[TaskSpec(f"t{i}", "classification", ("a", "b")) for i in range(5)])
    cfg = load_experiment("configs/real.yaml")
    assert any("31 teachers" in p for p in experiment_problems(cfg, wide))
    cfg = load_experiment("configs/real.yaml", ["teachers.members=[{name: all, tasks: [t0, t1, t2, t3, t4]}]"])
    assert not any("teachers" in p for p in experiment_problems(cfg, wide))


def test_a_model_task_the_dataset_lacks_or_a_changed_grade_flag_is_refused(idrid_data):
    from deploy.contract import TaskSpec
    from train.data.manifest import DatasetError
    from train.fit_check import check_tasks

    data = load_dataset(idrid_data)
    with pytest.raises(DatasetError, match="trained for task 'grade'"):
        check_tasks("m.safetensors", [TaskSpec("grade", "classification", ("a", "b"))], data)
    nominal = TaskSpec("edema_risk", "classification", data.spec.task("edema_risk").classes)
    with pytest.raises(DatasetError, match="edema_risk"):
        check_tasks("m.safetensors", [nominal], data)


def test_every_later_stage_refuses_models_of_an_older_dataset_yaml(trained_run, tmp_path, capsys):
    """Class order changed after training: student, export, compress and bench all refuse, naming the file."""
    import shutil

    import torch

    from benchmarks.bench import main as bench_main
    from compress.export import main as export_main
    from compress.quantize import main as quantize_main
    from train.calibrate import teacher_ensemble
    from train.data.manifest import DatasetError

    data = tmp_path / "data"
    shutil.copytree(trained_run.data, data)
    spec = (data / "dataset.yaml").read_text()
    assert "  - red\n  - green\n" in spec
    (data / "dataset.yaml").write_text(spec.replace("  - red\n  - green\n", "  - green\n  - red\n"))
    cfg_path = trained_run.copy(tmp_path)
    args = ["--config", str(cfg_path), f"data.root={data}"]
    cfg = load_experiment(str(cfg_path), [f"data.root={data}"])
    with pytest.raises(DatasetError, match=r"teachers/t_cls/best.safetensors: task 'coarse'"):
        teacher_ensemble(cfg, load_splits(cfg), torch.device("cpu"))
    capsys.readouterr()
    assert cli(export_main, args) == 2
    assert "best.safetensors: task 'coarse' was trained with classes ['red', 'green', 'blue']" in capsys.readouterr().err
    assert cli(quantize_main, args) != 0
    assert "student.onnx: task 'coarse'" in capsys.readouterr().err
    cli(bench_main, [*args, "--only", "student.fp32"])
    report = json.loads((tmp_path / "runs" / "tiny" / "bench" / "report.json").read_text())
    record = next(r for r in report["artifacts"] if r["name"] == "student.fp32")
    assert record["status"] == "failed" and "task 'coarse'" in record["reason"]


def test_random_init_is_refused_unless_asked_and_the_paper_config_says_how_to_get_weights(idrid_data):
    from train.preflight import experiment_problems

    spec = load_dataset(idrid_data).spec
    base = [f"data.root={idrid_data}", "student.kd.temperatures={}"]
    paper = load_experiment("configs/paper.yaml", base)
    problems = " ".join(experiment_problems(paper, spec))
    assert "weights/resnet50_imagenet.safetensors not found" in problems  # ImageNet weights, not random
    assert "random weights" not in problems
    text = Path("configs/paper.yaml").read_text()
    assert "timm.create_model('resnet50', pretrained=True" in text and "allow_random_init" in text
    random = load_experiment("configs/paper.yaml", [*base, "teachers.model.pretrained=none"])
    assert "teachers.model.pretrained: none trains from random weights" in " ".join(experiment_problems(random, spec))
    asked = load_experiment("configs/paper.yaml", [*base, "teachers.model.pretrained=none", "allow_random_init=true"])
    assert not [p for p in experiment_problems(asked, spec) if "pretrained" in p]


def test_print_of_an_unknown_key_is_one_line(capsys):
    assert cli(experiment.main, ["--print", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--print bogus: no such config key" in err and "Traceback" not in err

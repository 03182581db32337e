"""Training loop, teachers, distillation: learning, resume, DDP, NaN guard (tiny data, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_dataset, write_tiny_config

import train.teachers as teachers_mod
from deploy.preprocess import PreprocessSpec
from train.budget import student_plan
from train.checkpoint import load_checkpoint
from train.data.manifest import load_dataset
from train.datasets import FundusImages
from train.evaluate import score_outputs
from train.experiment import TrainConfig, load_experiment
from train.loop import TrainingDiverged
from train.stage import load_splits
from train.student import budget_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _teacher(cfg_path: Path, name: str = "t_cls") -> dict:
    cfg = load_experiment(cfg_path)
    splits = load_splits(cfg)
    spec = next(s for s in cfg.teachers.members if s.name == name)
    teachers_mod.train_teacher(cfg, spec, splits, torch.device("cpu"), teachers_mod.DistInfo())
    return json.loads((cfg.run_dir / "teachers" / name / "final.json").read_text())


def test_teacher_learns_clearly_above_chance(tiny_data, tmp_path):
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    final = _teacher(cfg)
    # 3 coarse classes: chance is 1/3; the colours are easy, so a working loop gets far above it.
    assert final["headline"]["coarse/accuracy"] >= 0.75
    run = tmp_path / "runs" / "tiny" / "teachers" / "t_cls"
    for name in ("best.safetensors", "last.safetensors", "metrics.csv", "curves.png", "config.yaml"):
        assert (run / name).exists(), name
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 3  # header + 3 epochs


def test_resume_after_interruption_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    full = _teacher(write_tiny_config(tmp_path / "a.yaml", tiny_data, tmp_path / "full"))

    cfg_b = write_tiny_config(tmp_path / "b.yaml", tiny_data, tmp_path / "cut")
    real = teachers_mod.supervised_step
    steps = {"n": 0, "armed": True}

    def dies_mid_epoch_two(loss_fn, text):
        step = real(loss_fn, text)

        def run(model, batch, mode):
            steps["n"] += 1
            # 3 steps per epoch and the end-of-epoch check of the last update: the 2nd step of epoch 2
            if steps["armed"] and steps["n"] == 6:
                steps["armed"] = False
                raise KeyboardInterrupt  # as if Ctrl-C / kill arrived in the middle of epoch 2
            return step(model, batch, mode)

        return run

    monkeypatch.setattr(teachers_mod, "supervised_step", dies_mid_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _teacher(cfg_b)
    _, meta = load_checkpoint(tmp_path / "cut" / "tiny" / "teachers" / "t_cls" / "last.safetensors")
    assert meta["epoch"] == 0  # only the first epoch was completed
    resumed = _teacher(cfg_b)
    assert resumed["metrics"] == full["metrics"]
    a, _ = load_checkpoint(tmp_path / "full" / "tiny" / "teachers" / "t_cls" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "cut" / "tiny" / "teachers" / "t_cls" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    real = teachers_mod.supervised_step
    state = {"steps": 0}

    def poisoned(loss_fn, text):
        step = real(loss_fn, text)

        def run(model, batch, mode):
            loss, parts = step(model, batch, mode)
            state["steps"] += 1
            return (loss * float("nan") if state["steps"] > 4 else loss), parts  # epoch 2 (3 steps/epoch)

        return run

    monkeypatch.setattr(teachers_mod, "supervised_step", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        _teacher(cfg)
    _, meta = load_checkpoint(tmp_path / "runs" / "tiny" / "teachers" / "t_cls" / "last.safetensors")
    assert meta["epoch"] == 0


@pytest.mark.parametrize("lr, match", [("1.0e+30", "weights after the last update of epoch 1"),
                                       ("1.0e+39", "optimizer update overflowed at epoch 1 step 1")])
def test_divergence_in_a_one_step_epoch_is_caught_before_evaluation(tiny_data, tmp_path, lr, match):
    # One step per epoch: the only update of the epoch is never followed by a loss check in the epoch.
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs",
                            **{"teachers.train.batch_size": 64, "teachers.train.optim.lr": lr})
    with pytest.raises(TrainingDiverged, match=match) as info:
        _teacher(cfg)
    assert "no checkpoint was written yet" in str(info.value) and "optim.lr" in str(info.value)
    assert not (tmp_path / "runs" / "tiny" / "teachers" / "t_cls" / "last.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_run(tiny_data, tmp_path):
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "train.teachers", "--config", str(cfg), "--only", "t_cls",
           "teachers.train.epochs=8"]  # each rank sees half the images: more epochs for the same steps
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "runs" / "tiny" / "teachers" / "t_cls" / "final.json").read_text())
    n_test = len(load_dataset(tiny_data).split("test"))
    # Metrics gathered from both ranks over the whole test split, not one rank's shard.
    assert final["metrics"]["coarse"]["n"] == n_test
    assert final["headline"]["coarse/accuracy"] >= 0.6



class _Items(torch.utils.data.Dataset):
    """16 separable points, as dicts (the Trainer's batch format)."""

    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def _fit_linear(out_dir: Path, items, info) -> str:
    """Train a linear model with the project's Trainer; returns the SHA-256 of its parameters."""
    import hashlib
    from unittest import mock

    from train.loop import EpochPlan, Trainer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    trainer = Trainer(name="probe", model=model, train_set=items, plan=lambda e: EpochPlan(np.arange(len(items))),
                      step=lambda m, b, mode: (torch.nn.functional.cross_entropy(m(b["x"]), b["y"]), {}),
                      evaluate=lambda m: (0.0, {}), cfg=TrainConfig(epochs=2, batch_size=4, max_evals=1),
                      out_dir=out_dir, seed=0, device=torch.device("cpu"), info=info, meta={})
    with mock.patch("train.loop.save_model"):  # best.safetensors is for MultiTaskNets; last.* is kept
        trainer.fit()
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def _ddp_rank(rank: int, port: int, out: Path) -> None:
    from train.distributed import init_distributed, shutdown_distributed

    torch.set_num_threads(1)  # forked from a process with thread pools
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info, _ = init_distributed("cpu")
    digest = _fit_linear(out / "run", _Items(), info)
    (out / f"rank{rank}.sha256").write_text(digest)
    shutdown_distributed()


class _Images(torch.utils.data.Dataset):
    """Eight 3x8x8 images in the layout the datasets give (contiguous NCHW once batched)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 8, 8), float(i)), "y": torch.tensor(i % 2)}


def test_training_and_evaluation_feed_models_channels_last_images(tmp_path):
    """oneDNN's channels-last convolutions made a CPU training step 1.6x faster (train/datasets.py)."""
    from unittest import mock

    from train.distributed import DistInfo
    from train.evaluate import collect_outputs
    from train.loop import EpochPlan, Trainer

    seen = []

    def step(model, batch, mode):
        seen.append(batch["image"].is_contiguous(memory_format=torch.channels_last))
        return torch.nn.functional.cross_entropy(model(batch["image"]).mean((2, 3)), batch["y"]), {}

    model = torch.nn.Conv2d(3, 2, 3)
    trainer = Trainer(name="cl", model=model, train_set=_Images(), plan=lambda e: EpochPlan(np.arange(8)), step=step,
                      evaluate=lambda m: (0.0, {}), cfg=TrainConfig(epochs=1, batch_size=4), out_dir=tmp_path,
                      seed=0, device=torch.device("cpu"), info=DistInfo(), meta={})
    with mock.patch("train.loop.save_model"):
        trainer.fit()

    def predict(images):
        seen.append(images.is_contiguous(memory_format=torch.channels_last))
        return {"p": images.mean((1, 2, 3))[:, None]}

    collect_outputs(predict, _Images(), torch.device("cpu"), batch_size=4)
    assert seen == [True] * 5  # 2 training batches, the last-update check of the second, 2 evaluation


def test_training_takes_a_thread_offer_at_each_epoch(tmp_path, monkeypatch):
    """The last teachers of a parallel run grow into the cores the others freed (train/parallel.py)."""
    from train.distributed import DistInfo
    from train.parallel import THREAD_SHARE_ENV

    before = torch.get_num_threads()
    offer = tmp_path / ".thread_share"
    offer.write_text(str(before + 1))
    monkeypatch.setenv(THREAD_SHARE_ENV, str(offer))
    try:
        _fit_linear(tmp_path / "run", _Items(), DistInfo())
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_ddp_ranks_end_identical_and_learn_from_all_the_data(tmp_path):
    """Gradients are all-reduced: both ranks hold the same weights, which are not what one process
    gets from half of the data (each rank's shard) alone."""
    import multiprocessing

    from train.distributed import DistInfo

    ctx = multiprocessing.get_context("fork")  # forked: no interpreter and torch start-up per rank
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, tmp_path)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    rank0, rank1 = ((tmp_path / f"rank{r}.sha256").read_text() for r in range(2))
    assert rank0 == rank1
    items = _Items()
    half = torch.utils.data.Subset(items, list(range(8)))
    assert _fit_linear(tmp_path / "half", half, DistInfo()) != rank0


def test_staged_schedule_follows_the_paper(tiny_data, tmp_path):
    cfg = load_experiment(write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs",
                                            **{"student.kd.schedule": "staged",
                                               "student.kd.stage_epochs": [1, 2, 1]}))
    labelled = torch.tensor([True, True, False, False, False]).numpy()
    plan = student_plan(cfg, labelled)
    modes = [plan(e).mode for e in range(4)]
    assert modes == ["labels", "labels+kd", "labels+kd", "unlabeled-kd"]
    assert list(plan(0).indices) == [0, 1] and list(plan(3).indices) == [2, 3, 4]


def test_labelled_share_repeats_labelled_images_evenly_and_keeps_the_epoch_size(tiny_data, tmp_path):
    labelled = np.array([True] * 4 + [False] * 36)
    plans = {share: student_plan(load_experiment(write_tiny_config(
        tmp_path / f"{share}.yaml", tiny_data, tmp_path / "runs", **{"student.kd.labelled_share": share})), labelled)
        for share in (None, 0.5, 0.01)}
    assert sorted(plans[None](0).indices) == list(range(40))  # null: the natural mix, every image once
    for epoch in range(2):
        idx = plans[0.5](epoch).indices
        assert len(idx) == 40 and (idx < 4).sum() == 20
        assert list(np.bincount(idx[idx < 4])) == [5, 5, 5, 5]  # every labelled image equally often
        assert len(set(idx[idx >= 4])) == 20  # unlabelled: drawn without repeats
    assert set(plans[0.5](0).indices[20:]) != set(plans[0.5](1).indices[20:])  # a fresh draw each epoch
    assert (plans[0.01](0).indices < 4).sum() == 4  # never below the natural share


def test_student_and_baseline_pipeline(trained_run):
    # The session's run: `python -m train.teachers` then `python -m train.student` (tests/conftest.py).
    run = trained_run.root / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["rows"]) == {"t_cls", "t_all", "ensemble", "student", "baseline", "linear probe"}
    soft = run / "student" / "teacher_outputs.safetensors"
    tensors, meta = load_checkpoint(soft)
    n_rows = len(meta["key"]["rows"])
    assert set(meta["key"]["teachers"]) == {"t_cls", "t_all"}  # the cache is tied to these checkpoints
    assert tensors["logits.coarse"].shape[:2] == (2, n_rows)  # both teachers have the coarse head
    assert tensors["text_logits"].shape[0] == 1  # only t_all has the text head
    # The baseline got the student's optimizer-step budget on fewer images: more epochs.
    student_epochs = len((run / "student/metrics.csv").read_text().splitlines()) - 1
    baseline_epochs = len((run / "baseline/metrics.csv").read_text().splitlines()) - 1
    assert baseline_epochs > student_epochs


@pytest.mark.parametrize("n_items,budget", [(100, 37), (7, 40), (64, 8), (33, 1)])
def test_baseline_gets_the_students_step_budget(n_items, budget):
    tcfg = budget_config(TrainConfig(batch_size=8), n_items, 1, budget)
    per_epoch = -(-n_items // 8)
    total = sum(min(per_epoch, tcfg.max_steps_per_epoch) for _ in range(tcfg.epochs))
    assert budget <= total <= budget + tcfg.epochs - 1


def test_text_metrics_group_by_the_models_own_classification_task(tiny_data):
    data = load_dataset(tiny_data)
    rows = data.split("test")
    tasks = [data.spec.task("fine"), data.spec.task("diagnosis")]  # a teacher without the coarse head
    images = FundusImages(data, rows, data.spec.tasks, PreprocessSpec(size=32))
    vocab = data.vocabulary
    outputs = {"fine": np.full((len(rows), len(tasks[0].classes)), 1 / len(tasks[0].classes)),
               "diagnosis": np.array([vocab.encode_padded(r.labels["diagnosis"]) for r in rows])}
    metrics = score_outputs(outputs, images, tasks, vocab)
    assert metrics["diagnosis"]["bleu"] > 50  # references truncated to the tiny vocab's max_len
    assert set(metrics["diagnosis"]["per_group"]) <= set(tasks[0].classes)


def test_min_steps_adds_epochs_and_max_evals_spaces_checkpoints(tiny_data, tmp_path):
    cfg = write_tiny_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs", **{
        "teachers.train.epochs": 1, "teachers.train.min_steps": 12, "teachers.train.max_evals": 2})
    _teacher(cfg)  # 3 steps per epoch: 12 steps need 4 epochs; 2 evaluations -> after epochs 2 and 4
    run = tmp_path / "runs" / "tiny" / "teachers" / "t_cls"
    epochs = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["2", "4"]
    _, meta = load_checkpoint(run / "last.safetensors")
    assert meta["epoch"] == 3  # 0-based index of the last (4th) epoch


def test_soft_target_cache_is_reused_for_the_same_key_only(tmp_path):
    from train.ensemble import SoftTargets, load_soft_targets, save_soft_targets

    soft = SoftTargets(logits={"coarse": torch.randn(2, 3, 3)})
    key = {"rows": ["a.jpg", "b.jpg", "c.jpg"], "preprocessing": {"mean": (0.5, 0.5, 0.5)}, "teachers": {"t": "x"}}
    save_soft_targets(tmp_path / "cache.safetensors", soft, key)
    hit = load_soft_targets(tmp_path / "cache.safetensors", key)  # tuples survive the JSON round trip
    assert hit is not None and torch.equal(hit.logits["coarse"], soft.logits["coarse"])
    assert load_soft_targets(tmp_path / "cache.safetensors", {**key, "teachers": {"t": "retrained"}}) is None


def test_the_kept_record_is_the_best_score_and_a_tie_keeps_the_later_epoch():
    from train.history import kept_record

    history = [{"epoch": 1, "val/score": 0.5}, {"epoch": 2, "val/score": 0.7}, {"epoch": 3, "val/score": 0.7},
               {"epoch": 4, "val/score": 0.6}, {"epoch": 5, "train/loss": 0.1}]
    assert kept_record(history)["epoch"] == 3  # Trainer: score >= best keeps the later checkpoint
    assert kept_record([{"epoch": 1, "val/score": float("nan")}, *history])["epoch"] == 3  # NaN is never kept
    assert kept_record([{"epoch": 1, "train/loss": 0.1}]) == {} and kept_record([]) == {}


def test_kept_validation_is_the_validation_record_of_each_teachers_kept_checkpoint(trained_run, tmp_path):
    """What the summary's validation pick reads (train.history.kept_validation): the history record of
    the epoch best.safetensors was saved at; {} for a run folder without the resume point's sidecar."""
    from train.history import kept_validation

    teachers = sorted((trained_run.root / "runs").glob("*/teachers/*/best.json"))
    assert teachers
    for best in teachers:
        _, last = load_checkpoint(best.parent / "last.safetensors")
        record = next(r for r in last["history"] if r["epoch"] == json.loads(best.read_text())["epoch"])
        val = kept_validation(best.parent)
        assert val and val == {k[4:]: v for k, v in record.items() if k.startswith("val/") and k != "val/score"}
    (tmp_path / "last.json").write_text("{not json")
    assert kept_validation(tmp_path) == {} and kept_validation(tmp_path / "missing") == {}

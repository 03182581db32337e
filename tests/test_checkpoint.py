"""Safetensors checkpoints: round trips, nested training state, refusing pickles, truncated files."""

from __future__ import annotations

import json

import pytest
import torch

from deploy.contract import TaskSpec
from deploy.errors import cli
from train.checkpoint import (
    CheckpointError,
    flatten_state,
    load_checkpoint,
    main,
    save_checkpoint,
    unflatten_state,
)
from train.models.multitask import ModelConfig, MultiTaskNet
from train.models.saved import load_model, save_model

TASKS = [TaskSpec("coarse", "classification", ("a", "b", "c")), TaskSpec("diagnosis", "text")]


def _trained_optimizer(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    if kind == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return net, opt


def _assert_same(a, b, where="root"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_tensors_and_meta_round_trip_with_sidecar(tmp_path):
    tensors = {"w": torch.randn(3, 4), "ids": torch.arange(5), "flag": torch.tensor([True, False]),
               "half": torch.randn(2, dtype=torch.bfloat16), "view": torch.randn(4, 4).t()}
    meta = {"epoch": 3, "metrics": {"acc": 0.5}, "note": "héllo"}
    path = save_checkpoint(tmp_path / "ck.safetensors", tensors, meta)
    loaded, loaded_meta = load_checkpoint(path)
    _assert_same(dict(sorted(tensors.items())), dict(sorted(loaded.items())))
    assert loaded_meta == meta
    assert json.loads((tmp_path / "ck.json").read_text()) == meta
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_state_round_trips_exactly_through_a_file(tmp_path, kind):
    net, opt = _trained_optimizer(kind)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # holds inf, a float that JSON must keep
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
    tensors, structure = flatten_state(state)
    save_checkpoint(tmp_path / "s.safetensors", tensors, {"state": structure})
    loaded_tensors, meta = load_checkpoint(tmp_path / "s.safetensors")
    restored = unflatten_state(loaded_tensors, meta["state"])
    _assert_same(state, restored)  # int keys, tuples (betas), None, inf, uint8 RNG state all intact

    # Resuming from the restored state continues exactly like the original.
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    twin.load_state_dict(net.state_dict())
    twin_opt = type(opt)(twin.parameters(), lr=1.0)
    twin_opt.load_state_dict(restored["optimizer"])
    batch = torch.randn(5, 4)
    for model, optim in ((net, opt), (twin, twin_opt)):
        optim.zero_grad()
        model(batch).square().sum().backward()
        optim.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_rng_state_restores_the_random_stream():
    tensors, structure = flatten_state({"rng": torch.get_rng_state()})
    expected = torch.rand(3)
    torch.set_rng_state(unflatten_state(tensors, structure)["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_flatten_refuses_objects_it_cannot_store():
    with pytest.raises(TypeError, match="opt/extra"):
        flatten_state({"opt": {"extra": object()}})
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        unflatten_state({}, {"__tensor__": "missing"})


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickled_files_are_refused(tmp_path, zipfile):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused: convert"):
        load_checkpoint(path)
    disguised = tmp_path / "old.safetensors"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(disguised)


@pytest.mark.parametrize("keep", [0.5, 0.99, 40, 3])
def test_truncated_files_give_a_clear_error(tmp_path, keep):
    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.randn(100, 10)}, {"epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "ck.pt", {"w": torch.ones(1)}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(1)}, {"bad": object()})


def test_model_rebuilds_from_its_checkpoint_alone(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", head_hidden=8, embed_dim=4, decoder_hidden=6,
                      freeze_stages=1, teacher_forcing=0.5)
    model = MultiTaskNet(cfg, TASKS, vocab_size=11, max_len=5).eval()
    path = save_model(tmp_path / "best.safetensors", model, {"epoch": 7})
    loaded, meta = load_model(path)
    assert meta["epoch"] == 7 and meta["model"]["vocab_size"] == 11
    assert loaded.cfg == cfg and loaded.tasks == model.tasks and not loaded.training
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for key, value in model(images).items():
            torch.testing.assert_close(loaded(images)[key], value, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="reserved"):
        save_model(tmp_path / "x.safetensors", model, {"model": 1})
    save_checkpoint(tmp_path / "plain.safetensors", model.state_dict(), {})
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_model(tmp_path / "plain.safetensors")


def test_cli_converts_with_the_restricted_unpickler_and_inspects(tmp_path, capsys):
    state = {"w": torch.randn(2, 3), "b": torch.zeros(3)}
    torch.save(state, tmp_path / "old.pt")
    assert main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.safetensors")]) == 0
    tensors, meta = load_checkpoint(tmp_path / "new.safetensors")
    _assert_same(dict(sorted(state.items())), dict(sorted(tensors.items())))
    assert meta == {"converted_from": "old.pt"}
    assert main(["inspect", str(tmp_path / "new.safetensors")]) == 0
    assert "2 tensors" in capsys.readouterr().out
    assert cli(main, ["inspect", str(tmp_path / "old.pt")]) == 2  # the user's file to fix: exit 2
    assert "pickled" in capsys.readouterr().err


def test_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    # 0x80 is a pickle's first byte, and also the low byte of some safetensors header lengths.
    for pad in range(0, 300, 3):
        path = tmp_path / f"c{pad}.safetensors"
        save_checkpoint(path, {"w": torch.zeros(2)}, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            tensors, meta = load_checkpoint(path)
            assert meta["pad"] == "x" * pad and torch.equal(tensors["w"], torch.zeros(2))
            return
    pytest.fail("no header length with low byte 0x80 was produced")


def _tiny_model() -> MultiTaskNet:
    cfg = ModelConfig(backbone="test_efficientnet", pretrained="none", head_hidden=8, embed_dim=8,
                      decoder_hidden=8)
    return MultiTaskNet(cfg, TASKS, vocab_size=12, max_len=5)


def _edit_meta(path, edit) -> None:
    tensors, meta = load_checkpoint(path)
    edit(meta["model"])
    save_checkpoint(path, tensors, meta)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("vocab_size"), r"lacks \['vocab_size'\]"),
    (lambda m: m.update(vocab_size="twelve"), "model.vocab_size' must be a whole number"),
    (lambda m: m.update(max_len=None), "model.max_len' must be a whole number"),
    (lambda m: m.update(tasks=None), "model.tasks' must be a non-empty list"),
    (lambda m: m.update(tasks=[{"name": "coarse"}]), "cannot build the model"),
    (lambda m: m["config"].update(backbone="no_such_net_v9"), "no_such_net_v9"),
    (lambda m: m.update(config=None), "model.config"),
])
def test_a_damaged_model_meta_is_one_error_naming_the_file(tmp_path, edit, match, capsys):
    path = save_model(tmp_path / "m.safetensors", _tiny_model())
    _edit_meta(path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)

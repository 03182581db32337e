"""Export the student, the baseline, every teacher and the teacher ensemble to ONNX, and verify them.

    python -m compress.export --config configs/default.yaml [compress.models=[student]]

One graph per model: input `image` [batch, 3, S, S] (dynamic batch), outputs per task in contract order
(`<task>_probs` softmax probabilities, `<task>_tokens` greedy token ids from the unrolled decoder). The
deployment contract goes into the ONNX metadata and a JSON sidecar. Every export is checked on real
validation images against the PyTorch module it came from (probabilities within `verify_atol`,
identical top-1 and decoded text on >= `verify_min_agreement` of images, onnx.checker) and fails loudly,
naming the images, when it does not match.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress.graph_split import text_only_nodes
from compress.onnx_eval import open_onnx, run_onnx
from compress.settings import CompressConfig, compress_config
from deploy.contract import Contract, sidecar_path, write_metadata, write_sidecar
from deploy.errors import MissingInput, RunFailed
from deploy.fileio import atomic_write, atomic_write_text, sha256_file
from train.datasets import FundusImages
from train.ensemble import TeacherEnsemble, attach_stored_combination
from train.evaluate import collect_outputs
from train.experiment import (
    add_config_args,
    config_overrides,
    load_experiment,
    role_preprocessing,
    teacher_specs,
)
from train.fit_check import check_checkpoint, check_preprocessing
from train.models.multitask import ExportModel
from train.models.saved import load_model
from train.stage import Splits, image_set, load_splits, model_contract
from train.stage_times import run_stage


class ExportMismatch(RunFailed):
    """The ONNX model does not reproduce the PyTorch model."""


class EnsembleExport(nn.Module):
    """The teacher ensemble as one graph: image -> outputs in contract order."""

    def __init__(self, ensemble: TeacherEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.ensemble(image)
        return tuple(out[t.name] for t in self.ensemble.tasks)


def tag_text_nodes(model: onnx.ModelProto, contract: Contract) -> None:
    """Prefix the nodes that only feed a text output with `/heads/<task>/`.

    The unrolled decoder is traced from functional calls, so its nodes carry no module scope; the
    quantizers find it by this prefix to keep it in float.
    """
    graph = model.graph
    for task in (t for t in contract.tasks if t.kind == "text"):
        prefix = f"/heads/{task.name}/"
        for i in text_only_nodes(graph, [task.output_name]):
            node = graph.node[i]
            if not node.name.startswith(prefix):
                node.name = prefix + node.name.lstrip("/")


def export_onnx(module: nn.Module, contract: Contract, out_path: Path, opset: int = 17) -> Path:
    """torch.onnx.export with a dynamic batch, the contract in the metadata and a sidecar; checked."""
    size = contract.preprocessing.size
    dummy = torch.zeros(2, 3, size, size)
    names = contract.output_names
    axes = {contract.input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about the unrolled decoder loop
            torch.onnx.export(module.eval(), (dummy,), str(tmp), input_names=[contract.input_name],
                              output_names=names, dynamic_axes=axes, opset_version=opset, dynamo=False)
        model = onnx.load(str(tmp))
        write_metadata(model, contract)
        model.producer_name = "fundus-mtkd"
        tag_text_nodes(model, contract)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))

    atomic_write(out_path, write)
    write_sidecar(out_path, contract)
    return out_path


def _torch_outputs(module: nn.Module, tasks, data: FundusImages, limit: int) -> dict[str, np.ndarray]:
    names = [t.name for t in tasks]
    predict = lambda x: dict(zip(names, module(x)))  # noqa: E731
    subset = FundusImages(data.dataset, data.rows[:limit], data.tasks, data.spec)
    return collect_outputs(predict, subset, torch.device("cpu"), batch_size=32)


def verify_export(path: Path, module: nn.Module, contract: Contract, data: FundusImages,
                  cfg: CompressConfig) -> dict:
    """Compare ONNX Runtime with PyTorch on real images; raise ExportMismatch when they differ."""
    limit = min(cfg.verify_images or len(data), len(data))
    ref = _torch_outputs(module.eval(), contract.tasks, data, limit)
    got = run_onnx(open_onnx(path, threads=cfg.threads), data, batch_size=32, limit=limit)
    report, problems = {"images": limit}, []
    vocab = contract.vocabulary
    for task in contract.tasks:
        a, b = ref[task.name], got[task.name]
        if task.kind == "classification":
            diff = np.abs(a - b).max(axis=1)
            same = a.argmax(1) == b.argmax(1)
            report[task.name] = {"max_abs_diff": float(diff.max()), "top1_agreement": float(same.mean())}
            if diff.max() > cfg.verify_atol:
                problems.append(f"{task.name}: max |p_onnx - p_torch| = {diff.max():.2e} > {cfg.verify_atol:g} "
                                f"(worst image {data.rows[int(diff.argmax())].path})")
        else:
            same = np.array([vocab.decode(x) == vocab.decode(y) for x, y in zip(a, b)])
            report[task.name] = {"text_agreement": float(same.mean())}
        if same.mean() < cfg.verify_min_agreement:
            bad = [data.rows[i].path for i in np.flatnonzero(~same)[:5]]
            problems.append(f"{task.name}: only {same.mean():.2%} of images agree (< {cfg.verify_min_agreement:.1%});"
                            f" e.g. {bad}")
    if problems:
        raise ExportMismatch(f"{path}: ONNX does not reproduce PyTorch:\n  " + "\n  ".join(problems))
    return report


def export_all(cfg_path: str | None, overrides: list[str]) -> dict:
    cfg = load_experiment(cfg_path, overrides)
    ccfg = compress_config(cfg)
    splits: Splits = load_splits(cfg)
    tasks = splits.data.spec.tasks
    jobs: list[tuple[str, nn.Module, Contract]] = []
    specs = teacher_specs(cfg, splits.data.spec.task_names)
    teacher_paths = [cfg.layout.teacher_checkpoint(s.name) for s in specs]
    for role in ("student", "baseline"):
        if role in ccfg.models:
            ckpt = cfg.layout.checkpoint(role)
            if not ckpt.exists():
                raise MissingInput(f"{ckpt}: missing; run `make student` first")
            check_checkpoint(ckpt, splits.data)
            model, meta = load_model(ckpt)
            jobs.append((role, ExportModel(model.eval()), _contract(cfg, splits, role, model.tasks, meta, ckpt)))
    teachers = []
    teacher_pixels = role_preprocessing(cfg, "teachers")  # the ensemble's input: every teacher's own
    if "teachers" in ccfg.models or "ensemble" in ccfg.models:
        for spec, ckpt in zip(specs, teacher_paths):
            if not ckpt.exists():
                raise MissingInput(f"{ckpt}: missing; run `make teachers` first")
            check_checkpoint(ckpt, splits.data)
            check_preprocessing(ckpt, teacher_pixels)
            model, meta = load_model(ckpt)
            teachers.append(model.eval())
            if "teachers" in ccfg.models:
                jobs.append((spec.name, ExportModel(model), _contract(cfg, splits, spec.name, model.tasks, meta, ckpt)))
    if "ensemble" in ccfg.models:
        ens = attach_stored_combination(TeacherEnsemble(teachers, tasks), cfg.run_dir, teacher_paths).eval()
        contract = model_contract("ensemble", cfg.name, splits.data, ens.tasks, teacher_pixels)
        contract.hashes = {p.parent.name: sha256_file(p) for p in teacher_paths}
        jobs.append(("ensemble", EnsembleExport(ens), contract))
    reports = {}
    for name, module, contract in jobs:
        out = cfg.layout.onnx(name)
        export_onnx(module, contract, out, ccfg.opset)
        data = image_set(splits, splits.val, tasks, contract.preprocessing)
        try:
            check = verify_export(out, module, contract, data, ccfg)
        except ExportMismatch:
            out.unlink()  # an unverified model must not be picked up by compress or the device
            sidecar_path(out).unlink()
            raise
        reports[name] = {"onnx": str(out), "size_mb": out.stat().st_size / 1e6, **check}
        print(f"[export] {name}: {out} ({reports[name]['size_mb']:.1f} MB) verified on "
              f"{reports[name]['images']} validation images", flush=True)
    atomic_write_text(cfg.layout.export_report(), json.dumps(reports, indent=1))
    return reports


def _contract(cfg, splits: Splits, name: str, tasks, meta: dict, ckpt: Path) -> Contract:
    """A trained model's contract: the preprocessing it was trained with (its checkpoint says which)."""
    from deploy.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    contract = model_contract(name, f"{cfg.name}-{sha256_file(ckpt)[:12]}", splits.data, tasks, spec)
    contract.hashes = {"checkpoint_sha256": sha256_file(ckpt)}
    return contract


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        export_all(args.config, config_overrides(args))
    except onnx.checker.ValidationError as exc:
        raise ExportMismatch(f"the exported graph is not valid ONNX: {exc}") from exc
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "export"))

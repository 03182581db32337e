"""One-command check of the GPU paths on any NVIDIA machine: `make gpu-check` (python -m benchmarks.gpu_check).

Runs what the machine has, on the run's exported models (runs/<name>/onnx) and student checkpoint:
- PyTorch CUDA: the student in FP16 (autocast) and replayed through a CUDA graph, agreeing with FP32;
- ONNX Runtime's CUDA provider (where onnxruntime-gpu is installed) against ORT-CPU;
- TensorRT (where tensorrt imports): fp32/fp16/int8 engines built with deploy.build_engine (parse with
  0 errors), batch 1/3/max accepted and max+1 refused, float probabilities and int64 tokens, parity
  with ORT-CPU (fp32 |dp| <= 1e-4 with TF32 off; top-1 agreement fp16 >= 99 %, int8 >= 98 %), 50
  open/close cycles without GPU memory growth, batch-1 p50 per precision and int8 not slower than fp16.
Writes gpu_check.json + gpu_check.md to --out; exit 1 if any check failed. Without CUDA: one line, exit 2.
- the inspector of the int8 engine: Q/DQ-fed layers actually run in Int8 (engines are built with
  detailed profiling verbosity);
- a few mixed-precision (AMP) training steps of the student and of one teacher on CUDA: finite losses,
  a loss that goes down on one repeated batch, every parameter updated.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.latency import measure
from benchmarks.machine import describe_machine
from deploy.contract import read_sidecar
from deploy.errors import UserError, cli
from deploy.fileio import atomic_write_text
from deploy.markdown import table_lines
from train.layout import CHECKPOINT, RunLayout

TOP1_FLOOR = {"fp16": 0.99, "int8": 0.98}
FP32_MAX_ABS = 1e-4
GROWTH_MB = 4.0  # allowed drift of used GPU memory over the open/close cycles (allocator slack)


def parity_verdict(precision: str, max_abs: float, top1: float) -> tuple[bool, str]:
    """fp32 must match to FP32_MAX_ABS; fp16/int8 must agree on top-1 at least TOP1_FLOOR."""
    if precision == "fp32":
        return max_abs <= FP32_MAX_ABS, f"max |dp| {max_abs:.2e} (limit {FP32_MAX_ABS:.0e})"
    return top1 >= TOP1_FLOOR[precision], f"top-1 agreement {top1:.3f} (floor {TOP1_FLOOR[precision]})"


def memory_growth_verdict(used_mb: Sequence[float]) -> tuple[bool, str]:
    """No growth: used memory after the last cycles within GROWTH_MB of the level after the first ones."""
    first, last = float(np.median(used_mb[:5])), float(np.median(used_mb[-5:]))
    return last - first <= GROWTH_MB, f"used {first:.1f} -> {last:.1f} MB over {len(used_mb)} cycles"


def int8_not_slower(p50_ms: dict[str, float]) -> tuple[bool, str]:
    """INT8 batch-1 p50 <= FP16's (5 % timing noise allowed)."""
    ok = p50_ms["int8"] <= 1.05 * p50_ms["fp16"]
    return ok, f"int8 {p50_ms['int8']:.3f} ms vs fp16 {p50_ms['fp16']:.3f} ms"


def int8_layers(engine_info_json: str) -> tuple[int, int]:
    """(layers with an Int8 input or output, all layers) from EngineInspector's JSON. Layer entries are
    plain names when the engine was built without detailed profiling verbosity: then (0, n)."""
    layers = json.loads(engine_info_json).get("Layers", [])
    int8 = sum(1 for layer in layers if isinstance(layer, dict) and any(
        "Int8" in str(t.get("Format/Datatype", "")) for t in [*layer.get("Inputs", []), *layer.get("Outputs", [])]))
    return int8, len(layers)


def int8_verdict(int8: int, total: int) -> tuple[bool, str]:
    if total and int8 == 0:
        return False, f"0 of {total} layers run in Int8: the Q/DQ nodes were not fused (or no detailed profile)"
    return int8 > 0, f"{int8} of {total} layers have Int8 inputs or outputs"


def amp_verdict(losses: Sequence[float], frozen: Sequence[str]) -> tuple[bool, str]:
    """AMP steps on one repeated batch: losses finite and going down, no parameter left unchanged."""
    finite = all(np.isfinite(losses))
    detail = f"losses {' -> '.join(f'{v:.3f}' for v in losses)}"
    if frozen:
        detail += f"; not updated: {', '.join(frozen[:3])}"
    return finite and losses[-1] < losses[0] and not frozen, detail


def cuda_reason() -> str | None:
    """Why CUDA cannot be used here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (gpu-check runs in the training venv: make gpu-check)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def check_tensorrt(run: Path, out: Path, batch: np.ndarray) -> list[dict]:
    """Engines per precision: build, shapes, dtypes, parity with ORT-CPU, memory cycles, speed."""
    from deploy.build_engine import build_engine
    from deploy.runtime import OrtBackend
    from deploy.trt_runtime import TrtBackend

    layout = RunLayout(run)
    onnx = {"fp32": layout.onnx("student"), "fp16": layout.onnx("student", "fp16"),
            "int8": layout.onnx("student", "int8-tensorrt")}
    reference = OrtBackend(onnx["fp32"], providers=["CPUExecutionProvider"])
    ref = reference.run(batch)
    checks, p50 = [], {}
    for precision, path in onnx.items():
        engine = build_engine(path, out / f"student.{precision}.trt.engine", precision, max_batch=8, log=lambda _: None)
        backend = TrtBackend(engine)
        for n in (1, 3, backend.max_batch):
            got = backend.run(np.resize(batch, (n, *batch.shape[1:])))
            dtypes = {k: v.dtype.kind for k, v in got.items()}
            checks.append({"name": f"trt {precision} batch {n}", "ok": all(v.shape[0] == n for v in got.values())
                           and set(dtypes.values()) <= {"f", "i"}, "detail": str(dtypes)})
        try:
            backend.run(np.resize(batch, (backend.max_batch + 1, *batch.shape[1:])))
            checks.append({"name": f"trt {precision} max+1 refused", "ok": False, "detail": "ran"})
        except ValueError as exc:
            checks.append({"name": f"trt {precision} max+1 refused", "ok": True, "detail": str(exc)[:80]})
        got = backend.run(batch)
        probs = [k for k, v in ref.items() if v.dtype.kind == "f"]
        max_abs = max(float(np.abs(got[k].astype(np.float64) - ref[k]).max()) for k in probs)
        top1 = min(_top1(got[k], ref[k]) for k in probs)
        ok, detail = parity_verdict(precision, max_abs, top1)
        checks.append({"name": f"trt {precision} parity vs ORT-CPU", "ok": ok, "detail": detail})
        p50[precision] = measure(lambda b=backend: b.run(batch[:1]), batch=1, min_duration_s=1.0).p50_ms
        backend.close()
        used = []
        for _ in range(50):
            cycle = TrtBackend(engine)
            cycle.run(batch[:1])
            cycle.close()
            import torch

            free, total = torch.cuda.mem_get_info()
            used.append((total - free) / 2**20)
        ok, detail = memory_growth_verdict(used)
        checks.append({"name": f"trt {precision} 50 open/close", "ok": ok, "detail": detail})
        if precision == "int8":
            ok, detail = int8_verdict(*int8_layers(_engine_information(engine)))
            checks.append({"name": "trt int8 layers run in Int8 (inspector)", "ok": ok, "detail": detail})
    ok, detail = int8_not_slower(p50)
    checks.append({"name": "trt batch-1 p50 per precision", "ok": True, "detail": json.dumps(p50)})
    checks.append({"name": "trt int8 not slower than fp16", "ok": ok, "detail": detail})
    return checks


def _engine_information(engine_path: Path) -> str:
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)


def amp_steps(checkpoint: Path, batch: np.ndarray, steps: int = 6,
              device: str = "cuda") -> tuple[list[float], list[str]]:
    """Train a saved model for `steps` mixed-precision steps on one batch with random labels (the training
    loss code; FP16 + GradScaler on CUDA, bfloat16 on CPU); returns the losses and the names of the
    classification parameters that did not change."""
    import torch

    from train.losses import MultiTaskLoss
    from train.models.saved import load_model

    model, _ = load_model(checkpoint)
    model = model.to(device).train()
    tasks = model.classification_tasks
    gen = torch.Generator().manual_seed(0)
    targets = {t.name: torch.randint(t.num_classes, (len(batch),), generator=gen).to(device) for t in tasks}
    labelled = torch.ones(len(batch), dtype=torch.bool, device=device)
    loss_fn, x = MultiTaskLoss(tasks), torch.from_numpy(batch).to(device)
    cuda = device.startswith("cuda")
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.amp.GradScaler("cuda", enabled=cuda)
    text = f"heads.{model.text_task}." if model.text_task else None  # the decoder gets no loss here
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and not (text and n.startswith(text))}
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.bfloat16):
            features = model.features(x)
            out = {t.name: model.heads[t.name](features) for t in tasks}
            loss, _ = loss_fn(out, targets, None, labelled)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    params = dict(model.named_parameters())
    return losses, [n for n in before if torch.equal(before[n], params[n].detach())]


def check_amp_training(run: Path, batch: np.ndarray) -> list[dict]:
    """The desktop-GPU training path: AMP steps of the student and of the first teacher with a class head."""
    checks = []
    teachers = sorted(RunLayout(run).teachers_dir().glob(f"*/{CHECKPOINT}"))
    for name, path in (("student", RunLayout(run).checkpoint("student")), ("teacher", next(iter(teachers), None))):
        if path is None or not path.is_file():
            checks.append({"name": f"amp training steps ({name})", "ok": None, "detail": "skipped: no checkpoint"})
            continue
        ok, detail = amp_verdict(*amp_steps(path, batch))
        checks.append({"name": f"amp training steps ({name}: {path.parent.name})", "ok": ok, "detail": detail})
    return checks


def check_torch_cuda(run: Path, batch: np.ndarray) -> list[dict]:
    """The student on CUDA: FP16 autocast and a CUDA-graph replay agree with FP32 on top-1."""
    import torch

    from train.models.saved import load_model

    model, _ = load_model(RunLayout(run).checkpoint("student"))
    model = model.cuda().eval()
    x = torch.from_numpy(batch).cuda()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.float16):
            half = model(x)
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static)
        graph.replay()
    firsts = [k for k, v in ref.items() if v.is_floating_point()] if isinstance(ref, dict) else []
    top1 = min((_top1(half[k].float().cpu().numpy(), ref[k].cpu().numpy()) for k in firsts), default=1.0)
    same = all(torch.equal(captured[k], ref[k]) or torch.allclose(captured[k], ref[k], atol=1e-5) for k in firsts)
    return [{"name": "torch cuda fp16 autocast", "ok": top1 >= TOP1_FLOOR["fp16"], "detail": f"top-1 {top1:.3f}"},
            {"name": "torch cuda graph replay", "ok": same, "detail": "equals eager FP32" if same else "differs"}]


def check_ort_cuda(run: Path, batch: np.ndarray) -> list[dict]:
    import onnxruntime as ort

    from deploy.runtime import OrtBackend

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [{"name": "ort cuda provider", "ok": None, "detail": "skipped: onnxruntime has no CUDA provider"}]
    path = RunLayout(run).onnx("student")
    cpu = OrtBackend(path, providers=["CPUExecutionProvider"]).run(batch)
    gpu = OrtBackend(path, providers=["CUDAExecutionProvider"]).run(batch)
    max_abs = max(float(np.abs(gpu[k] - cpu[k]).max()) for k in cpu if cpu[k].dtype.kind == "f")
    return [{"name": "ort cuda vs cpu", "ok": max_abs <= 1e-3, "detail": f"max |dp| {max_abs:.2e}"}]


def to_markdown(report: dict) -> str:
    words = {True: "pass", False: "FAIL", None: "skipped"}
    lines = [f"# GPU check: {report['machine'].get('gpu')}", "",
             *table_lines(["check", "result", "detail"],
                          ([c["name"], words[c["ok"]], c["detail"]] for c in report["checks"]))]
    return "\n".join(lines) + "\n"


def _guarded(name: str, fn: Callable[[], list[dict]]) -> list[dict]:
    """A check section that raises is one failed row with its error, so the rest still runs."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table, not swallowed
        return [{"name": name, "ok": False, "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder with onnx/ and student/ (make export, compress)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    reason = cuda_reason()
    if reason:
        raise UserError(f"gpu-check needs an NVIDIA GPU with CUDA: {reason}")
    size = read_sidecar(RunLayout(args.run).onnx("student")).preprocessing.size
    batch = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    checks = _guarded("torch cuda", lambda: check_torch_cuda(args.run, batch))
    checks += _guarded("ort cuda", lambda: check_ort_cuda(args.run, batch))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        checks.append({"name": "tensorrt engines", "ok": None, "detail": "skipped: tensorrt not installed"})
    else:
        checks += _guarded("tensorrt", lambda: check_tensorrt(args.run, args.out, batch))
    checks += _guarded("amp training steps", lambda: check_amp_training(args.run, batch))
    report = {"machine": describe_machine(), "checks": checks}
    atomic_write_text(args.out / "gpu_check.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(args.out / "gpu_check.md", to_markdown(report))
    print(to_markdown(report))
    return 1 if any(c["ok"] is False for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

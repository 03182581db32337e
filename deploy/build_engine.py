"""Build a TensorRT engine from an exported ONNX model, on the device that will run it.

    python -m deploy.build_engine runs/default/onnx/student.int8-tensorrt.onnx --precision int8
    python -m deploy.build_engine student.fp16.onnx --out student.fp16.trt.engine --precision fp16 \\
        --min-batch 1 --opt-batch 1 --max-batch 8 --workspace-mb 1024 --timing-cache trt.cache

Precision:
- int8: the ONNX must carry explicit Q/DQ nodes (compress.quantize, TensorRT flavour). The network is
  created STRONGLY_TYPED, so TensorRT follows the model's own types and Q/DQ placement exactly
  (implicit INT8 calibration is deprecated since TensorRT 10.1).
- fp16: a float ONNX on a normal (weakly typed) network with BuilderFlag.FP16: TensorRT may run any
  layer in FP16 where that is faster.
- fp32: a float ONNX, no flags.
The engine goes to --out (default X.trt.engine next to X.onnx) with its sidecar X.trt.json: the ONNX's
contract plus `extra.tensorrt` (version, GPU, precision, batch profile, build time, ONNX sha256),
which the Predictor checks because engines only run with the TensorRT version and GPU that built them.
The equivalent trtexec command is printed too (for `trtexec --loadEngine` timings, or where only the
TensorRT binaries exist); deploy.predict needs an engine built here, because of the sidecar.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deploy.contract import Contract, ContractError, sidecar_path
from deploy.errors import cli
from deploy.fileio import atomic_write_bytes, sha256_file
from deploy.runtime import ModelError, check_model_file, load_model_contract
from deploy.trt_runtime import TensorRTUnavailable, gpu_name, import_tensorrt

PRECISIONS = ("int8", "fp16", "fp32")


def default_engine_path(onnx_path: str | Path) -> Path:
    """X.onnx -> X.trt.engine (its sidecar X.trt.json must not overwrite the ONNX's X.json)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.trt.engine")


def check_options(precision: str, min_batch: int, opt_batch: int, max_batch: int, workspace_mb: int) -> None:
    """Raise ValueError for option values TensorRT would reject later with a cryptic message."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch sizes need 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if workspace_mb < 1:
        raise ValueError(f"workspace must be >= 1 MiB, got {workspace_mb}")


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, precision: str, size: int,
                    min_batch: int = 1, opt_batch: int = 1, max_batch: int = 8, workspace_mb: int = 1024,
                    timing_cache: str | Path | None = None, input_name: str = "image") -> str:
    """The trtexec command line that builds the same engine as `build_engine`."""
    check_options(precision, min_batch, opt_batch, max_batch, workspace_mb)

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x3x{size}x{size}"

    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={shape(min_batch)}",
             f"--optShapes={shape(opt_batch)}", f"--maxShapes={shape(max_batch)}",
             f"--memPoolSize=workspace:{workspace_mb}M"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    parts += {"int8": ["--stronglyTyped"], "fp16": ["--fp16"], "fp32": []}[precision]
    return " ".join(shlex.quote(p) for p in parts)


def _describe_network(network, log: Callable[[str], None]) -> None:
    for kind, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            log(f"network {kind} {tensor.name!r}: shape {list(tensor.shape)}, dtype {tensor.dtype}")


def _has_qdq(trt, network) -> bool:
    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in qdq for i in range(network.num_layers))


def _is_legacy(trt) -> bool:
    """TensorRT 8.x (JetPack 5): explicit batch must be requested and there is no strong typing."""
    return int(trt.__version__.split(".")[0]) < 10


def _parse(trt, builder, logger, onnx_path: Path, precision: str):
    """Parse the ONNX into a network (strongly typed for int8); every parser error is reported."""
    if _is_legacy(trt):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    else:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "int8" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
    has_qdq = _has_qdq(trt, network)
    if precision == "int8" and not has_qdq:
        raise ModelError(f"{onnx_path}: --precision int8 needs a Q/DQ model (the TensorRT-flavour INT8 ONNX from "
                         "`make compress`); this one has no QuantizeLinear/DequantizeLinear nodes")
    if precision != "int8" and has_qdq:
        raise ModelError(f"{onnx_path}: this is a Q/DQ (INT8) model: build it with --precision int8")
    return network, parser


def build_engine(onnx_path: str | Path, engine_path: str | Path | None = None, precision: str = "fp16",
                 min_batch: int = 1, opt_batch: int = 1, max_batch: int = 8, workspace_mb: int = 1024,
                 timing_cache: str | Path | None = None, verbose: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Build and write X.engine + its sidecar; returns the engine path. Needs tensorrt and pycuda."""
    check_options(precision, min_batch, opt_batch, max_batch, workspace_mb)
    onnx_path = check_model_file(onnx_path)
    engine_path = Path(engine_path) if engine_path else default_engine_path(onnx_path)
    if sidecar_path(engine_path) == sidecar_path(onnx_path):
        raise ValueError(f"{engine_path}: its sidecar would overwrite {sidecar_path(onnx_path)}; choose another "
                         f"name, e.g. {default_engine_path(onnx_path).name}")
    contract = load_model_contract(onnx_path)
    trt = import_tensorrt()
    gpu = gpu_name()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, precision)  # the parser must outlive the build
    _describe_network(network, log)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16" or (precision == "int8" and _is_legacy(trt)):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and _is_legacy(trt):  # weakly typed Q/DQ: INT8 where the Q/DQ nodes say so
        config.set_flag(trt.BuilderFlag.INT8)
    size, name = contract.preprocessing.size, contract.input_name
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (min_batch, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"building {precision} engine for {gpu} with TensorRT {trt.__version__} (batch {min_batch}..{max_batch})")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build the engine; see its log above "
                           "(rerun with --verbose for details)")
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    engine_contract = Contract.from_dict(contract.to_dict())
    engine_contract.extra["tensorrt"] = {
        "version": trt.__version__, "gpu": gpu, "precision": precision, "min_batch": min_batch,
        "opt_batch": opt_batch, "max_batch": max_batch, "build_seconds": round(seconds, 2),
        "onnx_sha256": sha256_file(onnx_path)}
    engine_contract.save(sidecar_path(engine_path))
    log(f"wrote {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB) and {sidecar_path(engine_path)} "
        f"in {seconds:.1f} s")
    return engine_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.build_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", type=Path, help="exported ONNX model (with its sidecar or embedded contract)")
    p.add_argument("--out", type=Path, help="engine path (default: X.trt.engine next to X.onnx)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit in MiB")
    p.add_argument("--timing-cache", type=Path, help="reuse/update this timing cache file (faster rebuilds)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine_path = args.out or default_engine_path(args.onnx)
    try:
        contract = load_model_contract(args.onnx)
        command = trtexec_command(args.onnx, engine_path, args.precision, contract.preprocessing.size,
                                  args.min_batch, args.opt_batch, args.max_batch, args.workspace_mb,
                                  args.timing_cache, contract.input_name)
    except (ModelError, ContractError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"equivalent trtexec command:\n  {command}")
    try:
        build_engine(args.onnx, engine_path, args.precision, args.min_batch, args.opt_batch, args.max_batch,
                     args.workspace_mb, args.timing_cache, verbose=args.verbose)
    except TensorRTUnavailable as exc:
        print(f"error: cannot build the engine here: {exc}", file=sys.stderr)
        return 2
    except (ModelError, ContractError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

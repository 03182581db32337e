"""Build a TensorRT engine from an exported ONNX model, on the device that will run it.

    python -m deploy.build_engine runs/default/onnx/student.int8-tensorrt.onnx --precision int8
    python -m deploy.build_engine student.fp16.onnx --out student.fp16.trt.engine --precision fp16 \\
        --min-batch 1 --opt-batch 1 --max-batch 8 --workspace-mb 1024 --timing-cache trt.cache

Every precision is a strongly typed build on TensorRT 10 and 11 (weak typing and the FP16/INT8 builder
flags are deprecated since 10.12 and removed in 11): the ONNX's own types decide, so
- int8 takes the Q/DQ ONNX (compress.quantize, TensorRT flavour): INT8 exactly where its Q/DQ nodes say;
- fp16 takes the FP16-typed ONNX (`<model>.fp16.onnx` from `make compress`);
- fp32 takes the float ONNX, with TF32 cleared so the engine computes in true FP32 on Ampere and later.
On TensorRT 8.x (JetPack 5) there is no strong typing: a weakly typed network with the FP16 (and INT8
for Q/DQ models) builder flags.
The engine goes to --out (default X.trt.engine next to X.onnx) with its sidecar X.trt.json: the ONNX's
contract plus `extra.tensorrt` (version, GPU, precision, batch profile, build time, ONNX sha256),
which the Predictor checks because engines only run with the TensorRT version and GPU that built them.
The equivalent trtexec command for this TensorRT version is printed too (`--trtexec-only` prints it
without building, e.g. where tensorrt is not installed: `--trt-version` picks the flags).
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from deploy.backend import ModelError, check_model_file
from deploy.contract import Contract, sidecar_path, write_sidecar
from deploy.errors import RunFailed, UserError, cli
from deploy.fileio import atomic_write_bytes, sha256_file
from deploy.runtime import load_model_contract
from deploy.trt_runtime import gpu_name, import_tensorrt, trt_major

PRECISIONS = ("int8", "fp16", "fp32")
DEFAULT_TRT_VERSION = "10.3"  # JetPack 6: what --trtexec-only assumes without tensorrt or --trt-version


def default_engine_path(onnx_path: str | Path) -> Path:
    """X.onnx -> X.trt.engine (its sidecar X.trt.json must not overwrite the ONNX's X.json)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.trt.engine")


def check_options(precision: str, min_batch: int, opt_batch: int, max_batch: int, workspace_mb: int) -> None:
    """Raise UserError for option values TensorRT would reject later with a cryptic message."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(f"batch sizes need 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if workspace_mb < 1:
        raise UserError(f"workspace must be >= 1 MiB, got {workspace_mb}")


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise UserError(f"TensorRT version must look like 10.3 or 11.0, got {version!r}") from None


def trtexec_precision_flags(precision: str, major: int) -> list[str]:
    """trtexec flags that build the same precision as `build_engine` on TensorRT `major`."""
    if major < 10:  # 8.x: weakly typed, precision by flags
        return {"int8": ["--int8", "--fp16"], "fp16": ["--fp16"], "fp32": []}[precision]
    # 10.x needs --stronglyTyped; on 11.x strong typing is always on and the flag is a no-op.
    typed = ["--stronglyTyped"] if major == 10 else []
    return typed + (["--noTF32"] if precision == "fp32" else [])


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, precision: str, size: int,
                    min_batch: int = 1, opt_batch: int = 1, max_batch: int = 8, workspace_mb: int = 1024,
                    timing_cache: str | Path | None = None, input_name: str = "image",
                    trt_version: str = DEFAULT_TRT_VERSION) -> str:
    """The trtexec command line that builds the same engine as `build_engine` on that TensorRT version."""
    check_options(precision, min_batch, opt_batch, max_batch, workspace_mb)
    major = _major(trt_version)

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x3x{size}x{size}"

    workspace = f"{workspace_mb}" if major < 10 else f"{workspace_mb}M"  # 8.x: plain MiB
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={shape(min_batch)}",
             f"--optShapes={shape(opt_batch)}", f"--maxShapes={shape(max_batch)}",
             f"--memPoolSize=workspace:{workspace}"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    parts += trtexec_precision_flags(precision, major)
    return " ".join(shlex.quote(p) for p in parts)


def _describe_network(network, log: Callable[[str], None]) -> None:
    for kind, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            log(f"network {kind} {tensor.name!r}: shape {list(tensor.shape)}, dtype {tensor.dtype}")


def network_flags(trt) -> int:
    """create_network flags: EXPLICIT_BATCH on 8.x; STRONGLY_TYPED on 10.x (and on 11.x, where it is
    accepted but ignored because every network is strongly typed; 0 if a later release drops it)."""
    flags = trt.NetworkDefinitionCreationFlag
    if trt_major(trt) < 10:
        return 1 << int(flags.EXPLICIT_BATCH)
    strongly_typed = getattr(flags, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def model_precision(trt, network) -> str:
    """What the parsed network's own types make it: 'int8' (Q/DQ layers), 'fp16' (HALF tensors), 'fp32'."""
    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    if any(layer.type in qdq for layer in layers):
        return "int8"
    half = trt.DataType.HALF
    if any(layer.get_output(j).dtype == half for layer in layers for j in range(layer.num_outputs)):
        return "fp16"
    return "fp32"


_WHICH_ONNX = {"int8": "the TensorRT-flavour Q/DQ ONNX (<model>.int8-tensorrt.onnx from `make compress`)",
               "fp16": "the FP16 ONNX (<model>.fp16.onnx from `make compress`)",
               "fp32": "the float32 ONNX (<model>.onnx from `make export`)"}


def _parse(trt, builder, logger, onnx_path: Path, precision: str):
    """Parse the ONNX into a network; every parser error is reported; the model's types must match."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
    found = model_precision(trt, network)
    # TensorRT 8.x builds fp16 from a float32 model by flag; strongly typed builds cannot.
    if found != precision and not (trt_major(trt) < 10 and precision == "fp16" and found == "fp32"):
        raise ModelError(f"{onnx_path}: --precision {precision} needs {_WHICH_ONNX[precision]}, but this model "
                         f"is {found} (strongly typed builds take their precision from the model's types): "
                         f"pass {_WHICH_ONNX[precision].split(' (')[0]} or use --precision {found}")
    return network, parser


def configure(trt, builder, precision: str, workspace_mb: int):
    """A builder config for `precision` on this TensorRT version (no removed flag is ever touched)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if trt_major(trt) < 10:  # weak typing: FP16 (and INT8 where the Q/DQ nodes say so) by flag
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    # Layer types and precisions in the engine, for the inspector (gpu-check: "INT8 layers run in Int8").
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if precision == "fp32":  # TF32 is on by default on Ampere and later: a "fp32" engine would not be
        config.clear_flag(trt.BuilderFlag.TF32)
    return config


def build_engine(onnx_path: str | Path, engine_path: str | Path | None = None, precision: str = "fp16",
                 min_batch: int = 1, opt_batch: int = 1, max_batch: int = 8, workspace_mb: int = 1024,
                 timing_cache: str | Path | None = None, verbose: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Build and write X.engine + its sidecar; returns the engine path. Needs tensorrt and a CUDA binding."""
    check_options(precision, min_batch, opt_batch, max_batch, workspace_mb)
    onnx_path = check_model_file(onnx_path)
    engine_path = Path(engine_path) if engine_path else default_engine_path(onnx_path)
    if sidecar_path(engine_path) == sidecar_path(onnx_path):
        raise UserError(f"{engine_path}: its sidecar would overwrite {sidecar_path(onnx_path)}; choose another "
                        f"name, e.g. {default_engine_path(onnx_path).name}")
    contract = load_model_contract(onnx_path)
    trt = import_tensorrt()
    gpu = gpu_name()
    try:
        serialized, seconds, cache = _build(trt, onnx_path, contract, precision, min_batch, opt_batch, max_batch,
                                            workspace_mb, timing_cache, verbose, gpu, log)
    except AttributeError as exc:  # an API this TensorRT lacks: say which version, not a traceback
        raise RunFailed(f"TensorRT {trt.__version__} lacks an API this builder uses ({exc}); supported: 8.5, "
                        "10.x and 11.x. Build with trtexec instead (command above)") from exc
    atomic_write_bytes(engine_path, bytes(serialized))
    if timing_cache:
        atomic_write_bytes(Path(timing_cache), bytes(cache.serialize()))
    engine_contract = contract.derive(tensorrt={
        "version": trt.__version__, "gpu": gpu, "precision": precision, "min_batch": min_batch,
        "opt_batch": opt_batch, "max_batch": max_batch, "build_seconds": round(seconds, 2),
        "onnx_sha256": sha256_file(onnx_path)})
    write_sidecar(engine_path, engine_contract)
    log(f"wrote {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB) and {sidecar_path(engine_path)} "
        f"in {seconds:.1f} s")
    return engine_path


def _build(trt, onnx_path: Path, contract: Contract, precision: str, min_batch: int, opt_batch: int,
           max_batch: int, workspace_mb: int, timing_cache, verbose: bool, gpu: str, log):
    """Parse, configure and build; returns (serialized engine, seconds, timing cache)."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, precision)  # the parser must outlive the build
    _describe_network(network, log)
    config = configure(trt, builder, precision, workspace_mb)
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
        raise RunFailed(f"{onnx_path}: TensorRT could not build the engine; see its log above "
                        "(rerun with --verbose for details)")
    return serialized, seconds, config.get_timing_cache()


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
    p.add_argument("--trtexec-only", action="store_true",
                   help="print the equivalent trtexec command and exit (works without tensorrt)")
    p.add_argument("--trt-version", help="TensorRT version the trtexec command is for (default: the installed "
                   f"one, else {DEFAULT_TRT_VERSION})")
    return p


def _installed_trt_version() -> str | None:
    try:
        return str(import_tensorrt().__version__)
    except ModelError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine_path = args.out or default_engine_path(args.onnx)
    installed = _installed_trt_version()
    if installed is None and not args.trtexec_only:
        import_tensorrt()  # raises the one-line "install tensorrt" error before any other output
    version = args.trt_version or installed or DEFAULT_TRT_VERSION
    contract = load_model_contract(args.onnx)
    command = trtexec_command(args.onnx, engine_path, args.precision, contract.preprocessing.size,
                              args.min_batch, args.opt_batch, args.max_batch, args.workspace_mb,
                              args.timing_cache, contract.input_name, version)
    print(f"equivalent trtexec command (TensorRT {version}):\n  {command}")
    if args.trtexec_only:
        return 0
    build_engine(args.onnx, engine_path, args.precision, args.min_batch, args.opt_batch, args.max_batch,
                 args.workspace_mb, args.timing_cache, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

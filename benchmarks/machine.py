"""A description of the machine a benchmark ran on, recorded next to every number it produced.

Absolute milliseconds mean little without the CPU, the core count, the runtime versions and the
threads used; on a Jetson also the board, the power mode (nvpmodel) and whether the clocks were
pinned (jetson_clocks). Everything here is read from /proc, /sys, the Python packages and, when they
exist, the Jetson tools; nothing is required, a missing fact is None.

Peak memory of an artifact is measured in a fresh process (`probe_memory`): the runtime (torch or
onnxruntime) is imported, the peak-RSS mark is reset to the current RSS (Linux /proc/self/clear_refs;
elsewhere the imports' ru_maxrss stays the baseline), then the model is loaded and run 3x at the
largest benchmark batch; model_mb = peak RSS (VmHWM; ru_maxrss where there is no /proc) - baseline.
An in-process RSS delta would be hidden by memory the allocator kept from earlier artifacts.

    python -m benchmarks.machine          # prints the JSON description
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploy.contract import TaskSpec
from deploy.errors import cli
from train.parallel import usable_cores  # one rule; bench.py and architectures.py import it from here

if TYPE_CHECKING:
    from benchmarks.artifacts import Artifact


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return None


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (x86 `model name`, ARM `Hardware`/`Model`)."""
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or None


def pinned_core_list(threads: int | None) -> list[int] | None:
    """The cores a benchmark with `threads` threads is pinned to: the first `threads` usable ones
    (None where affinity cannot be set, e.g. macOS)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return cores[: threads or len(cores)]


@contextmanager
def pinned_cores(threads: int | None) -> Iterator[list[int] | None]:
    """Pin this process (and the runtime threads it starts) to `pinned_core_list(threads)` while timing,
    so the scheduler does not move the threads between runs; the old affinity is restored after."""
    cores = pinned_core_list(threads)
    if cores is None:
        yield None
        return
    before = os.sched_getaffinity(0)
    try:
        _set_affinity(cores)
    except OSError:  # not permitted (some containers): time unpinned rather than not at all
        yield None
        return
    try:
        yield cores
    finally:
        _set_affinity(before)


def _set_affinity(cores) -> None:
    """Every thread of this process (the runtimes' pools exist already; new threads inherit it)."""
    tasks = Path("/proc/self/task")
    for tid in (int(t) for t in os.listdir(tasks)) if tasks.is_dir() else (0,):
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def memory_total_gb() -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo") or "", flags=re.MULTILINE)
    return round(int(match.group(1)) / 1024**2, 2) if match else None


def jetson_model() -> str | None:
    """The board name on a Jetson (device tree), else None."""
    model = _read("/proc/device-tree/model")
    return model if model and ("jetson" in model.lower() or "nvidia" in model.lower()) else None


def _command(args: list[str], timeout: float = 5.0) -> str | None:
    """Output of a diagnostic tool if it is installed and answers quickly, else None."""
    if not shutil.which(args[0]):
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # a broken optional install (missing CUDA libs...) is "not available" here
        return None


def torch_facts() -> dict:
    """torch version, its intra-op threads, and the CUDA device when there is one."""
    try:
        import torch
    except ImportError:
        return {"torch": None}
    facts = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def describe_machine(threads: int | None = None, providers: list[str] | None = None) -> dict:
    """JSON-friendly facts: CPU, cores, memory, OS, Python and runtime versions, threads, providers,
    GPU name, and on Jetsons the board, power mode and clock settings."""
    try:
        import onnxruntime as ort

        ort_facts = {"onnxruntime": ort.__version__, "ort_available_providers": ort.get_available_providers()}
    except ImportError:
        ort_facts = {"onnxruntime": None}
    facts = {
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gb": memory_total_gb(),
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        **ort_facts,
        **torch_facts(),
        "tensorrt": _version("tensorrt"),
        "threads": threads,
        "providers": providers,
        "jetson": jetson_model(),
    }
    if facts["jetson"]:
        facts["nvpmodel"] = _command(["nvpmodel", "-q"])
        facts["l4t_release"] = _read("/etc/nv_tegra_release")  # the JetPack L4T version line
        facts.setdefault("gpu", facts["jetson"])
    return facts


def device_slug(facts: dict) -> str:
    """A folder name for contributed results: the Jetson board, else GPU, else CPU (lower-case, dashed)."""
    name = facts.get("jetson") or facts.get("gpu") or facts.get("cpu") or platform.machine() or "unknown"
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")[:60] or "unknown"


class PowerMeter:
    """Board power through jtop (jetson-stats) when it is installed and its service runs; else inert.

        with PowerMeter() as meter:
            ...                          # the timed runs
            meter.read()                 # {"total_mw": 5120.0, "rails": {...}} or None
    """

    def __init__(self) -> None:
        self._jtop = None

    def __enter__(self) -> PowerMeter:
        try:
            from jtop import jtop  # jetson-stats; only on Jetsons

            self._jtop = jtop()
            self._jtop.start()
        except Exception:  # not installed, service not running, no permission: no power numbers
            self._jtop = None
        return self

    def __exit__(self, *exc) -> None:
        if self._jtop is not None:
            self._jtop.close()
            self._jtop = None

    @property
    def available(self) -> bool:
        return self._jtop is not None

    def read(self) -> dict | None:
        """Current total and per-rail power in mW, or None without jtop."""
        if self._jtop is None:
            return None
        power = self._jtop.power or {}
        total = (power.get("tot") or {}).get("power")
        rails = {name: rail.get("power") for name, rail in (power.get("rail") or {}).items()}
        return {"total_mw": total, "rails": rails}


# --- peak memory of one artifact, in a fresh process --------------------------------------------------
def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if platform.system() == "Darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _status_mb(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _reset_peak() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`), so
    memory the imports used and freed does not hide the model's; returns the baseline in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS") or _maxrss_mb()
    except OSError:  # not Linux, or not permitted: the imports' high-water mark is the baseline
        return _maxrss_mb()


def probe_memory(artifact: Artifact, tasks: list[TaskSpec], threads: int | None, batch: int,
                 providers: list[str] | None = None, device: str = "cpu", timeout: float = 300.0) -> dict:
    """{"runtime_mb", "peak_mb", "model_mb"} of loading `artifact` and running one batch of `batch`,
    measured in a child process (see the module docstring)."""
    request = {"artifact": artifact.to_dict(), "tasks": [t.to_dict() for t in tasks], "threads": threads,
               "batch": batch, "providers": providers, "device": device}
    done = subprocess.run([sys.executable, "-m", "benchmarks.machine", "probe"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {artifact.name} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(request: dict) -> dict:
    from benchmarks.artifacts import Artifact, open_artifact

    artifact = Artifact.from_dict(request["artifact"])
    tasks = [TaskSpec.from_dict(t) for t in request["tasks"]]
    if artifact.format == "pytorch":
        import torch  # noqa: F401  (the runtime belongs to the baseline, not to the model)

        import train.models.saved  # noqa: F401
    else:
        import onnxruntime  # noqa: F401

        import deploy.predictor  # noqa: F401
    runtime = _reset_peak()
    runner = open_artifact(artifact, tasks, None, request["threads"], request["providers"], request["device"])
    batch = np.zeros((request["batch"], 3, runner.spec.size, runner.spec.size), dtype=np.float32)
    for _ in range(3):
        runner.run(batch)
    runner.sync()
    # Not max() with ru_maxrss: on Linux that also holds the *parent's* peak (exec keeps it).
    peak = _status_mb("VmHWM") or _maxrss_mb()
    runner.close()
    return {"runtime_mb": round(runtime, 1), "peak_mb": round(peak, 1), "model_mb": round(peak - runtime, 1)}


def main(argv: list[str] | None = None) -> int:
    """No argument: print this machine's description. `probe`: read a memory-probe request (JSON) on
    stdin and print the measurement (used by benchmarks.bench)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["probe"]:
        print(json.dumps(_probe(json.loads(sys.stdin.read()))))
    elif not argv:
        print(json.dumps(describe_machine(), indent=1))
    else:
        print("usage: python -m benchmarks.machine [probe < request.json]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

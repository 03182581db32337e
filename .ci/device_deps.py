"""CI checks that the device install (pyproject's base dependencies) works where the model runs.

    python .ci/device_deps.py resolve   # pip's resolver: CPython 3.10 aarch64 (JetPack 6), 3.10-3.13 x86-64
    python .ci/device_deps.py oldest    # deploy/ tests under the lowest numpy/Pillow/onnxruntime in range
    python .ci/device_deps.py pins      # constraints/train.txt pins satisfy pyproject's ranges

`resolve` needs the package registries (CI has them) and downloads only metadata-sized pieces; `oldest`
builds a throwaway venv (~20 s with a warm pip cache) and runs the torch-free deploy tests in it.
Exit 0 when every check passes, 1 otherwise, with pip's own error shown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints" / "train.txt"
# JetPack 6 is Ubuntu 22.04 (glibc 2.35): pip there accepts every manylinux tag up to 2.35, and wheels
# use several (onnxruntime >= 1.17 ships manylinux_2_27/2_28 aarch64 only), so list them all.
GLIBC_MINORS = range(17, 36)
TARGETS = [("3.10", "aarch64")] + [(v, "x86_64") for v in ("3.10", "3.11", "3.12", "3.13")]
# The deploy tests that need neither torch nor the training stack (tests/test_deploy.py builds its
# tiny ONNX with the `onnx` package, which is a test-only dependency here).
DEPLOY_TESTS = ["tests/test_deploy.py", "tests/test_fileio.py", "tests/test_watch.py", "tests/test_trt.py"]


def base_requirements() -> list[Requirement]:
    """The project's base (device) dependencies from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def platform_tags(arch: str) -> list[str]:
    """pip --platform values for a glibc-2.35 Linux on `arch`."""
    return ["manylinux2014_" + arch] + [f"manylinux_2_{m}_{arch}" for m in GLIBC_MINORS]


def resolve(python: str, arch: str, requirements: list[str]) -> dict[str, str]:
    """{name: version} pip would install for CPython `python` on `arch`; RuntimeError with pip's error."""
    with tempfile.TemporaryDirectory() as target, tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
               "--only-binary=:all:", "--python-version", python, "--target", target, "--report", str(report)]
        for tag in platform_tags(arch):
            cmd += ["--platform", tag]
        done = subprocess.run(cmd + requirements, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            raise RuntimeError("\n  ".join(errors) or done.stderr.strip()[-500:])
        installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}


def check_resolve() -> bool:
    requirements = [str(r) for r in base_requirements()]
    ok = True
    for python, arch in TARGETS:
        try:
            chosen = resolve(python, arch, requirements)
        except RuntimeError as exc:
            print(f"FAIL CPython {python} {arch}: {exc}")
            ok = False
            continue
        names = [r.name.lower() for r in base_requirements()]
        print(f"ok   CPython {python} {arch}: " + ", ".join(f"{n}=={chosen[n]}" for n in names))
    return ok


def oldest_pins() -> list[str]:
    """name==lower-bound for every base dependency (each must state a >= bound)."""
    pins = []
    for req in base_requirements():
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if not lows:
            raise SystemExit(f"{req}: a device dependency needs a tested lower bound (>=)")
        pins.append(f"{req.name}=={lows[0]}")
    return pins


def check_oldest(venv: Path | None) -> bool:
    """Run the deploy tests in a venv with the lowest versions in range; report the time it took."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        venv = venv or Path(tmp) / "venv"
        python = venv / "bin" / "python"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pins = oldest_pins()
        # onnx and pytest are test-only; pip picks versions that work with the pinned numpy.
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins, "onnx", "pytest"],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            print(f"FAIL installing {pins}:\n{install.stderr.strip()[-800:]}")
            return False
        setup = time.perf_counter() - start
        tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEPLOY_TESTS],
                               cwd=REPO, capture_output=True, text=True)
        print(tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-800:])
        if tests.returncode != 0:
            print(tests.stdout[-3000:])
    print(f"{'ok  ' if tests.returncode == 0 else 'FAIL'} deploy tests under {', '.join(pins)} "
          f"(venv {setup:.0f} s, total {time.perf_counter() - start:.0f} s)")
    return tests.returncode == 0


def check_pins() -> bool:
    """Every exact pin in constraints/train.txt lies inside pyproject's range for that package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    ranges = {r.name.lower(): r.specifier for r in declared}
    pins = [Requirement(line.split("#")[0]) for line in CONSTRAINTS.read_text().splitlines()
            if line.split("#")[0].strip()]
    bad = [f"{p} is outside pyproject's {p.name}{ranges[p.name.lower()]}" for p in pins
           if p.name.lower() in ranges and not ranges[p.name.lower()].contains(next(iter(p.specifier)).version)]
    unpinned = sorted({r.name for r in declared if r.name.lower() not in {p.name.lower() for p in pins}}
                      - {"pycuda", "cuda-python"})  # device-only extras: built/installed on the device
    for problem in bad + [f"{name} has no pin in {CONSTRAINTS.name}" for name in unpinned]:
        print(f"FAIL {problem}")
    if not bad and not unpinned:
        print(f"ok   {len(pins)} pins in {CONSTRAINTS.relative_to(REPO)} lie inside pyproject's ranges")
    return not bad and not unpinned


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=("resolve", "oldest", "pins", "all"))
    p.add_argument("--venv", type=Path, help="reuse this venv for `oldest` (default: a temporary one)")
    args = p.parse_args(argv)
    checks = {"pins": check_pins, "resolve": check_resolve, "oldest": lambda: check_oldest(args.venv)}
    chosen = list(checks) if args.check == "all" else [args.check]
    results = [checks[name]() for name in chosen]  # run all, so CI shows every failure at once
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

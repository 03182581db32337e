"""Docs that match the code: every `make <target>` and `python -m <module>` command quoted in README.md
and deploy/README.md exists and its flags parse (make -n; the module's own argparse parser, stopped
before the stage runs). Every entry point names itself `python -m <module>` in --help."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "deploy/README.md")
COMMAND = re.compile(r"(?:^|[\s`(])((?:make|python -m) [^`\n#|;&>]*)")


def _code_text(doc: str) -> str:
    """Inline code spans and fenced blocks of a Markdown file: continued lines joined, shell comments
    dropped, placeholders (<name>) made a value."""
    text = re.sub(r"<[^>\n]*>", "x", (REPO / doc).read_text())
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in [*lines, *spans])


def _clean(token: str) -> str:
    """Alternatives into one value a parser accepts: int8|fp16 -> int8."""
    return token.split("|")[0] if "|" in token and not token.startswith("-") else token


def _words(cmd: str) -> list[str]:
    """Shell words, up to a command substitution (its output is not known here)."""
    try:
        words = shlex.split(cmd)
    except ValueError:  # the pattern cut a quoted $(...) short: keep what precedes it
        words = cmd.split()
    cut = next((i for i, w in enumerate(words) if "$(" in w), len(words))
    return [w for w in words[:cut] if w != "..."]


def documented(kind: str) -> list[tuple[str, ...]]:
    """Every distinct documented command of `kind` ('make' or 'python -m'), as argument tuples."""
    found = set()
    for doc in DOCS:
        for cmd in COMMAND.findall(_code_text(doc)):
            if not cmd.startswith(kind):
                continue
            found.add(tuple(_clean(w) for w in _words(cmd)))
    return sorted(found)


MAKE = documented("make")
PYTHON = documented("python -m")


def test_the_docs_quote_commands_of_both_kinds():
    assert len(MAKE) > 10 and len(PYTHON) > 10  # the extraction itself works
    assert ("make", "all") in MAKE and any(c[2] == "deploy.predict" for c in PYTHON)


@pytest.mark.parametrize("command", MAKE, ids=" ".join)
def test_documented_make_commands_exist(command, tmp_path):
    words = [w for w in command[1:] if not re.fullmatch(r"-j|\d+|N", w)]
    if not [w for w in words if "=" not in w]:
        pytest.skip(f"{' '.join(command)}: no target named (an example of make's own flags)")
    # -n prints the recipe without running it; the venv path points nowhere so nothing is installed.
    done = subprocess.run(["make", "-n", "-s", *words, f"VENV={tmp_path}/venv", "DEPLOY_PY=python3"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (command, done.stderr[-500:])
    # A name in .PHONY without a rule is "nothing to be done", not a target.
    assert done.stdout.strip() and "Nothing to be done" not in done.stdout, (command, done.stdout[-300:])


class _Parsed(Exception):
    """Raised instead of running the stage once its arguments parsed."""


@pytest.mark.parametrize("command", PYTHON, ids=" ".join)
def test_documented_python_commands_parse_their_flags(command, monkeypatch):
    module = importlib.import_module(command[2])
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    if len(command) == 3:  # a bare entry-point name (a table cell): its --help must work
        with pytest.raises(SystemExit) as stop:
            module.main(["--help"])
        assert stop.value.code == 0
        return
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(_Parsed):
        module.main(list(command[3:]))


@pytest.mark.parametrize("module", sorted({c[2] for c in PYTHON} | {
    "train.sweep", "train.probe", "benchmarks.gpu_check", "compress.trt_check", "benchmarks.device_bench"}))
def test_help_names_the_program_as_it_is_run(module, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module}")


def test_make_help_lists_pattern_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"^teacher-%\s", out, flags=re.M) and re.search(r"^predict\s", out, flags=re.M)

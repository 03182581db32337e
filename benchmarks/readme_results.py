"""The README's result tables, regenerated from the run files so the docs cannot drift from a run.

    python -m benchmarks.readme_results --config configs/default.yaml [key=value ...] [--check] [--readme README.md]
    make readme-results            # make readme-results CHECK=1: only report the blocks that drifted

Only the text between generated markers is rewritten; everything else stays byte for byte:

    <!-- results:KIND:RUN -->
    (generated: which run file and command produced it, then the table)
    <!-- /results -->

KIND says what the block shows and which run file it is made from (paths from train/layout.py):
summary (summary.json, `make student`: the test table and the student's comparisons), bench
(bench/report.json, `make bench`: the deployed student's accuracy and latency and the headline ratios),
fractions (fractions/fractions.json, `make experiment-fractions`), sweep (sweep/sweep.json, `make
sweep-kd`). RUN is a run name under the config's runs_root (runs/RUN/); without it, the config's own run.
A block whose run file is missing is left as it is, with one warning line naming the stage to run.
A kind with a plot (fractions) also copies the run's PNG to docs/results/<kind>-<run>.png next to the
README, since run folders are not committed, and shows it in the block.
`--check` writes nothing and exits 1 listing the blocks that differ from the run files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import RAN, headline_lines, main_columns, markdown_table
from deploy.contract import TaskSpec
from deploy.errors import UserError, cli
from deploy.fileio import atomic_write_bytes
from train.experiment import ExperimentConfig, add_config_args, config_overrides, load_experiment
from train.fractions import fraction_columns
from train.fractions import table as fractions_markdown
from train.layout import RunLayout
from train.summary import comparison_lines, summary_columns
from train.summary import markdown_table as summary_table
from train.sweep import markdown as sweep_markdown

OPEN = re.compile(r"<!-- results:(?P<kind>[^\s:]+)(?::(?P<run>[^\s:]+))? -->")
CLOSE = "<!-- /results -->"
# A block's plot is copied next to the README (a run folder is not committed) and shown in the block.
FIGURES_DIR = Path("docs") / "results"
# The artifacts of the README's bench block, in this order: the deployed student (FP32 and both INT8
# flavours) against the teacher ensemble and the labels-only baseline, all in ONNX Runtime.
BENCH_ARTIFACTS = ("ensemble.fp32", "student.fp32", "student.int8-cpu", "student.int8-tensorrt", "baseline.int8-cpu")


class BlockError(UserError):
    """A README marker that cannot be regenerated: unknown kind, unclosed block, unreadable run file."""


@dataclass(frozen=True)
class Kind:
    """One kind of block: the run file it is made from, the command that writes it, how it is rendered."""

    source: Callable[[RunLayout], Path]
    command: str
    render: Callable[[dict | list, RunLayout], str]
    figure: Callable[[RunLayout], Path] | None = None  # a plot the stage writes next to `source`
    figure_title: str = ""


@dataclass
class Block:
    """One generated block of the README: what it shows and where its body lies (between the markers)."""

    kind: str
    run: str | None
    start: int  # index of the first body line in the README's lines (= the opening marker's line number)
    end: int  # index of the closing marker line

    @property
    def label(self) -> str:
        return f"results:{self.kind}" + (f":{self.run}" if self.run else "")


# --- renderers: each reuses the formatter of the stage that wrote the file ---------------------------
def _tasks(layout: RunLayout) -> tuple[list[TaskSpec], list]:
    """The tasks (and joint groups) the run was scored on: from its summary.json, else its bench report."""
    for path in (layout.summary("json"), layout.bench_report()):
        if path.is_file():
            data = _read(path)
            if "tasks" in data:
                return [TaskSpec.from_dict(t) for t in data["tasks"]], data.get("joint", [])
    raise BlockError(f"{layout.root}: neither summary.json nor bench/report.json names the run's tasks; "
                     "rerun `make student` (it writes them into summary.json)")


def render_summary(summary: dict, layout: RunLayout) -> str:
    tasks, joint = _tasks(layout)  # summary.json itself, unless it predates its "tasks" key
    return "\n".join([summary_table(summary["rows"], tasks, joint), "", *comparison_lines(summary)])


def bench_columns(report: dict) -> list[tuple[str, str]]:
    """The report's main columns that the README keeps: artifact, size, every metric except ECE, ms/image."""
    tasks = [TaskSpec.from_dict(t) for t in report["tasks"]]
    return [(title, path) for title, path in main_columns(tasks, report["settings"]["batch_sizes"])
            if path in ("name", "size_mb") or path.endswith("per_image_ms")
            or (path.startswith("metrics.") and not path.endswith("/ece"))]


def render_bench(report: dict, layout: RunLayout) -> str:
    named = {r["name"]: r for r in report["artifacts"]}
    shown = [named[n] for n in BENCH_ARTIFACTS if n in named and named[n]["status"] in RAN]
    lines = [markdown_table(shown, bench_columns(report)), ""]
    lines += [f"- `{n}`: {named[n]['status']}" for n in BENCH_ARTIFACTS if n in named and named[n] not in shown]
    return "\n".join([*lines, *headline_lines(report)])


def render_fractions(rows: list, layout: RunLayout) -> str:
    return fractions_markdown(rows, fraction_columns(_tasks(layout)[0]))


def render_sweep(report: dict | list, layout: RunLayout) -> str:
    """sweep.json names its tasks; an older one is a bare list of records, scored on the run's tasks."""
    if isinstance(report, list):
        records, tasks = report, _tasks(layout)[0]
    else:
        records, tasks = report["records"], [TaskSpec.from_dict(t) for t in report["tasks"]]
    return sweep_markdown(records, summary_columns(tasks), "").strip("\n")


KINDS: dict[str, Kind] = {
    "summary": Kind(lambda lay: lay.summary("json"), "make student", render_summary),
    "bench": Kind(lambda lay: lay.bench_report(), "make bench", render_bench),
    "fractions": Kind(lambda lay: lay.fractions_report(), "make experiment-fractions", render_fractions,
                      lambda lay: lay.fractions_report("png"),
                      "Label fractions: KD student, baseline, ensemble, probe"),
    "sweep": Kind(lambda lay: lay.sweep_report(), "make sweep-kd", render_sweep),
}


# --- the README's blocks --------------------------------------------------------------------------
def find_blocks(lines: list[str], where: str = "README.md") -> list[Block]:
    """Every generated block of the README's lines (kept with their line ends). Raises BlockError on an
    unknown kind or a block that is not closed before the next one opens."""
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = OPEN.fullmatch(lines[i].strip())
        if match is None:
            if lines[i].strip() == CLOSE:
                raise BlockError(f"{where} line {i + 1}: {CLOSE} without an opening <!-- results:KIND:RUN -->")
            i += 1
            continue
        kind = match["kind"]
        if kind not in KINDS:
            raise BlockError(f"{where} line {i + 1}: unknown block kind {kind!r} in {lines[i].strip()}; "
                             f"known kinds: {', '.join(KINDS)}")
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip() == CLOSE or OPEN.fullmatch(lines[j].strip())), None)
        if end is None or lines[end].strip() != CLOSE:
            raise BlockError(f"{where} line {i + 1}: block results:{kind} is not closed by {CLOSE}")
        blocks.append(Block(kind, match["run"], i + 1, end))
        i = end + 1
    return blocks


def run_layout(cfg: ExperimentConfig, run: str | None) -> RunLayout:
    """The layout of run `run` next to the config's own run (same runs_root); the config's run for None."""
    return (dataclasses.replace(cfg, name=run) if run else cfg).layout


def _read(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BlockError(f"{path}: cannot read it as JSON ({exc}); rerun the stage that writes it") from exc


def _shown(path: Path) -> str:
    """The path as the README should cite it: relative to the working directory where it lies below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith("..") else rel


def figure_copy(block: Block, cfg: ExperimentConfig) -> tuple[Path, Path] | None:
    """(the run's plot, its copy's path relative to the README's folder) of a block whose kind has a
    plot and whose run wrote it; None otherwise."""
    kind, layout = KINDS[block.kind], run_layout(cfg, block.run)
    source = kind.figure(layout) if kind.figure is not None else None
    if source is None or not source.is_file():
        return None
    return source, FIGURES_DIR / f"{block.kind}-{layout.root.name}{source.suffix}"


def render_block(block: Block, cfg: ExperimentConfig) -> str | None:
    """The block's new body, or None when its run file is missing. It ends in a blank line, so the
    closing marker never reads as a table row or list continuation."""
    kind, layout = KINDS[block.kind], run_layout(cfg, block.run)
    source = kind.source(layout)
    if not source.is_file():
        return None
    body = kind.render(_read(source), layout)
    figure = figure_copy(block, cfg)
    if figure is not None:
        body += f"\n\n![{kind.figure_title}]({figure[1].as_posix()})"
    origin = (f"_Generated by `make readme-results` from `{_shown(source)}` (written by `{kind.command}`); "
              "edit the run, not this block._")
    return f"{origin}\n\n{body}\n\n"


def stale_figures(text: str, cfg: ExperimentConfig, readme_dir: Path,
                  where: str = "README.md") -> dict[str, tuple[Path, Path]]:
    """{block label: (run's plot, copy next to the README)} for each block whose copy is missing or differs."""
    stale = {}
    for block in find_blocks(text.splitlines(keepends=True), where):
        figure = figure_copy(block, cfg)
        if figure is not None:
            copy = readme_dir / figure[1]
            if not copy.is_file() or copy.read_bytes() != figure[0].read_bytes():
                stale[block.label] = (figure[0], copy)
    return stale


def regenerate(text: str, cfg: ExperimentConfig, where: str = "README.md") -> tuple[str, list[str], list[str]]:
    """(new README text, labels of the blocks that changed, warning lines for blocks left as they are)."""
    lines = text.splitlines(keepends=True)
    blocks = find_blocks(lines, where)
    changed, warnings = [], []
    for block in reversed(blocks):  # from the end, so earlier indices stay valid
        body = render_block(block, cfg)
        if body is None:
            source = KINDS[block.kind].source(run_layout(cfg, block.run))
            warnings.append(f"warning: {where} block {block.label} left as it is: {_shown(source)} not found "
                            f"(run `{KINDS[block.kind].command}` first)")
            continue
        if "".join(lines[block.start:block.end]) != body:
            changed.append(block.label)
            lines[block.start:block.end] = body.splitlines(keepends=True)
    return "".join(lines), changed[::-1], warnings[::-1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="the Markdown file to update")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and list the blocks that differ from the run files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_experiment(args.config, config_overrides(args))
    if not args.readme.is_file():
        raise UserError(f"{args.readme} not found; pass --readme PATH")
    text = args.readme.read_bytes().decode("utf-8")  # not read_text: it would turn CRLF into LF
    new, changed, warnings = regenerate(text, cfg, str(args.readme))
    figures = stale_figures(text, cfg, args.readme.parent, str(args.readme))
    changed += [f"{label} (figure)" for label in figures]
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    if args.check:
        if changed:
            print(f"{args.readme}: {len(changed)} block(s) differ from the run files: {', '.join(changed)}; "
                  "run `make readme-results`", flush=True)
            return 1
        print(f"{args.readme}: every block with a run file matches it", flush=True)
        return 0
    for source, copy in figures.values():
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(copy, source.read_bytes())
    if new != text:
        atomic_write_bytes(args.readme, new.encode("utf-8"))
    print(f"{args.readme}: {len(changed)} block(s) rewritten" + (f": {', '.join(changed)}" if changed else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))

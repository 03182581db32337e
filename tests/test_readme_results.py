"""README result blocks regenerated from crafted run files (benchmarks/readme_results.py): a block is
replaced, the text around it is kept byte for byte, --check finds drift, a missing run file leaves its
block with one warning, and an unknown block kind is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import readme_results as rr
from benchmarks.report import build_report
from deploy.contract import TaskSpec
from deploy.errors import cli
from train.experiment import ExperimentConfig

TASKS = [TaskSpec("coarse", "classification", ("normal", "dr", "amd")), TaskSpec("diagnosis", "text")]
BEFORE = "# Title\r\n\nProse with 12.3 that is not generated.\n\n"  # a CRLF line must survive too
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
AFTER = "\nMore prose, trailing spaces   \n<!-- not a results marker -->\n"


def _summary(student_acc: float = 0.9) -> dict:
    rows = {"teacher_coarse": {"coarse/accuracy": 0.8, "coarse/balanced_accuracy": 0.75, "coarse/macro_f1": 0.7},
            "ensemble": {"coarse/accuracy": 0.95, "coarse/balanced_accuracy": 0.9, "coarse/macro_f1": 0.9,
                         "diagnosis/bleu": 60.0},
            "student": {"coarse/accuracy": student_acc, "coarse/balanced_accuracy": 0.85, "coarse/macro_f1": 0.8,
                        "diagnosis/bleu": 55.5}}
    return {"experiment": "default", "tasks": [t.to_dict() for t in TASKS], "joint": [], "rows": rows,
            "deltas_points": {"coarse/accuracy": {"student_minus_ensemble": -5.0, "student_minus_baseline": None}},
            "below_floor": {}, "ensemble_behind_teacher": {"diagnosis/bleu": ["teacher_diagnosis", -0.7]}}


def _record(name: str, ms: float, acc: float) -> dict:
    model, flavour = name.split(".", 1)
    return {"name": name, "model": model, "precision": flavour, "status": "passed", "size_mb": 8.4,
            "metrics": {"coarse/accuracy": acc, "coarse/balanced_accuracy": acc - 0.02, "diagnosis/bleu": 50.0},
            "latency": {"1": {"per_image_ms": ms}, "8": {"per_image_ms": ms / 2}}}


def _report() -> dict:
    records = [_record("ensemble.fp32", 20.0, 0.95), _record("student.fp32", 3.0, 0.9),
               _record("student.int8-cpu", 2.0, 0.89), _record("teacher_coarse.fp32", 5.0, 0.8)]
    return build_report("default", records, TASKS, {}, {"batch_sizes": [1, 8]}, None)


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> ExperimentConfig:
    return ExperimentConfig(runs_root=str(tmp_path / "runs"))


def _readme(tmp_path: Path, body: str = "old table 1.0\n", kind: str = "summary:default") -> Path:
    path = tmp_path / "README.md"
    path.write_bytes((BEFORE + f"<!-- results:{kind} -->\n{body}<!-- /results -->\n" + AFTER).encode())
    return path


def test_a_block_is_replaced_and_the_text_around_it_kept(tmp_path, cfg):
    source = _write(cfg.layout.summary("json"), _summary())
    readme = _readme(tmp_path)
    assert cli(rr.main, ["--config", CONFIG, f"runs_root={cfg.runs_root}",
                         "--readme", str(readme)]) == 0
    text = readme.read_bytes().decode()
    head, rest = text.split("<!-- results:summary:default -->\n")
    body, tail = rest.split("<!-- /results -->\n")
    assert head == BEFORE and tail == AFTER  # byte for byte, the CRLF line included
    assert "old table" not in body
    assert str(source.name) in body.splitlines()[0] and "make student" in body.splitlines()[0]
    assert "| student | 90.0 | 85.0 | 80.0 | 55.5 |" in body  # train.summary.markdown_table's format
    assert "ENSEMBLE BEHIND teacher_diagnosis on diagnosis/bleu: -0.7 points" in body
    assert body.endswith("\n\n")  # a blank line keeps the closing marker out of the table
    # Regenerating again changes nothing.
    assert rr.regenerate(text, cfg)[1] == []


def test_bench_block_keeps_the_deployed_artifacts_and_the_ratios(cfg):
    _write(cfg.layout.bench_dir / "report.json", _report())
    text, changed, warnings = rr.regenerate("<!-- results:bench -->\nold\n<!-- /results -->\n", cfg)
    assert changed == ["results:bench"] and warnings == []
    lines = text.splitlines()
    assert lines[3].startswith("| Artifact | Size (MB) | coarse acc |") and "ms/im (b8)" in lines[3]
    names = [line.split(" | ")[0][2:] for line in lines[5:8]]
    assert names == ["ensemble.fp32", "student.fp32", "student.int8-cpu"]  # no teacher, in README order
    assert "| 2.00 | 1.00 |" in lines[7]  # ms/image at batch 1 and 8 of the INT8 student
    assert any(line.startswith("- ensemble / student latency (batch 1): 6.7x") for line in lines)


def test_check_lists_drift_and_writes_nothing(tmp_path, cfg, capsys):
    _write(cfg.layout.summary("json"), _summary())
    readme = _readme(tmp_path)
    args = ["--config", CONFIG, f"runs_root={cfg.runs_root}", "--readme", str(readme)]
    before = readme.read_bytes()
    assert cli(rr.main, [*args, "--check"]) == 1
    assert "results:summary:default" in capsys.readouterr().out and readme.read_bytes() == before
    assert cli(rr.main, args) == 0
    assert cli(rr.main, [*args, "--check"]) == 0  # in step with the run files
    _write(cfg.layout.summary("json"), _summary(student_acc=0.91))  # a new run
    assert cli(rr.main, [*args, "--check"]) == 1


def test_a_missing_run_file_leaves_the_block_with_one_warning(tmp_path, cfg, capsys):
    readme = _readme(tmp_path, kind="fractions:default-frac015")
    before = readme.read_bytes()
    assert cli(rr.main, ["--config", CONFIG, f"runs_root={cfg.runs_root}",
                         "--readme", str(readme)]) == 0
    assert readme.read_bytes() == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results:fractions:default-frac015" in err[0]
    assert "default-frac015/fractions/fractions.json" in err[0] and "make experiment-fractions" in err[0]


def test_fractions_and_sweep_blocks_use_their_stages_tables(cfg):
    _write(cfg.layout.summary("json"), _summary())
    _write(cfg.layout.fractions_dir / "fractions.json",
           [{"fraction": 0.15, "model": "student", "coarse/accuracy": 0.8, "diagnosis/bleu": 40.0}])
    _write(cfg.layout.sweep_dir / "sweep.json",
           [{"point": "a0.9", "alpha": 0.9, "temperature": None, "schedule": "joint", "weighting": "mean",
             "labelled_share": None, "val_score": 0.8, "val": {"coarse/accuracy": 0.9}, "steps": 10}])
    text = "<!-- results:fractions -->\n<!-- /results -->\n<!-- results:sweep -->\n<!-- /results -->\n"
    new, changed, _ = rr.regenerate(text, cfg)
    assert changed == ["results:fractions", "results:sweep"]
    assert "| 15% | student | 80.0 | — | 40.0 |" in new
    assert "| a0.9 | 0.9 | config | joint | mean | natural | 0.8000 | 90.0 |" in new


def test_a_run_that_only_swept_gets_its_sweep_block_from_sweep_json_alone(cfg):
    """No summary.json nor bench report: the sweep's own file names the tasks (an older bare list
    of records needs the run's summary.json, and says so)."""
    records = [{"point": "a0.9-S0", "alpha": 0.9, "temperature": None, "schedule": "joint", "weighting": "mean",
                "labelled_share": None, "seed": 0, "val_score": 0.8, "val": {"coarse/accuracy": 0.9}, "steps": 10}]
    _write(cfg.layout.sweep_dir / "sweep.json", {"tasks": [t.to_dict() for t in TASKS], "records": records})
    new, changed, _ = rr.regenerate("<!-- results:sweep -->\n<!-- /results -->\n", cfg)
    assert changed == ["results:sweep"] and "| a0.9-S0 | 0.9 | config | joint | mean | natural | 0 | 0.8000 | 90.0 |" in new
    header = next(line for line in new.splitlines() if line.startswith("| point |"))
    assert header.endswith("| val score | coarse acc | coarse bal. acc | coarse macro-F1 | diagnosis BLEU | steps |")
    _write(cfg.layout.sweep_dir / "sweep.json", records)
    with pytest.raises(rr.BlockError, match="summary.json"):
        rr.regenerate("<!-- results:sweep -->\n<!-- /results -->\n", cfg)


def test_the_fractions_plot_is_copied_next_to_the_readme_and_shown(tmp_path, cfg):
    _write(cfg.layout.summary("json"), _summary())
    _write(cfg.layout.fractions_dir / "fractions.json", [{"fraction": 0.15, "model": "student", "coarse/accuracy": 0.8}])
    plot = cfg.layout.fractions_report("png")
    plot.write_bytes(b"\x89PNG first run")
    readme = _readme(tmp_path, kind="fractions")
    args = ["--config", CONFIG, f"runs_root={cfg.runs_root}", "--readme", str(readme)]
    assert cli(rr.main, [*args, "--check"]) == 1  # the block and its figure are stale
    assert cli(rr.main, args) == 0
    copy = tmp_path / "docs" / "results" / "fractions-default.png"
    assert copy.read_bytes() == plot.read_bytes()
    assert f"![{rr.KINDS['fractions'].figure_title}](docs/results/fractions-default.png)" in readme.read_text()
    assert cli(rr.main, [*args, "--check"]) == 0
    plot.write_bytes(b"\x89PNG second run")  # same table, a new plot: only the figure drifted
    assert cli(rr.main, [*args, "--check"]) == 1
    assert cli(rr.main, args) == 0 and copy.read_bytes() == plot.read_bytes()


@pytest.mark.parametrize("text, message", [
    ("<!-- results:sumary:default -->\nx\n<!-- /results -->\n", "unknown block kind 'sumary'"),
    ("<!-- results:summary -->\nx\n", "not closed"),
    ("x\n<!-- /results -->\n", "without an opening"),
])
def test_bad_markers_are_one_clear_error(tmp_path, cfg, capsys, text, message):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert cli(rr.main, ["--config", CONFIG, f"runs_root={cfg.runs_root}",
                         "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert readme.read_text() == text


def test_the_projects_readme_blocks_parse():
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines(keepends=True)
    kinds = {(b.kind, b.run) for b in rr.find_blocks(lines)}
    assert {("summary", "default"), ("bench", "default")} <= kinds

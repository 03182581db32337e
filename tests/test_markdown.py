"""deploy/markdown.py: the one Markdown table writer of every report."""

from __future__ import annotations

import re

from benchmarks.device_bench import to_markdown as device_markdown
from benchmarks.gpu_check import to_markdown as gpu_check_markdown
from compress.quantize import markdown as compress_markdown
from deploy.markdown import escape_cell, table_head, table_lines, table_row
from train.stage_times import stage_table_markdown


def _cells(line: str) -> list[str]:
    """The cells of a table row as a Markdown renderer splits them (`\\|` stays inside its cell)."""
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


def test_a_row_keeps_a_pipe_and_a_line_break_inside_its_cell():
    row = table_row(["a", "max |dp| 1e-4", "line one\nline two"])
    assert row == "| a | max \\|dp\\| 1e-4 | line one line two |"
    assert _cells(row) == ["a", "max \\|dp\\| 1e-4", "line one line two"]
    assert escape_cell(3) == "3"


def test_an_empty_cell_is_one_space_and_zero_is_not_empty():
    assert table_row(["**total**", "", 0]) == "| **total** | | 0 |"


def test_the_separator_has_one_column_per_title_and_right_aligns_the_named_ones():
    head = table_head(["stage", "minutes", "share", "status"], right=(1, 2))
    assert head == ["| stage | minutes | share | status |", "|---|---:|---:|---|"]
    assert table_head(["a", "b"])[1] == "|---|---|"


def test_a_whole_table_is_its_head_and_one_line_per_row():
    lines = table_lines(["model", "acc"], [["student", "91.0"], ["baseline", "88.9"]])
    assert lines == ["| model | acc |", "|---|---|", "| student | 91.0 |", "| baseline | 88.9 |"]


def tables_of(text: str) -> list[list[list[str]]]:
    """Every Markdown table in `text` (runs of `|` lines), each checked to be well formed: a separator of
    `---` / `---:` under its header and every row as wide as the header. Returns the tables' cells."""
    tables, run = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            run.append(_cells(line))
            continue
        if run:
            head, sep, *rows = run
            assert sep and all(re.fullmatch(r"---:?", c) for c in sep), (head, sep)
            assert len(sep) == len(head) and all(len(r) == len(head) for r in rows), run
            tables.append(run)
        run = []
    return tables


def test_reports_keep_every_row_as_wide_as_their_header():
    """An error message or a detail with a `|` used to split its cell and shift the row."""
    gpu = gpu_check_markdown({"machine": {"gpu": "H200"},
                              "checks": [{"name": "ort cuda vs cpu", "ok": True, "detail": "max |dp| 1.0e-05"}]})
    compress = compress_markdown({"student": {"error": "onnx|check failed\nat node 3"}, "baseline": {"flavours": {
        "int8-cpu": {"status": "passed", "size_mb": 1.5, "drops": {}, "attempts": [{"passed": True}],
                     "kept": {"method": "minmax", "images": 500, "float_layers": ["a", "b"]}}}}})
    stages = stage_table_markdown({"teachers": {"stage": "teachers", "seconds": 180.0, "status": "done"},
                                   "student": {"stage": "student", "seconds": 60.0, "status": "ok"}})
    device = device_markdown([{"model": "student", "backend": "trt", "p50_ms": 1.234, "p90_ms": 2.5,
                               "images_per_s": 800.0, "gpu_memory_mb": None, "energy_mj_per_image": None,
                               "energy_note": "no jtop"}], {"gpu": "Orin"})
    for text in (gpu, compress, stages, device):
        assert len(tables_of(text)) == 1 and len(tables_of(text)[0]) >= 3, text
    assert tables_of(stages)[0][1] == ["---", "---:", "---:", "---"]
    assert tables_of(compress)[0][3][5:] == ["minmax, 500 img", "2", "1"]
    assert tables_of(device)[0][2] == ["student", "trt", "1.23", "2.50", "800.0", "", "no jtop"]


def test_a_trained_runs_summary_and_ensemble_report_are_well_formed(trained_run):
    """summary.md (results, intervals, any-disease tables) and the ensemble's combination.md."""
    import json

    from train.experiment import load_experiment

    cfg = load_experiment(trained_run.config)
    summary = json.loads(cfg.layout.summary("json").read_text())
    tables = tables_of(cfg.layout.summary("md").read_text())
    assert len(tables) >= 3 and tables[0][0][0] == "model" and len(tables[0][0]) == len(tables[1][0])
    assert [r[0] for r in tables[0][2:]] == list(summary["rows"])
    record = json.loads((cfg.run_dir / "ensemble" / "combination.json").read_text())
    combination = tables_of((cfg.run_dir / "ensemble" / "combination.md").read_text())
    assert len(combination) == len(record["report"])
    for table, rep in zip(combination, record["report"].values()):
        assert [r[:3] for r in table[2:]] == [[t, f"{rep['temperature'][i]:.3f}", f"{rep['weight'][i]:.3f}"]
                                             for i, t in enumerate(rep["teachers"])]

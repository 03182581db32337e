"""deploy/markdown.py: the one Markdown table writer of every report."""

from __future__ import annotations

import re

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


def test_reports_keep_every_row_as_wide_as_their_header():
    """An error message or a detail with a `|` used to split its cell and shift the row."""
    gpu = gpu_check_markdown({"machine": {"gpu": "H200"},
                              "checks": [{"name": "ort cuda vs cpu", "ok": True, "detail": "max |dp| 1.0e-05"}]})
    compress = compress_markdown({"student": {"error": "onnx|check failed\nat node 3"}})
    stages = stage_table_markdown({"teachers": {"stage": "teachers", "seconds": 180.0, "status": "done"}})
    for text in (gpu, compress, stages):
        rows = [line for line in text.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, text
        assert {len(_cells(r)) for r in rows} == {len(_cells(rows[0]))}, text

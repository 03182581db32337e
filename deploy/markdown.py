"""Markdown tables: the one way every report writes them (summary, sweep, fractions, compress, bench,
verdict, the device benchmark). Torch-free and in deploy/ so that every wing, and the benchmark that
runs on the device, can import it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def escape_cell(value: object) -> str:
    """`value` as text that stays on one line and in one cell: a line break would end the table and a
    bare `|` would split the cell (an error message, `max |dp|`)."""
    return str(value).replace("\n", " ").replace("|", "\\|")


def table_row(cells: Iterable[object]) -> str:
    """`| a | b |`; an empty cell is `| |`."""
    return "|" + "|".join(f" {text} " if text else " " for text in map(escape_cell, cells)) + "|"


def table_head(titles: Sequence[str], right: Collection[int] = ()) -> list[str]:
    """The header row and its separator, one `---` per column; the columns at the indexes in `right`
    are right-aligned (`---:`)."""
    return [table_row(titles), "|" + "".join("---:|" if i in right else "---|" for i in range(len(titles)))]


def table_lines(titles: Sequence[str], rows: Iterable[Iterable[object]], right: Collection[int] = ()) -> list[str]:
    """A whole table: `table_head` and one `table_row` per row."""
    return [*table_head(titles, right), *map(table_row, rows)]

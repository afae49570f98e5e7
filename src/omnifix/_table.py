"""Tables for people: one set of rows, rendered as plain text or as ``rich`` tables.

Reports and ``omnifix doctor`` build their output as blocks (sentences and :class:`Table` s);
:func:`plain` and :func:`rich` render the same cells, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence  # noqa: TC003 - dataclass fields, read at runtime
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from rich.console import Group

__all__ = ["Block", "Table", "plain", "rich"]


def _no_style(_column: str, _text: str) -> str:
    return ""


@dataclass(frozen=True)
class Table:
    """Rows of text cells under column names.

    Attributes:
        columns: The column names.
        rows: The cells, one tuple per row, as many cells as columns.
        title: A line above the table (``""``: none).
        style: ``(column, cell text) -> rich style`` (``""``: none); plain text has no style.
        fold: Columns whose long cells rich may fold onto more lines; the others stay whole.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""
    style: Callable[[str, str], str] = _no_style
    fold: frozenset[str] = frozenset()

    def lines(self) -> list[str]:
        """The plain-text lines: the title, then columns aligned by two spaces, or ``none``."""
        head = [self.title] if self.title else []
        if not self.rows:
            return [*head, "none"]
        rows = [self.columns, *self.rows]
        widths = [max(len(row[column]) for row in rows) for column in range(len(self.columns))]
        return head + [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]


#: What a report is made of: sentences and tables, top to bottom.
Block: TypeAlias = "str | Table"


def plain(blocks: Sequence[Block]) -> str:
    """The blocks as plain text, one line per sentence."""
    lines: list[str] = []
    for block in blocks:
        lines += block.lines() if isinstance(block, Table) else [block]
    return "\n".join(lines)


def rich(blocks: Sequence[Block]) -> Group:
    """The blocks as a ``rich`` renderable: sentences as text, tables as rich tables."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table as RichTable
    from rich.text import Text

    parts: list[object] = []
    for block in blocks:
        if not isinstance(block, Table):
            parts.append(Text(block, overflow="ignore"))  # a long word (code) stays whole
            continue
        if not block.rows:
            parts += [Text(block.title, style="bold"), Text("none")] if block.title else ["none"]
            continue
        table = RichTable(
            *block.columns,
            title=escape(block.title) or None,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for index, (name, rich_column) in enumerate(zip(block.columns, table.columns, strict=True)):
            rich_column.overflow = "fold"  # never "…": a cut number or name misleads
            rich_column.no_wrap = name not in block.fold
            # Wrapped at spaces only: no cell narrower than its longest word (or its name).
            words = [name, *(word for row in block.rows for word in row[index].split())]
            rich_column.min_width = max(map(len, words))
        for row in block.rows:
            cells = []
            for column, text in zip(block.columns, row, strict=True):
                style = block.style(column, text)
                cells.append(f"[{style}]{escape(text)}[/{style}]" if style else escape(text))
            table.add_row(*cells)
        parts.append(table)
    return Group(*parts)  # type: ignore[arg-type]

"""The plain-text tables the ``yugami-fleet`` subcommands print."""

from __future__ import annotations

from collections.abc import Sequence


def columns(table: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the header first) as left-aligned columns two spaces apart, no trailing spaces."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)

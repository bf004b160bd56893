"""The archive's one table renderer: a Markdown table whose columns line up in a terminal.

The report (:mod:`crmn.report`), ``status`` (:mod:`crmn.launch.status`), ``params`` and
``bench`` print their tables through :func:`markdown`, so every table of the archive reads the
same on screen and in ``REPORT.md``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence


def markdown_lines(header: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Optional[str] = None) -> List[str]:
    """The lines of a Markdown table: header, rule, one line per row.

    ``align``: one letter per column, ``l`` (default) or ``r``; a right-aligned column gets
    a ``---:`` rule so that rendered Markdown aligns it too.
    """
    cells = [[str(c) for c in row] for row in rows]
    align = align or "l" * len(header)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if a == "r" else v.ljust(w)
                                 for v, w, a in zip(values, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if a == "r" else "-")
                          for w, a in zip(widths, align)) + "|"
    return [line(header), rule, *(line(r) for r in cells)]


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]],
             align: Optional[str] = None) -> str:
    """:func:`markdown_lines` joined into one string."""
    return "\n".join(markdown_lines(header, rows, align))

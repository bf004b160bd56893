"""The archive's one table renderer: a Markdown table whose columns line up in a terminal,
so every table reads the same on screen and in ``REPORT.md``."""
from __future__ import annotations

from typing import List, Optional, Sequence


def markdown_lines(header: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Optional[str] = None) -> List[str]:
    """The lines of a Markdown table; ``align``: a letter per column, ``l`` or ``r``."""
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
    return "\n".join(markdown_lines(header, rows, align))

"""Result tables as lists of dicts (one dict a row) and their CSV / Markdown writers.

Shared by the game-based evaluation (DSRNA, Hosseini et al. 2021, section 5: accuracy under
FGSM, PGD and C&W) and the transfer tables (Szegedy et al. 2014, tables 2-4).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]


def columns(rows: Sequence[Row]) -> list[str]:
    """Column names in first-seen order over all rows."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** (1 - digits):  # e.g. certified radii: 3.2e-05, not 0.0000
            return f"{value:.{digits - 2}e}"
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def to_markdown(rows: Sequence[Row], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table."""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[Row], path: str | os.PathLike[str], digits: int = 4) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_markdown(rows, digits))


def write_csv(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

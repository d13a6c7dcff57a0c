"""The one table writer (GitHub Markdown) and the number formats of what a run shows and writes.

Markdown tables are a few lines of joining; pandas' ``to_markdown`` needs ``tabulate`` (not a dependency)
and Rich draws box tables for terminals, not Markdown, so every report builds its tables here.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A GitHub Markdown table as lines: ``header``, then one line per row (cells as ``str()``).

    ``align``: one letter per column, ``l`` or ``r`` (numbers); missing letters mean ``l``."""
    rule = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def plain_float(value: object) -> object:
    """A float that went through float32 (a torchmetrics value) as the float32's shortest repr:
    ``0.578000009059906`` -> ``0.578``. Other floats (float64 results) and non-floats are returned as
    they are: a float64 is changed only when float32 holds it exactly, i.e. it came from a float32."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        as32 = np.float32(value)
        if float(as32) == float(value):  # exactly a float32: it came from one
            return float(str(as32))  # numpy prints a float32 as its shortest round-tripping digits
        return float(value)
    return value


def display_number(value: object, digits: int = 4) -> str:
    """A number for a person: ``digits`` significant digits (tau ``1.045``, not ``1.0449005365371704``);
    integers, strings and non-finite floats as they are."""
    if isinstance(value, bool) or not isinstance(value, (float, np.floating)):
        return str(value)
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def csv_text(rows: Sequence[Mapping[str, object]], fieldnames: Sequence[str] | None = None) -> str:
    """``rows`` as CSV text (header first), floats that came from float32 written without its noise."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        writer.writerows({k: plain_float(v) for k, v in r.items()} for r in rows)
    return buf.getvalue()

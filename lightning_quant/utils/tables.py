"""Markdown tables, readable in a terminal and pasteable into a README."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, readable in a terminal and pasteable into a README."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def speed_change(before_ms: float, after_ms: float) -> str:
    """How ``after_ms`` compares with ``before_ms``, in the direction it went: ``"2.49x faster"`` or
    ``"2.10x slower"`` (never ``"0.48x faster"``); ``"same speed"`` when both round to the same 1%."""
    if before_ms <= 0 or after_ms <= 0 or not (before_ms < float("inf") and after_ms < float("inf")):
        raise ValueError(f"speed_change needs two positive finite times, got {before_ms!r} and {after_ms!r}")
    ratio = before_ms / after_ms
    if round(ratio, 2) == 1.0:
        return "same speed"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def speed_against(before_ms: float, after_ms: float, other: str) -> str:
    """:func:`speed_change` against a named other: ``"2.49x faster than fp32"``, ``"the same speed as fp32"``."""
    change = speed_change(before_ms, after_ms)
    return f"the same speed as {other}" if change == "same speed" else f"{change} than {other}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""One table for a whole Hydra multirun: every run's float and int8 figures, sorted, Pareto front marked.

:class:`SweepResults` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``). At the
end of a multirun it reads each run's ``metrics.json`` in the sweep folder and writes
``results.csv`` and ``results.md`` there, and prints the Markdown table. Runs are sorted by
int8 metric (best first); a run is on the Pareto front when no other run is at least as
accurate and at least as fast with one of the two strictly better (accuracy vs int8 latency).
A failed run keeps its row, with its error; it does not stop the table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from typing_extensions import override

from lightning_quant.utils.files import atomic_write_files
from lightning_quant.utils.tables import format_table, speed_change

log = logging.getLogger(__name__)

COLUMNS = (
    "run",
    "overrides",
    "status",
    "float_acc",
    "int8_acc",
    "delta",
    "size_ratio",
    "int8_ms_b1",
    "int8_ms_b32",
    "speedup_b32",
    "pareto",
    "error",
)


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each run's metrics, from ``<sweep_dir>/<job>/metrics.json``, with its job folder name."""
    runs = []
    for path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {err}"}
        runs.append({"run": path.parent.name, **metrics})
    return runs


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(float(value)) else None


def pareto_front(runs: list[dict[str, Any]], metric: str, latency: str) -> set[str]:
    """Names of runs no other run beats on both ``metric`` (higher) and ``latency`` (lower)."""
    points: list[tuple[str, float, float]] = []
    for r in runs:
        m, t = _number(r.get(metric)), _number(r.get(latency))
        if m is not None and t is not None:
            points.append((r["run"], m, t))
    return {
        n
        for n, m, t in points
        if not any(m2 >= m and t2 <= t and (m2 > m or t2 < t) for n2, m2, t2 in points if n2 != n)
    }


def common_overrides(runs: list[dict[str, Any]]) -> list[str]:
    """Overrides every run shares (shown once, not in every row)."""
    sets = [set(r.get("overrides", [])) for r in runs]
    shared = set.intersection(*sets) if sets and len(sets) > 1 else set()
    return [o for o in (runs[0].get("overrides", []) if runs else []) if o in shared]


def results_rows(
    runs: list[dict[str, Any]], metric: str = "int8_acc", latency: str = "int8_ms_b1"
) -> list[dict[str, Any]]:
    """One row per run with the table's columns, sorted by ``metric`` (failed runs last).

    The overrides column lists what defines each run: the overrides all runs share are left out.
    """
    front = pareto_front(runs, metric, latency)
    shared = set(common_overrides(runs))
    rows = []
    for r in runs:
        float_acc, int8_acc = _number(r.get("float_acc")), _number(r.get("int8_acc"))
        # a compiled int8 model (pt2e on x86) is compared with fp32 compiled
        fp32_b32 = _number(r.get("fp32_compiled_ms_b32", r.get("fp32_ms_b32")))
        int8_b32 = _number(r.get("int8_ms_b32"))
        rows.append(
            {
                "run": r["run"],
                "overrides": " ".join(o for o in r.get("overrides", []) if o not in shared) or "-",
                "status": r.get("status", "ok"),
                "float_acc": float_acc,
                "int8_acc": int8_acc,
                "delta": int8_acc - float_acc if float_acc is not None and int8_acc is not None else None,
                "size_ratio": (r["fp32_bytes"] / r["int8_bytes"]) if r.get("int8_bytes") else None,
                "int8_ms_b1": _number(r.get("int8_ms_b1")),
                "int8_ms_b32": int8_b32,
                "speedup_b32": fp32_b32 / int8_b32 if fp32_b32 and int8_b32 else None,
                "pareto": "*" if r["run"] in front else "",
                "error": " ".join(str(r.get("error", "")).split())[:300],
            }
        )

    def order(row: dict[str, Any]) -> tuple[bool, float]:
        value = _number(row.get(metric))
        return row["status"] != "ok", -(value if value is not None else -1.0)

    rows.sort(key=order)
    return rows


def _markdown_cell(row: dict[str, Any], column: str) -> str:
    # results.csv keeps the ratio fp32 / int8 (a number to sort by); the table says it in words, so a
    # slower int8 model reads "2.10x slower", not "0.48x"
    if column == "speedup_b32" and row[column] is not None:
        return speed_change(row[column], 1.0)
    return _cell(row[column])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_results(sweep_dir: Path, metric: str = "int8_acc", latency: str = "int8_ms_b1") -> str:
    """Write ``results.csv`` and ``results.md`` in ``sweep_dir``; return the Markdown table."""
    runs = load_runs(sweep_dir)
    rows = results_rows(runs, metric, latency)
    csv_text = io.StringIO(newline="")
    writer = csv.DictWriter(csv_text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    table = format_table(COLUMNS, [[_markdown_cell(row, c) for c in COLUMNS] for row in rows])
    note = f"Sorted by {metric}; * = Pareto front of {metric} (higher) vs {latency} (lower)."
    shared = common_overrides(runs)
    if shared:
        note += f" Every run: {' '.join(shared)}."
    atomic_write_files(
        {sweep_dir / "results.csv": csv_text.getvalue(), sweep_dir / "results.md": f"{table}\n\n{note}\n"}
    )
    return f"{table}\n{note}"


class SweepResults(Callback):
    """Hydra callback: the results table of a multirun (see the module docstring).

    Args:
        metric: the accuracy-like column to sort by and to put on the Pareto front.
        latency: the latency column of the Pareto front.
    """

    def __init__(self, metric: str = "int8_acc", latency: str = "int8_ms_b1") -> None:
        self.metric, self.latency = metric, latency

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = write_results(sweep_dir, self.metric, self.latency)
        print(f"\nSweep results ({sweep_dir / 'results.md'}):\n{table}")
        runs = load_runs(sweep_dir)
        failed = sum(1 for r in runs if r.get("status") == "failed")
        if runs and failed == len(runs):
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings
            raise SystemExit(
                f"every run of the sweep failed ({failed}); their errors are in {sweep_dir / 'results.md'}"
            )
        if failed:
            log.warning("%d run(s) of the sweep failed; their errors are in the table", failed)

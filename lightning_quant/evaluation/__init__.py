"""What quantization cost and bought: metrics (accuracy, size, latency), per-layer analysis, the report."""

from lightning_quant.evaluation.analysis import next_steps, observer_ranges, per_layer_sqnr
from lightning_quant.evaluation.metrics import (
    classification_accuracy,
    compare,
    comparison_table,
    latency_ms,
    state_dict_bytes,
)
from lightning_quant.evaluation.report import build_report, report_markdown, write_report

__all__ = [
    "build_report",
    "classification_accuracy",
    "compare",
    "comparison_table",
    "latency_ms",
    "next_steps",
    "observer_ranges",
    "per_layer_sqnr",
    "report_markdown",
    "state_dict_bytes",
    "write_report",
]

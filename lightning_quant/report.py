"""Measure what quantization cost and bought: accuracy, size and latency, and print them as a table."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.inputs import ExampleInputs, batch_inputs


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def latency_ms(
    module: nn.Module,
    example: ExampleInputs,
    batch_size: int,
    repeats: int = 50,
    warmup: int = 10,
    engine: Optional[str] = None,
) -> float:
    """Median wall time in milliseconds of one forward pass at ``batch_size``, after ``warmup`` passes."""
    inputs = example.to("cpu").with_batch_size(batch_size)
    module = module.eval()
    times = []
    with quantized_engine(engine or torch.backends.quantized.engine), torch.inference_mode():
        for _ in range(warmup):
            inputs(module)
        for _ in range(repeats):
            start = time.perf_counter()
            inputs(module)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def classification_accuracy(
    module: nn.Module,
    batches: Iterable[Any],
    engine: Optional[str] = None,
    batch_to_input: Optional[Callable[[Any], Any]] = None,
    target_of: Callable[[Any], torch.Tensor] = lambda batch: batch[1],
) -> float:
    """Top-1 accuracy of ``module`` (on CPU) over ``batches`` of ``(input, target)``."""
    correct = total = 0
    module = module.eval()
    with quantized_engine(engine or torch.backends.quantized.engine):
        for batch in batches:
            logits = batch_inputs(batch, batch_to_input).to("cpu")(module)
            target = target_of(batch).cpu()
            correct += int((logits.argmax(dim=-1) == target).sum())
            total += int(target.numel())
    if total == 0:
        raise ValueError("no batches to measure accuracy on")
    return correct / total


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, readable in a terminal and pasteable into a README."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

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


def compare(
    float_model: nn.Module,
    int8_model: nn.Module,
    test_batches: Sequence[Any],
    example: ExampleInputs,
    engine: str,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 50,
    warmup: int = 10,
    float_eval_model: Optional[nn.Module] = None,
    batch_to_input: Optional[Callable[[Any], Any]] = None,
) -> dict[str, Any]:
    """Float vs int8: test accuracy, weight bytes and median latency at each batch size.

    Args:
        float_model: the fp32 model timed and sized.
        int8_model: the quantized model.
        test_batches: ``(input, target)`` batches for accuracy.
        example: inputs for timing (tiled or cut to each batch size).
        engine: quantized engine the int8 model was converted for.
        float_eval_model: the model whose accuracy counts as "float" when it is not
            ``float_model`` (a QAT model with quantization switched off, say).
    """
    metrics: dict[str, Any] = {
        "float_acc": classification_accuracy(float_eval_model or float_model, test_batches, batch_to_input=batch_to_input),
        "int8_acc": classification_accuracy(int8_model, test_batches, engine=engine, batch_to_input=batch_to_input),
        "fp32_bytes": state_dict_bytes(float_model),
        "int8_bytes": state_dict_bytes(int8_model),
    }
    for bs in batch_sizes:
        metrics[f"fp32_ms_b{bs}"] = latency_ms(float_model, example, bs, repeats, warmup)
        metrics[f"int8_ms_b{bs}"] = latency_ms(int8_model, example, bs, repeats, warmup, engine)
    return metrics


def comparison_table(metrics: dict[str, Any], batch_sizes: Sequence[int] = (1, 32)) -> str:
    """The float-vs-int8 table :func:`compare`'s metrics make: accuracy, size, latency per batch size."""
    rows = [
        ("accuracy (test)", f"{metrics['float_acc']:.4f}", f"{metrics['int8_acc']:.4f}",
         f"{metrics['int8_acc'] - metrics['float_acc']:+.4f}"),
        ("weights (bytes)", metrics["fp32_bytes"], metrics["int8_bytes"],
         f"{metrics['fp32_bytes'] / metrics['int8_bytes']:.2f}x smaller"),
    ]
    for bs in batch_sizes:
        fp32, int8 = metrics[f"fp32_ms_b{bs}"], metrics[f"int8_ms_b{bs}"]
        rows.append((f"latency batch {bs} (ms)", f"{fp32:.3f}", f"{int8:.3f}", f"{fp32 / int8:.2f}x faster"))
    return format_table(("", "float", "int8", "change"), rows)

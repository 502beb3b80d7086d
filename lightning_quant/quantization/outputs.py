"""Model outputs as comparable tensors, and how close two models' outputs are.

Shared by everything that compares an int8 model with its float origin: the sensitivity
search, the export reload check and the report.

- :func:`flat_tensors` / :func:`max_abs_diff`: every tensor of a nested output, and the
  largest difference between two outputs;
- :func:`collect_outputs`: a model's first output over many batches, on CPU, dequantized;
- :func:`task_metric`: accuracy (integer targets), MSE, or a torchmetrics ``Metric``;
- :func:`sqnr_db` / :func:`mean_cosine`: signal-to-noise ratio and cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.inputs import batch_inputs


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return flat_tensors(value.to_tuple())
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between two model outputs of the same structure."""
    ta, tb = flat_tensors(a), flat_tensors(b)
    if len(ta) != len(tb) or not ta:
        raise ValueError(f"outputs differ in structure: {len(ta)} tensors vs {len(tb)}")
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(ta, tb))


@torch.inference_mode()
def collect_outputs(
    module: nn.Module,
    batches: Sequence[Any],
    engine: str | None = None,
    batch_to_input: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """The first output tensor of ``module`` on every batch, concatenated (dequantized, on CPU).

    Outputs with more than two dimensions (token vectors) become rows of their last dimension,
    so batches padded to different lengths still line up.
    """
    outputs = []
    module = module.eval()
    with quantized_engine(engine or torch.backends.quantized.engine):
        for batch in batches:
            out = flat_tensors(batch_inputs(batch, batch_to_input).to("cpu")(module))[0]
            out = (out.dequantize() if out.is_quantized else out).float().cpu()
            outputs.append(out.reshape(-1, out.shape[-1]) if out.dim() > 2 else out)
    return torch.cat(outputs)


def task_metric(outputs: torch.Tensor, targets: torch.Tensor, metric: Any = None) -> tuple[str, float]:
    """``(name, value)`` of the task metric: the given torchmetrics ``Metric`` (cloned), else accuracy
    for integer targets (top-1, torchmetrics) or mean squared error otherwise."""
    import torchmetrics

    if metric is not None:
        fresh = metric.clone().cpu()
        fresh.reset()
        return type(metric).__name__, float(fresh(outputs, targets))
    if not targets.is_floating_point() and outputs.dim() >= 2:
        accuracy = torchmetrics.classification.MulticlassAccuracy(outputs.shape[-1], average="micro")
        return "accuracy", float(accuracy(outputs, targets))
    return "mse", float(torchmetrics.functional.mean_squared_error(outputs.float(), targets.float()))


def higher_is_better(metric_name: str) -> bool:
    return metric_name not in ("mse", "MeanSquaredError", "MeanAbsoluteError")


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - test|^2)`` (inf if equal)."""
    reference, test = reference.detach().float(), test.detach().float()
    noise = float((reference - test).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if not math.isfinite(noise):
        return float("-inf")
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def mean_cosine(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows (the last dimension is the vector)."""
    ref = reference.detach().float().flatten(0, -2) if reference.dim() > 1 else reference.detach().float()[None]
    out = test.detach().float().flatten(0, -2) if test.dim() > 1 else test.detach().float()[None]
    return float(torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean())

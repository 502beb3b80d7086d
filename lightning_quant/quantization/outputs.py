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

from lightning_quant.quantization import flows
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.inputs import batch_inputs
from lightning_quant.utils.tensors import flat_tensors, prediction_of

__all__ = ["flat_tensors", "prediction_of"]  # they live in utils, below the flows that use them too


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
    """The prediction (:func:`prediction_of`) of ``module`` on every batch, concatenated (dequantized, on CPU).

    Outputs with more than two dimensions (token vectors) become rows of their last dimension,
    so batches padded to different lengths still line up.
    """
    outputs = []
    module = module.eval()
    with quantized_engine(engine or torch.backends.quantized.engine):
        for batch in batches:
            out = prediction_of(batch_inputs(batch, batch_to_input).to("cpu")(module))
            out = (out.dequantize() if out.is_quantized else out).float().cpu()
            outputs.append(out.reshape(-1, out.shape[-1]) if out.dim() > 2 else out)
    return torch.cat(outputs)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (``...ForCausalLM``, GPT-2's ``...LMHeadModel``),
    whose labels are its input ids: its token ``i`` predicts label ``i + 1``. A pt2e graph of one is one too (its
    flow keeps the class it was captured from)."""
    return flows.source_class(model).endswith(("ForCausalLM", "LMHeadModel"))


def task_metric(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    metric: Any = None,
    reducer: RankReducer | None = None,
    causal: bool = False,
) -> tuple[str, float]:
    """``(name, value)`` of the task metric: the given torchmetrics ``Metric`` (cloned), else top-1
    accuracy for integer targets or mean squared error otherwise.

    Token outputs (:func:`collect_outputs` rows, one per token) against per-token labels (``[batch, length]``)
    are scored per token, labels of -100 left out as Hugging Face's losses leave them: top-1 accuracy, or for a
    causal language model (``causal``) the next-token cross-entropy ``"loss"`` (token ``i``'s logits against
    label ``i + 1``, as the model's own loss), so that it reads beside the ``val_loss`` a step logs.

    With a ``reducer`` (several processes, each holding a shard of the data), the value is the
    one of the union of every rank's outputs, the same on every rank.
    """
    if metric is not None:
        device = reducer.device if reducer is not None else torch.device("cpu")
        fresh = metric.clone().to(device)
        fresh.reset()
        fresh.sync_on_compute = reducer is not None
        fresh.update(outputs.to(device), targets.to(device))
        return type(metric).__name__, float(fresh.compute())
    tokens = (
        not targets.is_floating_point()
        and targets.dim() == 2
        and outputs.dim() == 2
        and outputs.shape[0] == targets.numel()
        and outputs.shape[0] != targets.shape[0]
    )
    if tokens:
        logits, labels = outputs.view(*targets.shape, outputs.shape[-1]), targets
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        valid = labels != -100
        logits, labels = logits[valid], labels[valid]
        if causal:
            name, total = "loss", torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        else:
            name, total = "accuracy", (logits.argmax(dim=-1) == labels).sum()
        count = float(labels.numel())
    elif not targets.is_floating_point() and outputs.dim() >= 2:
        name, total, count = "accuracy", (outputs.argmax(dim=-1) == targets).sum(), float(targets.numel())
    else:
        name, total = "mse", (outputs.float() - targets.float()).pow(2).sum()
        count = float(targets.numel())
    stats = torch.stack([total.double(), torch.tensor(count, dtype=torch.float64)])
    if reducer is not None:
        stats = reducer.sum(stats)
    return name, float(stats[0] / stats[1])


def higher_is_better(metric_name: str) -> bool:
    return metric_name not in ("mse", "loss", "MeanSquaredError", "MeanAbsoluteError")


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - test|^2)`` (inf if equal)."""
    reference, test = reference.detach().float(), test.detach().float()
    noise = float((reference - test).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if not math.isfinite(noise):
        return float("-inf")
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def mean_cosine(reference: torch.Tensor, test: torch.Tensor, reducer: RankReducer | None = None) -> float:
    """Mean cosine similarity of matching rows (the last dimension is the vector); over every rank's
    rows with a ``reducer``."""
    ref = reference.detach().float().flatten(0, -2) if reference.dim() > 1 else reference.detach().float()[None]
    out = test.detach().float().flatten(0, -2) if test.dim() > 1 else test.detach().float()[None]
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    stats = torch.stack([cosine.sum().double(), torch.tensor(float(cosine.numel()), dtype=torch.float64)])
    if reducer is not None:
        stats = reducer.sum(stats)
    return float(stats[0] / stats[1])

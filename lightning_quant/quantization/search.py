"""Which layers to keep in float: score each layer quantized alone, then skip the most sensitive.

- :func:`quantizable_layers`: the candidates (Conv/Linear for static mode, the dynamic types);
- :func:`layer_sensitivity`: quantize one layer at a time (the rest float) and score it;
- :func:`greedy_skip`: keep the most sensitive layers in float, one at a time, until a score
  target is met;
- :func:`skip_search`: both, scored by top-1 accuracy or by the cosine of int8 to float outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.outputs import collect_outputs, mean_cosine, task_metric

#: module types a layer-level analysis looks at (what static and dynamic modes quantize)
LAYER_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU)


def quantizable_layers(model: nn.Module, types: Sequence[type] = LAYER_TYPES) -> list[str]:
    """Names of the modules of ``types`` in ``model``, in order: the candidates for float islands."""
    return [name for name, module in model.named_modules() if name and isinstance(module, tuple(types))]


@dataclass
class SkipSearch:
    """The outcome of :func:`greedy_skip`."""

    target: float
    reference: float
    full_int8: float
    skipped: list[str] = field(default_factory=list)
    history: list[tuple[list[str], float]] = field(default_factory=list)
    met: bool = False

    @property
    def final(self) -> float:
        return self.history[-1][1] if self.history else self.full_int8


def layer_sensitivity(
    layers: Sequence[str], build: Callable[[list[str]], nn.Module], score: Callable[[nn.Module], float]
) -> dict[str, float]:
    """Score each layer quantized alone (every other layer in ``skip``); lower score = more sensitive.

    Args:
        layers: candidate layer names.
        build: makes an int8 model with the given skip list.
        score: higher is better (accuracy, cosine, SQNR).
    """
    return {name: score(build([other for other in layers if other != name])) for name in layers}


def greedy_skip(
    layers: Sequence[str],
    sensitivity: dict[str, float],
    build: Callable[[list[str]], nn.Module],
    score: Callable[[nn.Module], float],
    reference: float,
    target: float,
    full_int8: float | None = None,
    max_skipped: int | None = None,
) -> SkipSearch:
    """Keep layers in float, most sensitive first, until ``score >= target`` (or nothing is left to skip)."""
    full = score(build([])) if full_int8 is None else full_int8
    search = SkipSearch(target=target, reference=reference, full_int8=full, met=full >= target)
    ranked = sorted(layers, key=lambda n: sensitivity[n])
    limit = len(ranked) if max_skipped is None else min(max_skipped, len(ranked))
    while not search.met and len(search.skipped) < limit:
        search.skipped.append(ranked[len(search.skipped)])
        value = score(build(list(search.skipped)))
        search.history.append((list(search.skipped), value))
        search.met = value >= target
    return search


def skip_search(
    float_model: nn.Module,
    build: Callable[[list[str]], nn.Module],
    layers: Sequence[str],
    batches: Sequence[Any],
    engine: str,
    max_drop: float,
    targets: torch.Tensor | None = None,
    batch_to_input: Callable[[Any], Any] | None = None,
    max_skipped: int | None = None,
    reducer: RankReducer | None = None,
) -> tuple[SkipSearch, dict[str, float]]:
    """Find the float islands that bring an int8 model within ``max_drop`` of the float model.

    The score is top-1 accuracy on ``batches`` when ``targets`` are given (float model = the
    reference), else the mean cosine similarity of int8 to float outputs (reference 1.0).
    Quantizing everything is tried first; only if that misses is each layer scored alone
    (:func:`layer_sensitivity`) and the most sensitive kept in float one by one.

    With a ``reducer`` (several processes), scores are over every rank's batches, so each rank
    keeps the same layers in float.

    Returns:
        the search (which layers stayed float, the score after each step, whether the budget
        was met) and the per-layer scores (empty when no layer had to stay float).
    """
    float_out = collect_outputs(float_model, batches, batch_to_input=batch_to_input)

    def score(int8: nn.Module) -> float:
        out = collect_outputs(int8, batches, engine, batch_to_input)
        if targets is not None:
            return task_metric(out, targets, reducer=reducer)[1]
        return mean_cosine(float_out, out, reducer)

    reference = task_metric(float_out, targets, reducer=reducer)[1] if targets is not None else 1.0
    target = reference - max_drop
    full = score(build([]))
    if full >= target:
        return SkipSearch(target=target, reference=reference, full_int8=full, met=True), {}
    sensitivity = layer_sensitivity(layers, build, score)
    return greedy_skip(layers, sensitivity, build, score, reference, target, full, max_skipped), sensitivity

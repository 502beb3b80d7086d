"""Which layers to keep in float: score each layer quantized alone, then skip the most sensitive.

- :func:`quantizable_layers`: the candidates (Conv/Linear for static mode, the dynamic types);
- :func:`layer_sensitivity`: quantize one layer at a time (the rest float) and score it;
- :func:`greedy_skip`: keep the most sensitive layers in float, one at a time, until a score
  target is met;
- :func:`skip_search`: both, scored by top-1 accuracy or by the cosine of int8 to float outputs;
- :func:`latency_search`: keep in float the int8 layers whose conversion costs more time (the
  quantize/dequantize steps around them) than their int8 kernels save, measured layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.outputs import collect_outputs, is_causal_lm, mean_cosine, task_metric
from lightning_quant.utils.modules import state_dict_bytes

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

    @property
    def layers(self) -> dict[str, str]:
        """The layers kept in float, as a ``layers`` mapping."""
        return {name: "float" for name in self.skipped}


#: precisions from cheapest to most exact
PRECISION_ORDER = ("int4", "int8", "fp16", "float")


@dataclass
class PrecisionSearch:
    """The outcome of :func:`precision_search`: a precision for each layer, within a budget.

    ``layers`` holds the layers raised above the cheapest precision, as a ``layers`` mapping
    that reproduces the model (paste it into YAML as ``quant.layers``).
    """

    reference: float
    target: float | None
    max_size_bytes: int | None
    full_int8: float
    full_int8_bytes: int
    layers: dict[str, str] = field(default_factory=dict)
    history: list[tuple[dict[str, str], float, int]] = field(default_factory=list)
    met: bool = False

    @property
    def final(self) -> float:
        return self.history[-1][1] if self.history else self.full_int8

    @property
    def final_bytes(self) -> int:
        return self.history[-1][2] if self.history else self.full_int8_bytes

    @property
    def skipped(self) -> list[str]:
        """The layers kept in float."""
        return [name for name, precision in self.layers.items() if precision == "float"]

    def _fits(self, value: float, size: int) -> bool:
        return (self.target is None or value >= self.target) and (
            self.max_size_bytes is None or size <= self.max_size_bytes
        )


def precision_search(
    layers: Sequence[str],
    ladder: Sequence[str],
    build: Callable[[dict[str, str]], nn.Module],
    score: Callable[[nn.Module], float],
    size_of: Callable[[nn.Module], int],
    reference: float,
    target: float | None,
    max_size_bytes: int | None = None,
) -> tuple[PrecisionSearch, dict[str, float]]:
    """Choose a precision per layer from ``ladder`` (cheapest first) within the budgets.

    Each layer is scored at the cheapest precision alone (every other layer at the most exact)
    to rank how sensitive it is. With a score ``target`` only: everything starts at the
    cheapest, and the most sensitive layers step up one precision at a time (first every layer
    to the second precision, most sensitive first, then to the third...) until the score holds.
    With ``max_size_bytes``: everything starts at the most exact, and the least sensitive layers
    step down, one precision at a time, until the model fits (with a target too, it is met only
    if the score holds as well).

    Returns:
        the search and each layer's sensitivity score.
    """
    cheapest, *steps = ladder
    full_model = build({})
    full, full_bytes = score(full_model), size_of(full_model)
    search = PrecisionSearch(reference, target, max_size_bytes, full, full_bytes)
    if max_size_bytes is None and search._fits(full, full_bytes):
        search.met = True
        return search, {}
    top = ladder[-1]
    sensitivity = {name: score(build({other: top for other in layers if other != name})) for name in layers}
    ranked = sorted(layers, key=lambda n: sensitivity[n])  # most sensitive first

    def step(chosen: dict[str, str]) -> bool:
        model = build(chosen)
        value, size = score(model), size_of(model)
        search.history.append((dict(chosen), value, size))
        search.layers = dict(chosen)
        search.met = search._fits(value, size)
        return search.met

    if max_size_bytes is None:
        chosen: dict[str, str] = {}
        for level in steps:
            for name in ranked:
                chosen[name] = level
                if step(chosen):
                    return search, sensitivity
        return search, sensitivity
    # from everything at the most exact precision (not built: with float at the top that is the
    # float model, bigger than any budget worth a search), the least sensitive layers step down
    chosen = {name: top for name in layers}
    for level in reversed([cheapest, *steps[:-1]]):
        for name in reversed(ranked):  # least sensitive first
            if level == cheapest:
                chosen.pop(name)
            else:
                chosen[name] = level
            if step(chosen):
                return search, sensitivity
    return search, sensitivity


def check_precision_ladder(precisions: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    """Validate a search ladder: precisions the mode runs, cheapest first, starting at int8 (or int4,
    where the mode runs it: torchao's schemes).

    Raises:
        ValueError: naming what the mode runs.
    """
    ladder = tuple(str(p) for p in precisions)
    order = [p for p in PRECISION_ORDER if p in available]
    if (
        len(ladder) < 2
        or ladder[0] not in [p for p in ("int4", "int8") if p in available]
        or any(p not in available for p in ladder)
        or list(ladder) != sorted(ladder, key=PRECISION_ORDER.index)
        or len(set(ladder)) != len(ladder)
    ):
        raise ValueError(
            f"search_precisions must list precisions this mode runs, cheapest first: any run of {order} starting "
            f"at {order[0]!r} or 'int8', got {list(ladder)}"
        )
    return ladder


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


def _scorer(
    float_model: nn.Module,
    batches: Sequence[Any],
    engine: str,
    targets: torch.Tensor | None,
    batch_to_input: Callable[[Any], Any] | None,
    reducer: RankReducer | None,
) -> tuple[Callable[[nn.Module], float], float]:
    """The score of an int8 model (top-1 accuracy with targets, else cosine to float) and the float model's."""
    float_out = collect_outputs(float_model, batches, batch_to_input=batch_to_input)
    # a causal LM scores its next-token loss, negated so that higher is better as accuracy is
    causal = is_causal_lm(float_model)
    sign = -1.0 if causal else 1.0

    def score(int8: nn.Module) -> float:
        out = collect_outputs(int8, batches, engine, batch_to_input)
        if targets is not None:
            return sign * task_metric(out, targets, reducer=reducer, causal=causal)[1]
        return mean_cosine(float_out, out, reducer)

    reference = (
        sign * task_metric(float_out, targets, reducer=reducer, causal=causal)[1] if targets is not None else 1.0
    )
    return score, reference


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
    score, reference = _scorer(float_model, batches, engine, targets, batch_to_input, reducer)
    target = reference - max_drop
    full = score(build([]))
    if full >= target:
        return SkipSearch(target=target, reference=reference, full_int8=full, met=True), {}
    sensitivity = layer_sensitivity(layers, build, score)
    return greedy_skip(layers, sensitivity, build, score, reference, target, full, max_skipped), sensitivity


def budget_search(
    float_model: nn.Module,
    build: Callable[[Any], nn.Module],
    layers: Sequence[str],
    batches: Sequence[Any],
    engine: str,
    max_drop: float | None,
    targets: torch.Tensor | None = None,
    batch_to_input: Callable[[Any], Any] | None = None,
    reducer: RankReducer | None = None,
    ladder: Sequence[str] = ("int8", "float"),
    max_size_bytes: int | None = None,
) -> tuple[SkipSearch | PrecisionSearch, dict[str, float]]:
    """The search a budget asks for: float islands (:func:`skip_search`) for a metric budget over
    ``("int8", "float")``, else a precision per layer (:func:`precision_search`).

    ``build`` takes a list of layers to keep in float, or a ``{layer: precision}`` mapping.
    """
    if tuple(ladder) == ("int8", "float") and max_size_bytes is None and max_drop is not None:
        return skip_search(
            float_model, build, layers, batches, engine, max_drop, targets, batch_to_input, reducer=reducer
        )
    score, reference = _scorer(float_model, batches, engine, targets, batch_to_input, reducer)
    target = None if max_drop is None else reference - max_drop
    return precision_search(layers, ladder, build, score, state_dict_bytes, reference, target, max_size_bytes)


@dataclass
class LatencySearch:
    """The outcome of :func:`latency_search` (milliseconds, medians): ``savings`` is what each
    candidate layer saves per call run float (negative: int8 is faster), ``history`` the
    ``(layers kept float, ms)`` of each model timed."""

    fp32_ms: float
    int8_ms: float
    final_ms: float
    kept_float: list[str] = field(default_factory=list)
    savings: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """fp32 latency over the final model's."""
        return self.fp32_ms / self.final_ms


def latency_search(
    convert: Callable[[list[str]], nn.Module],
    savings: Mapping[str, float],
    run_ms: Callable[[nn.Module], float],
    fp32_ms: float,
    min_gain: float = 0.02,
    rounds: int = 4,
    min_layer_gain: float = 0.002,
) -> LatencySearch:
    """Keep float, together, the layers ``savings`` says run faster float (each measured on its own
    with the quantize/dequantize steps it costs or saves: a layer is a small part of a model, too
    small to show in the whole model's timing noise) by more than ``min_layer_gain`` of the int8
    model's time, biggest saving first. The model is timed
    against all-int8; while it is not ``min_gain`` faster, the half with the smallest savings is
    given back to int8 (at most ``rounds`` models timed).

    Args:
        convert: the int8 model with the named layers float (FX: one calibrated model converted
            again, no recalibration).
        savings: ms saved per call by each candidate layer run float.
        run_ms: median latency of a model.
        fp32_ms: the float model's latency, for the record.
    """
    int8_ms = run_ms(convert([]))
    floor = min_layer_gain * int8_ms  # below it, a layer's saving is timing noise
    chosen = [name for name, saved in sorted(savings.items(), key=lambda item: -item[1]) if saved > floor]
    history: list[tuple[int, float]] = []
    for _ in range(rounds):
        if not chosen:
            break
        ms = run_ms(convert(chosen))
        history.append((len(chosen), ms))
        if ms < int8_ms * (1 - min_gain):
            return LatencySearch(fp32_ms, int8_ms, ms, chosen, dict(savings), history)
        chosen = chosen[: len(chosen) // 2]
    return LatencySearch(fp32_ms, int8_ms, int8_ms, [], dict(savings), history)

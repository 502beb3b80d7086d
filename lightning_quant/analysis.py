"""What quantization did, layer by layer: output error, observer ranges, sensitivity, skip search.

- :func:`sqnr_db` / :func:`mean_cosine`: how close int8 outputs are to float outputs;
- :func:`per_layer_sqnr`: the SQNR of every quantized layer's output against the same layer of
  the float reference, with error accumulated from the layers before it (what a deployed
  model sees). The reference is the *prepared* model with quantization switched off (it has
  the same module names as the converted one), or the float model itself for dynamic mode;
- :func:`observer_ranges`: the range, scale and zero point each observer settled on;
- :func:`layer_sensitivity`: quantize one layer at a time (the rest float) and score it;
- :func:`greedy_skip`: keep the most sensitive layers in float, one at a time, until a score
  target is met;
- :func:`next_steps`: what to try when a budget is missed (the usual PTQ remedies, in order).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.ao.quantization import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from lightning_quant.export import flat_tensors
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.inputs import batch_inputs
from lightning_quant.quantization.target import within

#: SQNR (dB) above which a layer's error counts as nil when measuring what each layer adds
SQNR_CEILING_DB = 60.0

#: module types a layer-level analysis looks at (what static and dynamic modes quantize)
LAYER_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU)


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


def _dequantized(value: Any) -> Optional[torch.Tensor]:
    tensors = flat_tensors(value)
    if not tensors:
        return None
    tensor = tensors[0]
    return tensor.dequantize() if tensor.is_quantized else tensor


def _compared_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized compute modules, and leaf modules with their own weights (float islands)."""
    layers = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, (ObserverBase, FakeQuantizeBase)):
            continue
        kind = type(module).__module__
        if kind.startswith("torch.ao.nn.") and ".quantized" in kind:  # quantized, intrinsic.quantized, dynamic
            if type(module).__name__ not in ("Quantize", "DeQuantize", "FloatFunctional", "QFunctional"):
                layers[name] = module
        elif not any(not isinstance(c, (ObserverBase, FakeQuantizeBase)) for c in module.children()) and any(
            True for _ in module.parameters(recurse=False)
        ):
            layers[name] = module
    return layers


@torch.inference_mode()
def per_layer_sqnr(
    reference: nn.Module,
    int8: nn.Module,
    batches: Iterable[Any],
    engine: str,
    batch_to_input: Optional[Callable[[Any], Any]] = None,
) -> dict[str, dict[str, float]]:
    """For each int8 layer, against the same-named layer of ``reference`` (in forward order):

    - ``sqnr_db``: SQNR of the layer's output (error accumulated from every layer before it);
    - ``input_sqnr_db``: SQNR of the layer's input;
    - ``loss_db``: ``input_sqnr_db - sqnr_db`` (each capped at ``SQNR_CEILING_DB``), the error
      this layer itself adds. A broken layer stands out here even though every layer after it
      inherits its low output SQNR.

    Layers are matched by module name; batches are concatenated per layer before the ratio.
    ``reference`` is run on a copy, so its observers (if any) keep their ranges.
    """
    reference = copy.deepcopy(reference).cpu()
    int8_layers = _compared_layers(int8)
    ref_modules = dict(reference.named_modules())
    names = [n for n in int8_layers if n in ref_modules]
    captured: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    order: list[str] = []
    handles = []
    for side, model in (("ref", reference), ("int8", int8)):
        modules = dict(model.named_modules())
        for name in names:

            def hook(mod, inputs, output, side=side, name=name):
                for kind, value in (("in", inputs), ("out", output)):
                    tensor = _dequantized(value)
                    if tensor is not None:
                        captured.setdefault((side, kind, name), []).append(tensor.float().cpu().flatten())
                if side == "int8" and name not in order:
                    order.append(name)

            handles.append(modules[name].register_forward_hook(hook))
    try:
        reference.eval(), int8.eval()
        with quantized_engine(engine):
            for batch in batches:
                inputs = batch_inputs(batch, batch_to_input).to("cpu")
                inputs(reference)
                inputs(int8)
    finally:
        for handle in handles:
            handle.remove()

    def ratio(kind: str, name: str) -> Optional[float]:
        ref, out = captured.get(("ref", kind, name), []), captured.get(("int8", kind, name), [])
        if not ref or len(ref) != len(out) or any(r.shape != o.shape for r, o in zip(ref, out)):
            return None
        return sqnr_db(torch.cat(ref), torch.cat(out))

    result = {}
    prefix = getattr(int8, "wrapped_prefix", "")
    for name in order:
        out, inp = ratio("out", name), ratio("in", name)
        if out is None:
            continue
        # SQNRs above SQNR_CEILING_DB count as exact, so exact inputs and outputs compare sensibly
        ceiling = lambda v: SQNR_CEILING_DB if v is None or math.isnan(v) else min(v, SQNR_CEILING_DB)  # noqa: E731
        loss = ceiling(inp) - ceiling(out)
        result[name.removeprefix(prefix)] = {
            "sqnr_db": out,
            "input_sqnr_db": inp if inp is not None else float("nan"),
            "loss_db": loss,
        }
    return result


def _observed_values(prepared: nn.Module) -> dict[str, str]:
    """For an FX model: observer name -> what it observes ("input x", "output of features.0")."""
    labels: dict[str, str] = {}
    graph = getattr(prepared, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module" and node.args and hasattr(node.args[0], "op"):
            source = node.args[0]
            labels[str(node.target)] = (
                f"input {source.name}"
                if source.op == "placeholder"
                else f"output of {source.target}"
                if source.op == "call_module"
                else f"output of {source.name}"
            )
    return labels


def observer_ranges(prepared: nn.Module) -> dict[str, dict[str, Any]]:
    """For each observer (or fake-quantize module): what it observes, the observed min/max, and
    the scale/zero point it gives (averaged over channels for per-channel weights)."""
    ranges: dict[str, dict[str, Any]] = {}
    labels = _observed_values(prepared)
    owners: list[str] = []
    for name, module in prepared.named_modules():
        if within(name, owners, strictly=True):
            continue
        if isinstance(module, FakeQuantizeBase):
            owners.append(name)
            observer = getattr(module, "activation_post_process", None)
        elif isinstance(module, ObserverBase):
            observer = module
        else:
            continue
        min_val = getattr(observer, "min_val", None)
        if not isinstance(min_val, torch.Tensor) or min_val.numel() == 0 or bool(torch.isinf(min_val).any()):
            continue
        try:
            scale, zero_point = observer.calculate_qparams()
        except Exception:  # an observer that cannot give parameters (never saw data)
            continue
        ranges[name] = {
            "observes": labels.get(name, "weight" if name.endswith("weight_fake_quant") else ""),
            "min": float(min_val.min()),
            "max": float(observer.max_val.max()),
            "scale": float(scale.float().mean()),
            "zero_point": int(zero_point.float().mean().round()),
            "per_channel": bool(min_val.numel() > 1),
        }
    return ranges


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
    full_int8: Optional[float] = None,
    max_skipped: Optional[int] = None,
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


def next_steps(per_channel: bool, observer: str, calibration_batches: Optional[int], qat: bool) -> list[str]:
    """The usual remedies for an int8 model that misses its accuracy budget, cheapest first."""
    steps = []
    if not per_channel:
        steps.append("per_channel=True (per-channel weight scales)")
    if observer != "histogram":
        steps.append('observer="histogram" (clips activation outliers)')
    if calibration_batches is not None and calibration_batches < 128:
        steps.append(
            f"more calibration data (calibration_batches={calibration_batches} -> {max(128, 4 * calibration_batches)})"
        )
    steps.append("keep the most sensitive layers in float (max_metric_drop / skip)")
    if not qat:
        steps.append("quantization-aware training (QuantizationAwareTraining), which learns around the rounding")
    return steps


def skip_search(
    float_model: nn.Module,
    build: Callable[[list[str]], nn.Module],
    layers: Sequence[str],
    batches: Sequence[Any],
    engine: str,
    max_drop: float,
    targets: Optional[torch.Tensor] = None,
    batch_to_input: Optional[Callable[[Any], Any]] = None,
    max_skipped: Optional[int] = None,
) -> tuple[SkipSearch, dict[str, float]]:
    """Find the float islands that bring an int8 model within ``max_drop`` of the float model.

    The score is top-1 accuracy on ``batches`` when ``targets`` are given (float model = the
    reference), else the mean cosine similarity of int8 to float outputs (reference 1.0).
    Quantizing everything is tried first; only if that misses is each layer scored alone
    (:func:`layer_sensitivity`) and the most sensitive kept in float one by one.

    Returns:
        the search (which layers stayed float, the score after each step, whether the budget
        was met) and the per-layer scores (empty when no layer had to stay float).
    """
    from lightning_quant.report import collect_outputs, task_metric

    float_out = collect_outputs(float_model, batches, batch_to_input=batch_to_input)

    def score(int8: nn.Module) -> float:
        out = collect_outputs(int8, batches, engine, batch_to_input)
        return task_metric(out, targets)[1] if targets is not None else mean_cosine(float_out, out)

    reference = task_metric(float_out, targets)[1] if targets is not None else 1.0
    target = reference - max_drop
    full = score(build([]))
    if full >= target:
        return SkipSearch(target=target, reference=reference, full_int8=full, met=True), {}
    sensitivity = layer_sensitivity(layers, build, score)
    return greedy_skip(layers, sensitivity, build, score, reference, target, full, max_skipped), sensitivity

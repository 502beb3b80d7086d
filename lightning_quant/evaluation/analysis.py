"""What quantization did, layer by layer: output error, observer ranges, and what to try next.

- :func:`per_layer_sqnr`: the SQNR of every quantized layer's output against the same layer of
  the float reference, with error accumulated from the layers before it (what a deployed
  model sees). The reference is the *prepared* model with quantization switched off (it has
  the same module names as the converted one), or the float model itself for dynamic mode;
- :func:`observer_ranges`: the range, scale and zero point each observer settled on;
- :func:`next_steps`: what to try when a budget is missed (the usual PTQ remedies, in order);
- :func:`conversion_fidelity`: how closely an int8 model follows the fake-quant model it was
  converted from, and where they part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization import flows
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.inputs import batch_inputs
from lightning_quant.quantization.outputs import collect_outputs, flat_tensors, mean_cosine, prediction_of, sqnr_db
from lightning_quant.quantization.schedule import set_observers
from lightning_quant.quantization.sharding import whole_copy
from lightning_quant.utils.modules import within

#: SQNR (dB) above which a layer's error counts as nil when measuring what each layer adds
SQNR_CEILING_DB = 60.0
#: mean cosine of an int8 model's outputs to its fake-quant model's, below which QAT warns
FIDELITY_FLOOR = 0.98
#: dB a layer must take off the agreement of int8 and fake quant to be named where they part ...
DIVERGENCE_DB = 3.0
#: ... and the SQNR (dB) of its output against the fake-quant layer's it must fall under (above
#: this, a tie rounded the other way here and there: 30 dB is a cosine of 0.9995)
DIVERGED_SQNR_DB = 30.0


def _dequantized(value: Any) -> torch.Tensor | None:
    if not flat_tensors(value):
        return None
    tensor = prediction_of(value)
    return tensor.dequantize() if tensor.is_quantized else tensor


@torch.inference_mode()
def per_layer_sqnr(
    reference: nn.Module,
    int8: nn.Module,
    batches: Iterable[Any],
    engine: str,
    batch_to_input: Callable[[Any], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """For each compute layer of ``int8``, against the same-named layer of ``reference`` (in forward order):

    - ``sqnr_db``: SQNR of the layer's output (error accumulated from every layer before it);
    - ``input_sqnr_db``: SQNR of the layer's input;
    - ``precision``: ``"int8"``, ``"fp16"`` or ``"float"`` (as the flow that made ``int8`` says);
    - ``loss_db``: ``input_sqnr_db - sqnr_db`` (each capped at ``SQNR_CEILING_DB``), the error
      this layer itself adds. A broken layer stands out here even though every layer after it
      inherits its low output SQNR.

    Layers are matched by name and captured by the flow that made each model (module hooks;
    graph nodes for pt2e); batches are concatenated per layer before the ratio. ``reference``
    is run on a copy, so its observers (if any) keep their ranges.
    """
    reference = whole_copy(reference).cpu()
    precisions = flows.int8_layers(int8)
    names = list(precisions)
    captured: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    order: list[str] = []
    reference.eval(), int8.eval()
    with quantized_engine(engine):
        for batch in batches:
            inputs = batch_inputs(batch, batch_to_input).to("cpu")
            for side, model in (("ref", reference), ("int8", int8)):
                for name, (layer_in, layer_out) in flows.layer_outputs(model, inputs, names).items():
                    for kind, value in (("in", layer_in), ("out", layer_out)):
                        tensor = _dequantized(value)
                        if tensor is not None:
                            captured.setdefault((side, kind, name), []).append(tensor.float().cpu().flatten())
                    if side == "int8" and name not in order:
                        order.append(name)

    def ratio(kind: str, name: str) -> float | None:
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
            "precision": precisions[name],
            "sqnr_db": out,
            "input_sqnr_db": inp if inp is not None else float("nan"),
            "loss_db": loss,
        }
    return result


def _observed_values(prepared: nn.Module) -> dict[str, str]:
    """For a graph model (fx, pt2e): observer name -> what it observes ("input x", "output of features.0")."""
    labels: dict[str, str] = {}
    graph = getattr(prepared, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module" and node.args and hasattr(node.args[0], "op"):
            source = node.args[0]
            labels[str(node.target)] = (
                f"input {source.name}"
                if source.op == "placeholder"
                else f"weight {source.target}"
                if source.op == "get_attr"
                else f"output of {source.target}"
                if source.op == "call_module"
                else f"output of {source.name}"
            )
    return labels


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def observer_ranges(prepared: nn.Module) -> dict[str, dict[str, Any]]:
    """For each observer (or fake-quantize module): what it observes, the observed min/max, and
    the scale/zero point it gives (averaged over channels for per-channel weights)."""
    ranges: dict[str, dict[str, Any]] = {}
    labels = _observed_values(prepared)
    fake_quantizers = flows.fake_quantizers(prepared)
    owners = [name for name, _ in fake_quantizers]
    candidates = [(name, getattr(m, "activation_post_process", None)) for name, m in fake_quantizers]
    candidates += [(name, m) for name, m in flows.observers(prepared) if not within(name, owners, strictly=True)]
    order = _module_order(prepared)
    for name, observer in sorted(candidates, key=lambda item: order.get(item[0], 0)):
        min_val = getattr(observer, "min_val", None)
        if (
            observer is None
            or not isinstance(min_val, torch.Tensor)
            or min_val.numel() == 0
            or bool(torch.isinf(min_val).any())
        ):
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


def next_steps(per_channel: bool, observer: str, calibration_batches: int | None, qat: bool) -> list[str]:
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


@dataclass
class Fidelity:
    """How closely an int8 model follows the fake-quant model it was converted from.

    ``cosine``: mean cosine of their outputs; ``layers``: where they part, worst first (layer ->
    the dB its own computation takes off their agreement), looked for only below ``floor``.
    """

    cosine: float
    floor: float = FIDELITY_FLOOR
    layers: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.cosine >= self.floor


def fake_quant_reference(prepared: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of a QAT model with its observers stopped: the fake-quant model as
    validation runs it, which :func:`conversion_fidelity` compares int8 models with."""
    reference = whole_copy(flows.inference_view(prepared)).cpu().eval()
    set_observers(reference, False)
    return reference


def conversion_fidelity(
    reference: nn.Module,
    int8: nn.Module,
    batches: Sequence[Any],
    engine: str,
    batch_to_input: Callable[[Any], Any] | None = None,
    floor: float = FIDELITY_FLOOR,
) -> Fidelity:
    """Compare ``int8`` with the fake-quant model it was converted from (``reference``, made by
    :func:`fake_quant_reference` once for any number of comparisons) on ``batches``. The two
    compute the same numbers except where torch's int8 kernels differ from its fake quantization
    (rounding of ties, an op that keeps its input's scale where fake quantization observed its
    own); below ``floor``, the layers that take at least ``DIVERGENCE_DB`` off the agreement and
    whose outputs agree to less than ``DIVERGED_SQNR_DB`` are named (:func:`per_layer_sqnr` of
    ``int8`` against the fake-quant model: each layer's ``loss_db`` and ``sqnr_db``).
    """
    cosine = mean_cosine(
        collect_outputs(reference, batches, engine, batch_to_input),
        collect_outputs(int8, batches, engine, batch_to_input),
    )
    fidelity = Fidelity(cosine=cosine, floor=floor)
    if not fidelity.ok:
        layers = per_layer_sqnr(reference, int8, batches, engine, batch_to_input)
        diverging = [
            (name, row["loss_db"])
            for name, row in layers.items()
            if row["loss_db"] >= DIVERGENCE_DB and row["sqnr_db"] < DIVERGED_SQNR_DB
        ]
        fidelity.layers = dict(sorted(diverging, key=lambda item: -item[1]))
    return fidelity

"""What quantization did, layer by layer: output error, observer ranges, and what to try next.

- :func:`per_layer_sqnr`: the SQNR of every quantized layer's output against the same layer of
  the float reference, with error accumulated from the layers before it (what a deployed
  model sees). The reference is the *prepared* model with quantization switched off (it has
  the same module names as the converted one), or the float model itself for dynamic mode;
- :func:`observer_ranges`: the range, scale and zero point each observer settled on;
- :func:`next_steps`: what to try when a budget is missed (the usual PTQ remedies, in order).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.ao.quantization import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.inputs import batch_inputs
from lightning_quant.quantization.outputs import flat_tensors, sqnr_db
from lightning_quant.utils.modules import within

#: SQNR (dB) above which a layer's error counts as nil when measuring what each layer adds
SQNR_CEILING_DB = 60.0


def _dequantized(value: Any) -> torch.Tensor | None:
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


def layer_precision(module: nn.Module) -> str:
    """What a layer of a converted model computes in: ``"int8"``, ``"fp16"`` (dynamic half-precision
    weights) or ``"float"``."""
    kind = type(module).__module__
    if not (kind.startswith("torch.ao.nn.") and ".quantized" in kind):
        return "float"
    packed = getattr(module, "_packed_params", None)
    dtype = getattr(packed, "dtype", None) or getattr(module, "dtype", None)
    return "fp16" if dtype == torch.float16 else "int8"


@torch.inference_mode()
def per_layer_sqnr(
    reference: nn.Module,
    int8: nn.Module,
    batches: Iterable[Any],
    engine: str,
    batch_to_input: Callable[[Any], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """For each int8 layer, against the same-named layer of ``reference`` (in forward order):

    - ``sqnr_db``: SQNR of the layer's output (error accumulated from every layer before it);
    - ``input_sqnr_db``: SQNR of the layer's input;
    - ``precision``: ``"int8"``, ``"fp16"`` or ``"float"`` (:func:`layer_precision`);
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
            "precision": layer_precision(int8_layers[name]),
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

"""Run calibration batches through a model with observers on, and catch NaN/Inf on the way.

Calibration happens in eval mode without gradients, inside a context that restores the
model's training mode on exit (even on error). Hooks on every leaf module name the first
layer whose output is not finite, since a NaN reaching an observer ruins its range silently.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization import flows
from lightning_quant.quantization.inputs import ExampleInputs, batch_inputs
from lightning_quant.quantization.schedule import set_fake_quant, set_observers
from lightning_quant.utils.modules import within


class NonFiniteError(ValueError):
    """NaN or Inf values reached the observers; the message names where they first appeared."""


def _non_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(_non_finite(v) for v in value)
    return False


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules (observers excluded) with the name users know them by: a leaf inside a
    fused module (ConvReLU2d...) is reported under the fused module's name."""
    fused = flows.fused_layers(model)
    quantizers = flows.quantizer_modules(model)
    layers = []
    for name, module in model.named_modules():
        if not name or id(module) in quantizers or any(id(c) not in quantizers for c in module.children()):
            continue
        owner = within(name, fused) or name
        layers.append((owner, module))
    return layers


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Eval mode, no gradients, non-finite watch; yields a dict that records the first bad layer."""
    found: dict[str, Any] = {}
    handles = []
    prefix = getattr(model, "wrapped_prefix", "")
    for name, module in _layers(model):

        def hook(mod: nn.Module, inputs: Any, output: Any, name: str = name.removeprefix(prefix)) -> None:
            if "layer" not in found and _non_finite(output):
                found["layer"] = name
                found["type"] = type(model.get_submodule(prefix + name)).__name__

        handles.append(module.register_forward_hook(hook, prepend=True))  # before eager observers' hooks
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield found
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


def _non_finite_error(found: dict[str, Any], batch: int) -> NonFiniteError:
    return NonFiniteError(
        f"NaN or Inf reached the observers: first seen in the output of layer {found['layer']!r} "
        f"({found['type']}) at calibration batch {batch}; check that layer's weights and the inputs"
    )


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    batch_to_input: Callable[[Any], Any] | None = None,
    progress: bool = True,
    description: str = "calibrating",
) -> int:
    """Feed up to ``num_batches`` batches to ``model`` (observers on); returns how many were used.

    Raises:
        ValueError: ``batches`` yielded nothing (empty, or an iterator already consumed).
        NonFiniteError: an input or a layer output held NaN or Inf.
    """
    from tqdm.auto import tqdm

    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    used = 0
    with calibrating(model) as found:
        for batch in tqdm(
            itertools.islice(batches, num_batches),
            total=num_batches,
            desc=description,
            disable=not progress,
            leave=False,
        ):
            inputs: ExampleInputs = batch_inputs(batch, batch_to_input).to(device)
            if _non_finite([*inputs.args, *inputs.kwargs.values()]):
                raise NonFiniteError(f"calibration batch {used} holds NaN or Inf values in the model input")
            try:
                inputs(model)
            except Exception as err:  # an observer may fail on NaN before the check below runs
                if found:
                    raise _non_finite_error(found, used) from err
                raise
            if found:
                raise _non_finite_error(found, used)
            used += 1
    if used == 0:
        raise ValueError(
            "calibration data yielded no batch: it is empty or an iterator that was already consumed; "
            "pass a DataLoader or a list of batches"
        )
    return used


def first_non_finite_layer(model: nn.Module, inputs: ExampleInputs) -> str | None:
    """Where NaN/Inf first appears when ``inputs`` run through ``model`` in float: ``"the model input"``,
    ``"layer 'name' (Type)"``, or ``None`` when every output is finite.

    Runs a copy with fake quantization and observers off (the original keeps its state), so it
    can explain an error that fake quantization raised on non-finite values.
    """
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    inputs = inputs.to(device)
    if _non_finite([*inputs.args, *inputs.kwargs.values()]):
        return "the model input"
    probe = copy.deepcopy(model)
    set_fake_quant(probe, False)
    set_observers(probe, False)
    with calibrating(probe) as found:
        try:
            inputs(probe)
        except Exception:  # the probe only looks for where values stop being finite
            pass
    return f"layer {found['layer']!r} ({found['type']})" if found else None

"""Does a converted QAT model follow the fake-quant model it came from, and where it parts, would keeping
those layers float follow it more closely?

torch's int8 kernels compute some ops differently from fake quantization (ties rounded the other way, an op
that keeps its input's scale), and some models amplify it. :func:`check_conversion` measures the agreement
(:func:`~lightning_quant.evaluation.analysis.conversion_fidelity`) and, where it is under the floor and the
flow's conversion can leave layers float (``keeps_float``), tries the repair: the layers where they part,
chosen on half the batches, kept float if that agrees better on the other half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from lightning_quant.evaluation.analysis import Fidelity, conversion_fidelity, fake_quant_reference
from lightning_quant.quantization.convert import convert_copy
from lightning_quant.quantization.options import Flow


@dataclass
class CheckedConversion:
    """The int8 model to keep (repaired or not), its agreement, the layers kept float, and what to warn."""

    model: nn.Module
    fidelity: Fidelity | None
    kept_float: list[str] = field(default_factory=list)
    warning: str | None = None


def check_conversion(
    prepared: nn.Module,
    int8: nn.Module,
    batches: list[Any],
    to_input: Callable[[Any], Any] | None,
    flow: Flow,
    engine: str,
    repair: bool,
    broadcast: Callable[[list[str]], list[str]] = lambda names: names,
) -> CheckedConversion:
    """Compare ``int8`` with the fake-quant model ``prepared`` on ``batches``; below the floor, with ``repair``,
    convert ``prepared`` again with the layers where they part kept float when that follows it more closely.

    Args:
        prepared: the QAT model (its fake quantizers give the reference).
        int8: its conversion.
        batches: what both are run on (``to_input`` reads the model's call off each).
        flow, engine: how ``prepared`` converts.
        repair: try keeping the diverging layers float.
        broadcast: the names one process chose, given to all (rank zero decides under DDP).
    """
    reference = fake_quant_reference(prepared) if batches else None
    if reference is None:
        broadcast([])  # a collective: every process takes part, whatever it found
        return CheckedConversion(int8, None)
    fidelity = conversion_fidelity(reference, int8, batches, engine, to_input)
    outcome = "to keep layers float, train again with layers={name: 'float'} (or skip=[...])"
    mine: tuple[list[str], nn.Module | None] = ([], None)
    if not fidelity.ok and repair:
        mine, outcome = _layers_to_keep_float(prepared, reference, int8, batches, to_input, flow, engine)
    names = broadcast(mine[0])
    checked = CheckedConversion(int8, fidelity)
    if names:
        model = mine[1] if names == mine[0] and mine[1] is not None else convert_copy(prepared, flow, engine, names)
        checked = CheckedConversion(model, conversion_fidelity(reference, model, batches, engine, to_input), names)
    if not fidelity.ok:
        where = (
            ", ".join(f"{name} ({loss:+.1f} dB)" for name, loss in list(fidelity.layers.items())[:5])
            or "no single layer (it builds up in ops between layers, such as a mean or an add)"
        )
        checked.warning = (
            f"[QAT] the int8 model agrees with the fake-quant model it was converted from only to cosine "
            f"{fidelity.cosine:.4f} (floor {fidelity.floor}) on {len(batches)} batch(es): torch's int8 "
            "kernels compute some ops differently from fake quantization (ties rounded the other way, an op "
            f"that keeps its input's scale), and the model amplifies it. Where they part: {where}. {outcome}. "
            "Validate callback.quantized_model itself (val/*_int8 with validate_int8=True)"
        )
    return checked


def _layers_to_keep_float(
    prepared: nn.Module,
    reference: nn.Module,
    int8: nn.Module,
    batches: list[Any],
    to_input: Callable[[Any], Any] | None,
    flow: Flow,
    engine: str,
) -> tuple[tuple[list[str], nn.Module | None], str]:
    """The layers where int8 parts from fake quant, chosen on half the batches, if keeping them
    float agrees better on the other half, with that model; and what happened, for the warning. Chosen and judged
    on the same batches they can fit those batches only: a tie rounded the other way spreads
    chaotically (measured: 0.974 -> 0.981 there, 0.977 -> 0.967 on other images)."""
    find, judge = (batches[::2], batches[1::2]) if len(batches) > 1 else (batches, batches)
    # a floor no cosine reaches: the layers are named whatever these batches' agreement
    names = list(conversion_fidelity(reference, int8, find, engine, to_input, floor=2.0).layers)
    if not names:
        return ([], None), "keep_diverging_float found no layer to keep float"
    before = conversion_fidelity(reference, int8, judge, engine, to_input).cosine
    candidate = convert_copy(prepared, flow, engine, names)
    after = conversion_fidelity(reference, candidate, judge, engine, to_input).cosine
    if after > before:
        return (names, candidate), (
            f"kept {names[:5]} float in the int8 model (keep_diverging_float): cosine on batches that did not "
            f"choose them {before:.4f} -> {after:.4f}; keep_diverging_float=False keeps them int8"
        )
    return ([], None), (
        f"keeping {names[:5]} float did not follow the fake-quant model more closely on batches that did not "
        f"choose them ({before:.4f} -> {after:.4f}), so they stay int8"
    )

"""The quantization flows: each rewrites a float model into a quantizable one and converts it to int8.

A flow is the seam between the callbacks and torch's quantization APIs: callbacks call
:func:`get_flow` and use only ``prepare`` and ``convert``, so a new flow (torchao's pt2e) is
one new module registered here and no callback changes.
"""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn

from lightning_quant.quantization.config import Flow, QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.utils.checks import parse_enum


class QuantizationFlow(Protocol):
    """What every flow offers."""

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        """Fuse, insert observers (PTQ) or fake quantization (QAT) and return the prepared model.

        The flow may reuse and change ``model``'s submodules: pass a copy to keep the float model.
        """

    def convert(self, prepared: nn.Module) -> nn.Module:
        """Turn a prepared model (in eval mode, on CPU) into its int8 version, in place."""


def get_flow(flow: Flow | str) -> QuantizationFlow:
    """The flow object for ``flow`` (``"fx"`` or ``"eager"``)."""
    from lightning_quant.quantization.flows.eager import EagerFlow
    from lightning_quant.quantization.flows.fx import FxFlow

    registry: dict[Flow, QuantizationFlow] = {Flow.FX: FxFlow(), Flow.EAGER: EagerFlow()}
    return registry[parse_enum(Flow, flow, "flow")]

"""The quantization flows: each rewrites a float model into a quantizable one and converts it to int8.

A flow is the seam between the rest of the package and a quantization stack: nothing outside
``flows/`` imports ``torch.ao`` or torchao's pt2e. Everything the callbacks, the schedule,
calibration, conversion, analysis and export need to know about a prepared or converted model
is a question a flow answers (:class:`QuantizationFlow`); a flow that writes files of its own
(torchao's weights) offers them as methods of its flow object. Flows are registered in :data:`FLOWS`
only; a new stack is one module there.

Helpers that get a model without its flow (:func:`fake_quantizers`, :func:`observers`,
:func:`int8_layers`...) ask every flow whose stack is already imported: a model cannot hold
modules of a package that was never imported, so asking costs no import.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.nn as nn

from lightning_quant.quantization.flows.common import (
    CapturesModel,
    ChecksModel,
    FreezesBatchNorm,
    FusesLayers,
    HasInferenceView,
    KeepsFloat,
    MapsBoundaries,
    Observes,
    QuantizationFlow,
    QuantizesWithoutData,
    RecordsActivationCodes,
    WritesHuggingFace,
    WritesWeights,
    graph_boundaries,
    module_layer_outputs,
)
from lightning_quant.quantization.flows.spec import SPECS, FlowSpec, spec_of, spelled
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.options import Flow
from lightning_quant.utils.checks import parse_enum

__all__ = [
    "FLOWS",
    "CapturesModel",
    "ChecksModel",
    "FlowSpec",
    "FreezesBatchNorm",
    "FusesLayers",
    "HasInferenceView",
    "KeepsFloat",
    "MapsBoundaries",
    "Observes",
    "QuantizationFlow",
    "QuantizesWithoutData",
    "RecordsActivationCodes",
    "SPECS",
    "WritesHuggingFace",
    "WritesWeights",
    "graph_boundaries",
    "module_layer_outputs",
    "spec_of",
    "spelled",
]


def _registry() -> dict[Flow, QuantizationFlow]:
    from lightning_quant.quantization.flows.eager import EagerFlow
    from lightning_quant.quantization.flows.fx import FxFlow
    from lightning_quant.quantization.flows.pt2e import Pt2eFlow
    from lightning_quant.quantization.flows.torchao import TorchaoFlow

    registry: dict[Flow, QuantizationFlow] = {
        Flow.FX: FxFlow(),
        Flow.EAGER: EagerFlow(),
        Flow.PT2E: Pt2eFlow(),
        Flow.TORCHAO: TorchaoFlow(),
    }
    missing = set(SPECS) ^ set(registry)
    assert not missing, f"flows declared and registered differ: {missing}"
    return registry


FLOWS: dict[Flow, QuantizationFlow] = {}


def get_flow(flow: Flow | str) -> QuantizationFlow:
    """The flow object for ``flow`` (``"fx"``, ``"eager"``, ``"pt2e"`` or ``"torchao"``)."""
    if not FLOWS:
        FLOWS.update(_registry())
    return FLOWS[parse_enum(Flow, flow, "flow")]


def registered() -> list[QuantizationFlow]:
    """Every registered flow, in declaration order."""
    get_flow(next(iter(SPECS)))
    return list(FLOWS.values())


def capable(flow: Flow | str | QuantizationFlow | None, capability: type) -> Any:
    """The flow object when it offers ``capability`` (a protocol of :mod:`~.common`), else ``None``."""
    if flow is None:
        return None
    obj = flow if not isinstance(flow, (str, Flow)) else get_flow(flow)
    return obj if isinstance(obj, capability) else None


def _loaded_flows() -> list[QuantizationFlow]:
    """One flow per imported stack (fx and eager share torch.ao's module classes)."""
    registered()
    unique: dict[str, QuantizationFlow] = {}
    for flow in FLOWS.values():
        if flow.stack in sys.modules:
            unique.setdefault(flow.stack, flow)
    return list(unique.values())


def flow_of(model: nn.Module) -> QuantizationFlow | None:
    """The flow that prepared or converted ``model`` (``None`` for a float model)."""
    for flow in _loaded_flows():
        if flow.owns(model):
            return flow
    return None


def inference_view(model: nn.Module) -> nn.Module:
    """``model`` as it is called for a prediction: for a QAT model whose flow trained the graph of a call
    with training-only inputs (pt2e with labels), the prediction graph with its trained state (a copy);
    else ``model`` itself."""
    flow = capable(flow_of(model), HasInferenceView)
    return flow.inference_view(model) if flow is not None else model


def source_class(model: nn.Module) -> str:
    """The class name of the model ``model`` was made from: its own, or for a captured graph (pt2e) the class it
    was captured from."""
    flow = capable(flow_of(model), CapturesModel)
    return flow.source_class(model) if flow is not None else type(model).__name__


def activation_codes(model: nn.Module) -> tuple[int, int] | None:
    """The uint8 codes (lowest, highest) the activations of the int8 model ``model`` were calibrated to (torch.ao
    on x86/fbgemm: 0..127), where its flow recorded them; ``None`` where it did not."""
    flow = capable(flow_of(model), RecordsActivationCodes)
    return flow.activation_codes(model) if flow is not None else None


def fake_quantizers(model: nn.Module) -> list[tuple[str, Any]]:
    """The fake-quantize modules of ``model``, whichever flow prepared it."""
    return [item for flow in _loaded_flows() for item in flow.fake_quantizers(model)]


def observers(model: nn.Module) -> list[tuple[str, Any]]:
    """The observers of ``model`` (inside fake-quantize modules too), whichever flow prepared it."""
    return [item for flow in _loaded_flows() if isinstance(flow, Observes) for item in flow.observers(model)]


def quantizer_modules(model: nn.Module) -> set[int]:
    """``id()`` of every fake-quantize and observer module: what is not a layer of the model."""
    return {id(m) for _, m in fake_quantizers(model)} | {id(m) for _, m in observers(model)}


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` carries observers or fake quantization (prepared by a flow)."""
    return bool(fake_quantizers(model) or observers(model))


def optional_observers(model: nn.Module) -> list[str]:
    """Observers ``model`` may hold without running them (see :meth:`QuantizationFlow.optional_observers`)."""
    return [name for flow in _loaded_flows() if isinstance(flow, Observes) for name in flow.optional_observers(model)]


def is_histogram(observer: nn.Module) -> bool:
    return any(isinstance(flow, Observes) and flow.is_histogram(observer) for flow in _loaded_flows())


def set_bn_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) the BatchNorm statistics of a model: each flow freezes what it made
    (and torch.ao's answer, plain BN layers in eval mode, covers a float model)."""
    for flow in _loaded_flows():
        if isinstance(flow, FreezesBatchNorm):
            flow.set_bn_frozen(model, frozen)


def fused_layers(model: nn.Module) -> list[str]:
    return [name for flow in _loaded_flows() if isinstance(flow, FusesLayers) for name in flow.fused_layers(model)]


def int8_layers(model: nn.Module) -> dict[str, str]:
    """The compute layers of a converted model and their precision (``int8``/``fp16``/``float``)."""
    layers: dict[str, str] = {}
    for flow in _loaded_flows():
        layers.update(flow.int8_layers(model))
    return layers


def has_int8_layers(model: nn.Module) -> bool:
    return any(precision == "int8" for precision in int8_layers(model).values())


def served_by(model: nn.Module) -> str:
    """Where the int8 kernels of a converted model run: ``"eager"``, ``"compiled"`` (pt2e on x86) or
    ``"executorch"`` (pt2e on xnnpack)."""
    flow = flow_of(model)
    return flow.served_by(model) if flow is not None else "eager"


def output_steps(model: nn.Module, output: Any = None) -> list[float]:
    return [step for flow in _loaded_flows() for step in flow.output_steps(model, output)]


def boundaries(model: nn.Module) -> dict[str, Any]:
    flow = capable(flow_of(model), MapsBoundaries)
    return flow.boundaries(model) if flow is not None else {}


def spec_of_model(model: nn.Module) -> FlowSpec | None:
    """The declaration of the flow that prepared or converted ``model`` (``None`` for a float model)."""
    flow = flow_of(model)
    return flow.spec if flow is not None else None


def layer_outputs(model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
    """The ``(inputs, output)`` of each named layer of ``model`` on ``inputs``: asked of the flow that
    made ``model``; forward hooks for a float model."""
    flow = flow_of(model)
    if flow is not None:
        return flow.layer_outputs(model, inputs, names)
    return module_layer_outputs(model, inputs, names)

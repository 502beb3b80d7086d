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
from typing import Any, Protocol

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree

from lightning_quant.quantization.config import Flow, QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.utils.checks import parse_enum


class QuantizationFlow(Protocol):
    """What every flow answers.

    Fake-quantize modules answer ``enable_fake_quant(bool)``, ``enable_observer(bool)`` and carry
    ``fake_quant_enabled``/``observer_enabled`` buffers; observers carry ``min_val``/``max_val``.
    torch.ao's and torchao's classes both do.
    """

    #: the module whose import means models of this flow may exist
    stack: str

    def check(self, config: QuantizationConfig) -> None:
        """Raise before any training on settings this flow cannot honour."""

    def owns(self, model: nn.Module) -> bool:
        """Whether this flow prepared or converted ``model``."""

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        """Fuse, insert observers (PTQ) or fake quantization (QAT) and return the prepared model.

        The flow may reuse and change ``model``'s submodules: pass a copy to keep the float model.
        The prepared model switches with ``train()``/``eval()`` like any module.
        """

    def convert(self, prepared: nn.Module) -> nn.Module:
        """Turn a prepared model (in eval mode, on CPU) into its int8 version, in place."""

    def fake_quantizers(self, model: nn.Module) -> list[tuple[str, Any]]:
        """The fake-quantize modules of a prepared model, by name, in module order."""

    def observers(self, model: nn.Module) -> list[tuple[str, Any]]:
        """The observers (inside fake-quantize modules too), by name, in module order."""

    def optional_observers(self, model: nn.Module) -> list[str]:
        """Names of observers (as :meth:`observers` gives them, or their fake-quantize owners) a model may
        define without running: their never seeing data does not block conversion."""

    def is_histogram(self, observer: nn.Module) -> bool:
        """Whether an observer keeps a histogram (merged over ranks bin by bin)."""

    def set_bn_frozen(self, model: nn.Module, frozen: bool) -> None:
        """Freeze (or unfreeze) BatchNorm running statistics of a prepared model."""

    def fused_layers(self, model: nn.Module) -> list[str]:
        """Names of modules that hold several layers fused into one (reported under their name)."""

    def int8_layers(self, model: nn.Module) -> dict[str, str]:
        """The compute layers of a converted model and what each computes in (``"int8"``, ``"int4"``,
        ``"fp16"`` or ``"float"``), by the name of the layer in the float model."""

    def output_steps(self, model: nn.Module, output: Any = None) -> list[float]:
        """The per-tensor output scales of a converted model's int8 layers; a model that quantizes its
        activations at run time (no fixed scale) answers from its ``output`` when given."""

    def served_by(self, model: nn.Module) -> str:
        """Where a converted model's int8 kernels run, so where it is served and timed: ``"eager"``
        (its modules call them), ``"compiled"`` (``torch.compile`` lowers it) or ``"executorch"``
        (an ExecuTorch program delegates it)."""

    def layer_outputs(self, model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
        """Run ``inputs`` through ``model`` and return the ``(inputs, output)`` of each named layer (the
        names of :meth:`int8_layers`)."""

    def boundaries(self, model: nn.Module) -> dict[str, Any]:
        """Where a converted model moves between int8 and float: ``quantize`` and ``dequantize`` (how
        many such steps its graph takes) and ``float_ops`` (what runs in float between dequantize and
        quantize, kind -> count); empty when activations are not quantized ahead of time."""


def _registry() -> dict[Flow, QuantizationFlow]:
    from lightning_quant.quantization.flows.eager import EagerFlow
    from lightning_quant.quantization.flows.fx import FxFlow
    from lightning_quant.quantization.flows.pt2e import Pt2eFlow
    from lightning_quant.quantization.flows.torchao import TorchaoFlow

    return {Flow.FX: FxFlow(), Flow.EAGER: EagerFlow(), Flow.PT2E: Pt2eFlow(), Flow.TORCHAO: TorchaoFlow()}


FLOWS: dict[Flow, QuantizationFlow] = {}


def get_flow(flow: Flow | str) -> QuantizationFlow:
    """The flow object for ``flow`` (``"fx"``, ``"eager"``, ``"pt2e"`` or ``"torchao"``)."""
    if not FLOWS:
        FLOWS.update(_registry())
    return FLOWS[parse_enum(Flow, flow, "flow")]


def _loaded_flows() -> list[QuantizationFlow]:
    """One flow per imported stack (fx and eager share torch.ao's module classes)."""
    get_flow(Flow.FX)
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
    flow = flow_of(model)
    view = getattr(flow, "inference_view", None)
    return view(model) if view is not None else model


def fake_quantizers(model: nn.Module) -> list[tuple[str, Any]]:
    """The fake-quantize modules of ``model``, whichever flow prepared it."""
    return [item for flow in _loaded_flows() for item in flow.fake_quantizers(model)]


def observers(model: nn.Module) -> list[tuple[str, Any]]:
    """The observers of ``model`` (inside fake-quantize modules too), whichever flow prepared it."""
    return [item for flow in _loaded_flows() for item in flow.observers(model)]


def quantizer_modules(model: nn.Module) -> set[int]:
    """``id()`` of every fake-quantize and observer module: what is not a layer of the model."""
    return {id(m) for _, m in fake_quantizers(model)} | {id(m) for _, m in observers(model)}


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` carries observers or fake quantization (prepared by a flow)."""
    return bool(fake_quantizers(model) or observers(model))


def optional_observers(model: nn.Module) -> list[str]:
    """Observers ``model`` may hold without running them (see :meth:`QuantizationFlow.optional_observers`)."""
    return [name for flow in _loaded_flows() for name in flow.optional_observers(model)]


def is_histogram(observer: nn.Module) -> bool:
    return any(flow.is_histogram(observer) for flow in _loaded_flows())


def set_bn_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) the BatchNorm statistics of a model: each flow freezes what it made
    (and torch.ao's answer, plain BN layers in eval mode, covers a float model)."""
    for flow in _loaded_flows():
        flow.set_bn_frozen(model, frozen)


def fused_layers(model: nn.Module) -> list[str]:
    return [name for flow in _loaded_flows() for name in flow.fused_layers(model)]


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
    flow = flow_of(model)
    return flow.boundaries(model) if flow is not None else {}


#: graph nodes that compute nothing on tensors (shapes, checks, item access)
_BOOKKEEPING = {"getattr", "getitem", "size", "dim", "_assert", "eq", "ne", "floordiv", "numel", "len"}


def graph_boundaries(
    graph: torch.fx.Graph, quantizes: Any, dequantizes: Any, kind: Any, lowered: Any = None
) -> dict[str, Any]:
    """:meth:`QuantizationFlow.boundaries` of one graph: ``quantizes(node)``/``dequantizes(node)`` say
    which nodes cross, ``kind(node)`` names what a float node computes. A node is float when one
    of its inputs is a dequantize node or another float node; ``lowered(node)`` (a reference graph
    whose int8 ops are written in float between dequantize and quantize) marks those that are not."""
    quantize = dequantize = 0
    floating: set[torch.fx.Node] = set()
    float_ops: dict[str, int] = {}
    for node in graph.nodes:
        if quantizes(node):
            quantize += 1
        elif dequantizes(node):
            dequantize += 1
            floating.add(node)
        elif node.op in ("call_module", "call_function", "call_method") and any(
            source in floating for source in node.all_input_nodes
        ):
            floating.add(node)
            name = kind(node)
            if name not in _BOOKKEEPING and not (lowered is not None and lowered(node)):
                float_ops[name] = float_ops.get(name, 0) + 1
    ordered = dict(sorted(float_ops.items(), key=lambda item: -item[1]))
    return {"quantize": quantize, "dequantize": dequantize, "float_ops": ordered}


def layer_outputs(model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
    """The ``(inputs, output)`` of each named layer of ``model`` on ``inputs``: asked of the flow that
    made ``model``; forward hooks for a float model."""
    flow = flow_of(model)
    if flow is not None:
        return flow.layer_outputs(model, inputs, names)
    return module_layer_outputs(model, inputs, names)


def module_layer_outputs(
    model: nn.Module, inputs: ExampleInputs, names: list[str], quantizers: dict[str, str] | None = None
) -> dict[str, tuple[Any, Any]]:
    """``(input, output)`` of the named submodules of ``model`` on ``inputs``, in call order.

    ``quantizers`` maps a layer to the module that fake-quantizes its output in a graph (an FX
    observer): where that module is called on the layer's output, its result stands for the
    output, so a prepared model's layers compare with the int8 model's requantized outputs.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    captured: dict[str, tuple[Any, Any]] = {}
    raw: dict[str, Any] = {}  # the output object itself, to recognise the call that quantizes it
    handles = []
    for name in names:
        if name not in modules:
            continue

        def hook(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
            if name not in captured:  # copies: an in-place op later (ReLU(inplace=True)) must not change them
                captured[name], raw[name] = (_copied(args), _copied(output)), output

        handles.append(modules[name].register_forward_hook(hook))
        quantizer = (quantizers or {}).get(name)
        if quantizer in modules:

            def requantized(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
                if name in raw and args and args[0] is raw[name]:
                    captured[name], raw[name] = (captured[name][0], _copied(output)), output

            handles.append(modules[quantizer].register_forward_hook(requantized))
    try:
        inputs(model)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _copied(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)

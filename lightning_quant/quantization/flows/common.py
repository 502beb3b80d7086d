"""What the flows share: the protocol every flow answers, the capabilities some offer, and graph helpers.

The flows import this module, never the registry (``flows/__init__``) that imports them. A capability is a
small protocol a flow object implements or not; callers ask ``isinstance(flow, KeepsFloat)``, never which
flow it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree

from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.options import ExportTarget

if TYPE_CHECKING:
    from lightning_quant.quantization.config import QuantizationConfig
    from lightning_quant.quantization.flows.spec import FlowSpec


@runtime_checkable
class QuantizationFlow(Protocol):
    """What every flow answers.

    Fake-quantize modules answer ``enable_fake_quant(bool)``, ``enable_observer(bool)`` and carry
    ``fake_quant_enabled``/``observer_enabled`` buffers; observers carry ``min_val``/``max_val``.
    torch.ao's and torchao's classes both do.
    """

    #: the module whose import means models of this flow may exist
    stack: str
    #: what it declares (backends, export targets, modes, options)
    spec: FlowSpec

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


@runtime_checkable
class Observes(Protocol):
    """A flow whose prepared models hold observers (ranges estimated from the data they see)."""

    def observers(self, model: nn.Module) -> list[tuple[str, Any]]:
        """The observers (inside fake-quantize modules too), by name, in module order."""

    def optional_observers(self, model: nn.Module) -> list[str]:
        """Names of observers (as :meth:`observers` gives them, or their fake-quantize owners) a model may
        define without running: their never seeing data does not block conversion."""

    def is_histogram(self, observer: nn.Module) -> bool:
        """Whether an observer keeps a histogram (merged over ranks bin by bin)."""


@runtime_checkable
class FreezesBatchNorm(Protocol):
    """A flow that owns the BatchNorm layers of its prepared models (folded or fused with a conv)."""

    def set_bn_frozen(self, model: nn.Module, frozen: bool) -> None:
        """Freeze (or unfreeze) BatchNorm running statistics of a prepared model."""


@runtime_checkable
class FusesLayers(Protocol):
    """A flow that fuses layers into one module (conv + bn + relu)."""

    def fused_layers(self, model: nn.Module) -> list[str]:
        """Names of modules that hold several layers fused into one (reported under their name)."""


@runtime_checkable
class MapsBoundaries(Protocol):
    """A flow whose converted models move between int8 and float at fixed points of a graph."""

    def boundaries(self, model: nn.Module) -> dict[str, Any]:
        """Where a converted model moves between int8 and float: ``quantize`` and ``dequantize`` (how
        many such steps its graph takes) and ``float_ops`` (what runs in float between dequantize and
        quantize, kind -> count); empty when activations are not quantized ahead of time."""


@runtime_checkable
class KeepsFloat(Protocol):
    """A flow whose conversion can leave layers float after preparation, without preparing again."""

    def convert_keeping_float(self, prepared: nn.Module, names: Sequence[str]) -> nn.Module:
        """:meth:`QuantizationFlow.convert` with the named layers left in float."""


@runtime_checkable
class ChecksModel(Protocol):
    """A flow that plans each layer of a model before preparing it."""

    def check_model(self, model: nn.Module, config: QuantizationConfig) -> None:
        """Raise before any training on a model ``config`` cannot quantize."""

    def quantizes_any(self, model: nn.Module, config: QuantizationConfig) -> bool:
        """Whether ``config`` leaves any layer of ``model`` to quantize (a search may keep all float)."""


@runtime_checkable
class QuantizesWithoutData(Protocol):
    """A flow with post-training modes that need no calibration data: torch.ao's dynamic int8 (fx, eager), torchao's
    weight-only and dynamic schemes."""

    def quantize_without_data(
        self,
        model: nn.Module,
        config: QuantizationConfig,
        module_types: tuple[type, ...] = (),
        dtype: str = "qint8",
        engine: str | None = None,
        allow_float: bool = False,
    ) -> nn.Module:
        """An int8 copy of ``model`` (not modified), in eval mode without gradients. ``module_types`` and ``dtype``:
        torch.ao's dynamic mode; ``allow_float``: a config that keeps every layer float (a search's last step)
        gives a float copy instead of a refusal."""


@runtime_checkable
class WritesWeights(Protocol):
    """A flow whose int8 models are written as weight files of its own (tensor subclasses)."""

    def float_skeleton(self, model: nn.Module) -> nn.Module:
        """A float model of ``model``'s structure, for its weight files to load into."""

    def weights_bytes(self, model: nn.Module, target: ExportTarget) -> bytes:
        """The bytes of ``model``'s weight file for ``target`` (``state_dict`` or ``safetensors``)."""

    def load_weights(
        self, model: nn.Module, data: bytes, target: ExportTarget, source: Any = "the weights", state: Any = None
    ) -> nn.Module:
        """``model`` holding the int8 weights of ``data`` (already read and checked; ``state``: its payload)."""


@runtime_checkable
class WritesHuggingFace(Protocol):
    """A flow whose int8 models ``transformers`` loads: it says, as a torchao config, what each layer holds."""

    def layer_configs(self, model: nn.Module) -> dict[str, Any]:
        """``{module name: the torchao config its weight was converted with}`` of a converted model."""


@runtime_checkable
class CapturesModel(Protocol):
    """A flow whose prepared model is a graph captured from the model, not the model's own class."""

    def source_class(self, model: nn.Module) -> str:
        """The class name of the model ``model`` was captured from."""


@runtime_checkable
class RecordsActivationCodes(Protocol):
    """A flow whose int8 models remember the uint8 codes their activations were calibrated to."""

    def activation_codes(self, model: nn.Module) -> tuple[int, int] | None:
        """The codes (lowest, highest) of ``model``'s calibrated activations; ``None`` if not recorded."""


@runtime_checkable
class HasInferenceView(Protocol):
    """A flow whose QAT model trained on a call with training-only inputs (labels) and predicts with another."""

    def inference_view(self, prepared: nn.Module) -> nn.Module:
        """The prediction graph of ``prepared`` with its trained state."""


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

"""What the fx and eager flows answer about models built by ``torch.ao.quantization``.

Both flows build their prepared and converted models from torch.ao's classes (fake quantizers,
observers, fused intrinsic modules, quantized modules), so the answers are shared here.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization import FakeQuantizeBase, FixedQParamsFakeQuantize, QConfigMapping
from torch.ao.quantization.observer import FixedQParamsObserver, HistogramObserver, ObserverBase

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.utils.modules import within

#: every BatchNorm layer, SyncBatchNorm (what Trainer(sync_batchnorm=True) swaps in) included
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_BOUNDARY_TYPES = ("Quantize", "DeQuantize", "FloatFunctional", "QFunctional")
_QUANTIZE_FUNCTIONS = (torch.quantize_per_tensor, torch.quantize_per_tensor_dynamic, torch.quantize_per_channel)


def is_quantized_module(module: nn.Module) -> bool:
    """torch.ao's quantized, intrinsic.quantized and dynamic modules, and subclasses of them."""
    return any(
        cls.__module__.startswith("torch.ao.nn.") and ".quantized" in cls.__module__ for cls in type(module).__mro__
    )


def fused_names(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that hold fused layers (torch.ao's intrinsic modules)."""
    return [name for name, module in model.named_modules() if isinstance(module, _FusedModule)]


def _float32_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return (x.float(), *args[1:])
    return None


def fake_quantize_in_float32(model: nn.Module, base: type = FakeQuantizeBase) -> nn.Module:
    """Every fake quantizer of ``model`` takes its input in float32 (``Trainer(precision="bf16-mixed")``
    hands it bfloat16 activations, which torch.ao's fake quantization kernels refuse); it returns float32,
    the exact values of the int8 grid, and autocast casts them again for the next layer. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, base):  # torch.ao's, or torchao's pt2e fake quantizers (``base``)
            module.register_forward_pre_hook(_float32_input)
    return model


def _quantizer(module: nn.Module) -> bool:
    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _trained_qparams(fake_quantizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake quantizer's own scale and zero point, in the dtypes and shapes its observer gives.

    Where a channel's zero point differs from the observer's, the observer's pair is kept for that
    channel: torch's fused fake quantizer gives a symmetric scheme's single-signed channels an
    affine zero point (-128 for an all-positive weight row), which int8 kernels for symmetric
    weights do not honour (Inductor's x86 linear at batch 8 then differed from the model it was
    compiled from by 0.48 on outputs of at most 0.53).
    """
    scale, zero_point = type(fake_quantizer).calculate_qparams(fake_quantizer)
    trained_scale = fake_quantizer.scale.to(scale.dtype).reshape(scale.shape)
    trained_zero_point = fake_quantizer.zero_point.to(zero_point.dtype).reshape(zero_point.shape)
    same = trained_zero_point == zero_point
    return torch.where(same, trained_scale, scale), torch.where(same, trained_zero_point, zero_point)


def convert_with_trained_qparams(prepared: nn.Module, base: type = FakeQuantizeBase) -> None:
    """Make conversion quantize as the fake-quant model computes: with the scales and zero points
    its fake quantizers hold, observers stopped (applied in place, to the copy about to be converted).

    torch converts with each fake quantizer's ``calculate_qparams()``, which asks its observer
    again, after one more observation of each weight. Both move the result off what QAT trained:
    the observation is one more moving-average step, and for per-channel symmetric weights the
    fused fake quantizer QAT trains with (``FusedMovingAvgObsFakeQuantize``) divides by 127 or 128
    (the side of the larger magnitude) where its observer divides by 127.5: scales up to 0.4%
    apart, so about a fifth of the weights round to a neighbour the model never trained with
    (torchvision's ResNet-18 after 3 QAT steps: int8 against its own fake-quant model cosine 0.986,
    0.998 with the trained scales). ``base`` is the fake-quantizer class of the stack (torch.ao's,
    or torchao's copy for pt2e).
    """
    for module in prepared.modules():
        if (
            isinstance(module, base)
            and isinstance(getattr(module, "scale", None), torch.Tensor)
            and isinstance(getattr(module, "zero_point", None), torch.Tensor)
        ):
            module.enable_observer(False)  # type: ignore[operator]
            setattr(module, "calculate_qparams", types.MethodType(_trained_qparams, module))  # noqa: B010


#: converted model -> the uint8 codes its calibrated activations span (see :func:`record_activation_codes`)
_ACTIVATION_CODES: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def calibrated_codes(prepared: nn.Module) -> tuple[int, int] | None:
    """The uint8 codes (lowest, highest) the observing activation quantizers of ``prepared`` calibrate to:
    ``quant_min``/``quant_max`` of every ``quint8`` observer or fake quantizer, the fixed ranges of sigmoid, tanh
    and softmax left out (their zero points are 0 or 128); ``None`` when it has none."""
    ranges = []
    for m in prepared.modules():
        lowest, highest = getattr(m, "quant_min", None), getattr(m, "quant_max", None)
        if (
            _quantizer(m)
            and not isinstance(m, (FixedQParamsObserver, FixedQParamsFakeQuantize))
            and getattr(m, "dtype", None) == torch.quint8
            and isinstance(lowest, int)
            and isinstance(highest, int)
        ):
            ranges.append((lowest, highest))
    if not ranges:
        return None
    return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def record_activation_codes(converted: nn.Module, codes: tuple[int, int] | None) -> nn.Module:
    """Remember ``codes`` (:func:`calibrated_codes` of the prepared model, read before converting it) for
    ``converted``, so a writer of its file knows which uint8 codes hold calibrated values; returns ``converted``."""
    if codes is not None:
        _ACTIVATION_CODES[converted] = codes
    return converted


def _output_quantizers(model: nn.Module) -> dict[str, str]:
    """Layer name -> the observer (or fake quantizer) module its output goes to, in an FX graph."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return {}
    modules = dict(model.named_modules(remove_duplicate=False))
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or _quantizer(modules.get(str(node.target), nn.Identity())):
            continue
        for user in node.users:
            if user.op == "call_module" and user.args[0] is node and _quantizer(modules[str(user.target)]):
                found[str(node.target)] = str(user.target)
                break
    return found


class TorchAoModels:
    """The answers of :class:`~lightning_quant.quantization.flows.QuantizationFlow` about torch.ao models."""

    stack = "torch.ao.quantization"

    def check(self, config: QuantizationConfig) -> None:
        """Raises ``TypeError`` on a ``qconfig_mapping`` that is not a torch.ao ``QConfigMapping``."""
        if config.qconfig_mapping is not None and not isinstance(config.qconfig_mapping, QConfigMapping):
            raise TypeError(
                "qconfig_mapping must be a torch.ao.quantization.QConfigMapping or None, "
                f"got {type(config.qconfig_mapping).__name__}"
            )

    def quantize_without_data(
        self,
        model: nn.Module,
        config: QuantizationConfig,
        module_types: tuple[type, ...] = (),
        dtype: str = "qint8",
        engine: str | None = None,
        allow_float: bool = False,
    ) -> nn.Module:
        """torch.ao's dynamic int8 (:func:`~lightning_quant.quantization.flows.dynamic.quantize_dynamic_copy`)."""
        from lightning_quant.quantization.flows.dynamic import DEFAULT_DYNAMIC_TYPES, quantize_dynamic_copy

        return quantize_dynamic_copy(model, config, module_types or DEFAULT_DYNAMIC_TYPES, dtype, engine)

    def owns(self, model: nn.Module) -> bool:
        return any(_quantizer(m) or is_quantized_module(m) for m in model.modules())

    def activation_codes(self, model: nn.Module) -> tuple[int, int] | None:
        return _ACTIVATION_CODES.get(model)

    def fake_quantizers(self, model: nn.Module) -> list[tuple[str, Any]]:
        return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)]

    def observers(self, model: nn.Module) -> list[tuple[str, Any]]:
        return [(name, m) for name, m in model.named_modules() if isinstance(m, ObserverBase)]

    def is_histogram(self, observer: nn.Module) -> bool:
        return isinstance(observer, HistogramObserver)

    def optional_observers(self, model: nn.Module) -> list[str]:
        """Observers of ``FloatFunctional`` adders and multipliers: models define them per block and
        call them only where the block has a residual (torchvision's quantizable nets)."""
        from torch.ao.nn.quantized import FloatFunctional

        return [
            f"{name}.{child}" if name else child
            for name, module in model.named_modules()
            if isinstance(module, FloatFunctional)
            for child, observer in module.named_children()
            if _quantizer(observer)
        ]

    def set_bn_frozen(self, model: nn.Module, frozen: bool) -> None:
        """Fused QAT Conv/Linear-BN modules keep a ``freeze_bn`` flag. Plain BN layers are put in
        eval mode, which Lightning undoes when it switches the model back to training, so the
        schedule calls this again then."""
        for m in model.modules():
            if hasattr(m, "freeze_bn_stats") and hasattr(m, "freeze_bn"):
                getattr(m, "freeze_bn_stats" if frozen else "update_bn_stats")()
            elif isinstance(m, _BATCHNORMS) and frozen:
                m.eval()

    def fused_layers(self, model: nn.Module) -> list[str]:
        return fused_names(model)

    def int8_layers(self, model: nn.Module) -> dict[str, str]:
        """Quantized compute modules (``int8``; ``fp16`` for half-precision dynamic weights), and
        leaf modules with their own weights (``float``), when the model has any quantized module."""
        if not any(is_quantized_module(m) for m in model.modules()):
            return {}
        layers: dict[str, str] = {}
        for name, module in model.named_modules():
            if not name or _quantizer(module) or within(name, list(layers), strictly=True):
                continue  # a quantized layer's own parts (its packed weights) are not layers
            if is_quantized_module(module):
                if type(module).__name__ not in _BOUNDARY_TYPES:
                    packed = getattr(module, "_packed_params", None)
                    dtype = getattr(packed, "dtype", None) or getattr(module, "dtype", None)
                    layers[name] = "fp16" if dtype == torch.float16 else "int8"
            elif not any(not _quantizer(c) for c in module.children()) and any(
                True for _ in module.parameters(recurse=False)
            ):
                layers[name] = "float"
        return layers

    def output_steps(self, model: nn.Module, output: Any = None) -> list[float]:
        steps = []
        for m in model.modules():
            scale = getattr(m, "scale", None)
            if type(m).__module__.startswith("torch.ao.nn.") and (
                isinstance(scale, float) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)
            ):
                steps.append(float(scale))
        return steps

    def served_by(self, model: nn.Module) -> str:
        return "eager"  # torch.ao's quantized modules call their int8 kernels directly

    def boundaries(self, model: nn.Module) -> dict[str, Any]:
        """FX: the graph's ``quantize_per_tensor`` calls and ``dequantize`` methods, and the float ops
        between; eager: the ``Quantize``/``DeQuantize`` modules and the float layers (what forward
        calls in between is not visible). Dynamic models quantize inside each layer: empty."""
        from lightning_quant.quantization.flows.common import graph_boundaries

        graph = getattr(model, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            modules = dict(model.named_modules())

            def kind(node: torch.fx.Node) -> str:
                if node.op == "call_module":
                    return type(modules[str(node.target)]).__name__
                return getattr(node.target, "__name__", str(node.target))

            return graph_boundaries(
                graph,
                lambda node: node.op == "call_function" and node.target in _QUANTIZE_FUNCTIONS,
                lambda node: (
                    (node.op == "call_method" and node.target == "dequantize")
                    or (node.op == "call_function" and node.target is torch.dequantize)
                ),
                kind,
            )
        names = [type(m).__name__ for m in model.modules()]
        if "Quantize" not in names:
            return {}
        floats = [type(model.get_submodule(n)).__name__ for n, p in self.int8_layers(model).items() if p == "float"]
        return {
            "quantize": names.count("Quantize"),
            "dequantize": names.count("DeQuantize"),
            "float_ops": {kind: floats.count(kind) for kind in sorted(set(floats), key=floats.count, reverse=True)},
        }

    def layer_outputs(self, model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
        """Module hooks. A prepared model's layer output is taken after what fake-quantizes it (the
        int8 model requantizes it there): in eager mode the layer's own hook applies it already; in
        an FX graph it is the observer module the output goes to next."""
        from lightning_quant.quantization.flows.common import module_layer_outputs

        return module_layer_outputs(model, inputs, names, _output_quantizers(model))

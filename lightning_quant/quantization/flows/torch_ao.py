"""What the fx and eager flows answer about models built by ``torch.ao.quantization``.

Both flows build their prepared and converted models from torch.ao's classes (fake quantizers,
observers, fused intrinsic modules, quantized modules), so the answers are shared here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization import FakeQuantizeBase, QConfigMapping
from torch.ao.quantization.observer import HistogramObserver, ObserverBase

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.utils.modules import within

#: every BatchNorm layer, SyncBatchNorm (what Trainer(sync_batchnorm=True) swaps in) included
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_BOUNDARY_TYPES = ("Quantize", "DeQuantize", "FloatFunctional", "QFunctional")


def _is_quantized_module(module: nn.Module) -> bool:
    kind = type(module).__module__
    return kind.startswith("torch.ao.nn.") and ".quantized" in kind  # quantized, intrinsic.quantized, dynamic


def _quantizer(module: nn.Module) -> bool:
    return isinstance(module, (ObserverBase, FakeQuantizeBase))


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

    def owns(self, model: nn.Module) -> bool:
        return any(_quantizer(m) or _is_quantized_module(m) for m in model.modules())

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
        return [name for name, m in model.named_modules() if isinstance(m, _FusedModule)]

    def int8_layers(self, model: nn.Module) -> dict[str, str]:
        """Quantized compute modules (``int8``; ``fp16`` for half-precision dynamic weights), and
        leaf modules with their own weights (``float``), when the model has any quantized module."""
        if not any(_is_quantized_module(m) for m in model.modules()):
            return {}
        layers: dict[str, str] = {}
        for name, module in model.named_modules():
            if not name or _quantizer(module) or within(name, list(layers), strictly=True):
                continue  # a quantized layer's own parts (its packed weights) are not layers
            if _is_quantized_module(module):
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

    def layer_outputs(self, model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
        from lightning_quant.quantization.flows import module_layer_outputs

        return module_layer_outputs(model, inputs, names)

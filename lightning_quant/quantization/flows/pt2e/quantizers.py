"""The pt2e flow's quantizers: the backend's (X86Inductor, XNNPACK) with our observers and per-layer rules."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.config import Backend, Observer, Precision, QuantizationConfig
from lightning_quant.quantization.layers import LayerRules


def quantizer_classes() -> tuple[type, type]:
    """torchao pt2e's fake-quantize and observer base classes."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import ObserverBase

    return FakeQuantizeBase, ObserverBase


def _observer_class(observer: Observer) -> Any:
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    return {
        Observer.MOVING_AVERAGE: MovingAverageMinMaxObserver,
        Observer.MINMAX: MinMaxObserver,
        Observer.HISTOGRAM: HistogramObserver,
    }[observer]


def _with_observer(spec: Any, observer: Observer, qat: bool) -> Any:
    """An activation spec whose range comes from ``observer`` (QAT: inside fake quantization)."""
    from lightning_quant.quantization.flows.pt2e.fake_quantize import CpuFakeQuantizePt2e, CpuFusedFakeQuantizePt2e

    if spec is None or getattr(spec, "is_dynamic", False):
        return spec
    cls = _observer_class(observer)
    if qat:
        # torchao's quantizers, vectorized on CPU (the same numbers: see flows/fake_quantize.py)
        fake = CpuFusedFakeQuantizePt2e if observer is Observer.MOVING_AVERAGE else CpuFakeQuantizePt2e
        ctr = fake.with_args(observer=cls)
    else:
        ctr = cls.with_args(eps=2**-12)
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)


def _per_tensor_weights(spec: Any, qat: bool) -> Any:
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import MinMaxObserver, MovingAverageMinMaxObserver

    ctr = (
        FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver)
        if qat
        else MinMaxObserver.with_args(eps=2**-12)
    )
    return dataclasses.replace(spec, qscheme=torch.per_tensor_symmetric, ch_axis=None, observer_or_fake_quant_ctr=ctr)


def quantization_config(backend: Backend, observer: Observer, per_channel: bool, qat: bool) -> Any:
    """The torchao ``QuantizationConfig`` of one setting: the backend's recipe with our observer
    for activations and per-channel or per-tensor weights."""
    if backend is Backend.X86:
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            get_default_x86_inductor_quantization_config,
        )

        base = get_default_x86_inductor_quantization_config(is_qat=qat)
    else:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

        base = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    weight = base.weight
    if not per_channel and backend is Backend.X86:
        weight = _per_tensor_weights(weight, qat)
    return dataclasses.replace(
        base,
        input_activation=_with_observer(base.input_activation, observer, qat),
        output_activation=_with_observer(base.output_activation, observer, qat),
        weight=weight,
    )


def build_quantizer(model: nn.Module, config: QuantizationConfig, rules: LayerRules, qat: bool) -> Any:
    """The backend quantizer with the global setting and one per layer rule."""
    assert isinstance(config.per_channel, bool)

    def setting_config(setting: Any) -> Any:
        if setting.precision is Precision.FLOAT:
            return None
        per_channel = bool(config.per_channel if setting.per_channel is None else setting.per_channel)
        return quantization_config(config.backend, setting.observer or config.observer, per_channel, qat)

    quantizer: Any
    global_config = quantization_config(config.backend, config.observer, config.per_channel, qat)
    if config.backend is Backend.X86:
        from lightning_quant.quantization.flows.pt2e.x86 import X86Quantizer

        # torchao's X86InductorQuantizer, attention's score product in int8 with the activations' observer, and
        # embeddings' rows in int8 (per row whatever per_channel says: see flows/pt2e/x86.py)
        rows = quantization_config(config.backend, config.observer, True, qat).weight

        def kept_float(name: str, module: nn.Module) -> bool:
            setting = rules.setting_of(name, module)
            return setting is not None and setting.precision is Precision.FLOAT

        embeddings = {
            name: None if kept_float(name, module) else rows
            for name, module in model.named_modules()
            if isinstance(module, nn.Embedding)
        }
        quantizer = X86Quantizer(global_config.input_activation.observer_or_fake_quant_ctr, embeddings)
        by_name, by_type = quantizer.set_module_name_qconfig, quantizer.set_module_type_qconfig
    else:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

        quantizer = XNNPACKQuantizer()
        by_name, by_type = quantizer.set_module_name, quantizer.set_module_type
    quantizer.set_global(global_config)
    for name, setting in rules.names.items():
        by_name(name, setting_config(setting))
    for cls, setting in rules.types:
        if config.backend is Backend.X86 and issubclass(cls, nn.Embedding):
            continue  # the x86 quantizer's own part (above); torchao's would warn it cannot take the type
        by_type(cls, setting_config(setting))
    return quantizer

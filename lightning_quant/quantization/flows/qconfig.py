"""Build the torch ``QConfigMapping`` that says how each layer is quantized.

One function serves QAT and PTQ and both flows, so a backend, observer or skip list means
the same thing everywhere:

- activations: the chosen ``observer`` (moving average, min/max or histogram), ``quint8``;
  on x86/fbgemm the range is 0..127 (``reduce_range``: these kernels can overflow without
  VNNI), on qnnpack the full 0..255;
- weights: symmetric ``qint8`` -128..127, per channel when ``per_channel`` is on; min/max
  for PTQ (weights do not change), moving-average min/max for QAT (they do);
- QAT wraps both in fake quantization: torch's fused moving-average quantizer (weights, and
  activations with the moving-average observer) or its ``FakeQuantize`` (activations with the min/max
  and histogram observers), the activations' with their fake quantization vectorized on CPU
  (:mod:`.fake_quantize`: the same numbers);
- torch's per-operator entries for the backend (fixed ranges for sigmoid, tanh, softmax...)
  are kept, because converting those ops needs them;
- embeddings (``nn.Embedding``, ``nn.EmbeddingBag``) are weight-only int8: a scale and offset per
  row (torch's ``float_qparams`` scheme, the only one its int8 lookups take), float output; their
  integer indices are not quantized; float when exporting to ONNX (no int8 lookup there);
- every ``skip`` entry is mapped to ``None`` (kept in float).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch.ao.quantization import (
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_embedding_qat_qconfig,
    float_qparams_weight_only_qconfig,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)

from lightning_quant.quantization.config import (
    Backend,
    ExportTarget,
    LayerSetting,
    Observer,
    Precision,
    QuantizationConfig,
)
from lightning_quant.quantization.flows.fake_quantize import CpuFakeQuantize, CpuFusedFakeQuantize
from lightning_quant.quantization.fusion import fusable_groups
from lightning_quant.quantization.layers import check_static_setting, resolve_layers, resolve_skip
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.modules import within

_ACTIVATION_OBSERVERS: dict[Observer, Any] = {
    Observer.MOVING_AVERAGE: MovingAverageMinMaxObserver,
    Observer.MINMAX: MinMaxObserver,
    Observer.HISTOGRAM: HistogramObserver,
}


def activation_range(backend: Backend) -> tuple[int, int]:
    """The ``quint8`` activation range the backend's kernels use."""
    return (0, 255) if backend is Backend.QNNPACK else (0, 127)


def build_qconfig(config: QuantizationConfig, qat: bool) -> QConfig:
    """The layer-level ``QConfig`` for the options in ``config`` (QAT: with fake quantization)."""
    quant_min, quant_max = activation_range(config.backend)
    act_kwargs = dict(dtype=torch.quint8, quant_min=quant_min, quant_max=quant_max, qscheme=torch.per_tensor_affine)
    weight_observer: Any
    if config.per_channel:
        weight_kwargs = dict(dtype=torch.qint8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric)
        weight_observer = MovingAveragePerChannelMinMaxObserver if qat else PerChannelMinMaxObserver
    else:
        weight_kwargs = dict(dtype=torch.qint8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric)
        weight_observer = MovingAverageMinMaxObserver if qat else MinMaxObserver
    act_observer = _ACTIVATION_OBSERVERS[config.observer]
    if not qat:
        return QConfig(
            activation=act_observer.with_args(**act_kwargs), weight=weight_observer.with_args(**weight_kwargs)
        )
    act_fake_quant = CpuFusedFakeQuantize if act_observer is MovingAverageMinMaxObserver else CpuFakeQuantize
    return QConfig(
        activation=act_fake_quant.with_args(observer=act_observer, **act_kwargs),
        weight=FusedMovingAvgObsFakeQuantize.with_args(observer=weight_observer, **weight_kwargs),
    )


EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def embedding_qconfig(qat: bool, config: QuantizationConfig) -> QConfig | None:
    """Weight-only int8 for an embedding: per-row scale and offset (QAT: fake quantized as it trains);
    float where the model is exported to ONNX, whose exporter has no int8 lookup."""
    if isinstance(config.export, tuple) and ExportTarget.ONNX in config.export:
        return None
    return default_embedding_qat_qconfig if qat else float_qparams_weight_only_qconfig


def qconfig_for(config: QuantizationConfig, setting: LayerSetting | None, qat: bool) -> QConfig | None:
    """The ``QConfig`` of a layer with ``setting`` (``None``: the global one; float: ``None``)."""
    if setting is None:
        return build_qconfig(config, qat)
    if setting.precision is Precision.FLOAT:
        return None
    own = dataclasses.replace(
        config,
        observer=setting.observer or config.observer,
        per_channel=config.per_channel if setting.per_channel is None else setting.per_channel,
        skip=(),
        layers=(),
        export=(),
    )
    return build_qconfig(own, qat)


def build_qconfig_mapping(config: QuantizationConfig, model: nn.Module, qat: bool) -> QConfigMapping:
    """The whole ``QConfigMapping`` for ``model``: ``config.qconfig_mapping`` if given, else built."""
    if config.qconfig_mapping is not None:
        return config.qconfig_mapping
    with known_torch_warnings_silenced():
        default = get_default_qat_qconfig_mapping if qat else get_default_qconfig_mapping
        mapping = default(config.engine)
        mapping.set_global(build_qconfig(config, qat))
    for embedding in EMBEDDINGS:
        mapping.set_object_type(embedding, embedding_qconfig(qat, config))
    skip_names, skip_types = resolve_skip(model, config.skip)
    for name in skip_names:  # skipped layers are also left untraced by FX, so never fused
        mapping.set_module_name(name, None)
    for module_type in skip_types:
        mapping.set_object_type(module_type, None)
    rules = resolve_layers(model, dataclasses.replace(config, skip=()))
    for key, setting in rules.items():
        check_static_setting(key, setting, config.flow.value)
    if not (rules.names or rules.types):
        return mapping
    # Every module gets its own setting by name (nearest name, else type, else global), so that
    # torch's order (name before type) cannot differ from ours; layers fused together
    # (Conv/BN/ReLU, Linear/ReLU) take the setting of the first, as torch needs one per group.
    modules = {
        name: module
        for name, module in model.named_modules()
        if name and not within(name, skip_names) and not isinstance(module, skip_types)
    }
    own = {name: rules.setting_of(name, module) for name, module in modules.items()}
    effective = dict(own)
    for group in fusable_groups(model):
        if all(name in modules for name in group):
            for name in group[1:]:
                effective[name] = own[group[0]]
    for name, setting in effective.items():
        if setting is not None or own[name] is not None:
            qconfig = qconfig_for(config, setting, qat)
            if qconfig is not None and isinstance(modules[name], EMBEDDINGS):
                qconfig = embedding_qconfig(qat, config)  # an int8 rule: the int8 an embedding has
            mapping.set_module_name(name, qconfig)
    return mapping

"""Dynamic quantization: int8 weights, activations quantized on the fly (``nn.Linear``, LSTM, GRU).

No calibration is needed. Known torch 2.13 pitfalls handled here rather than left to users:

- a dynamically quantized ``nn.TransformerEncoderLayer`` crashes in eval on its fused fast
  path (it reads ``linear1.weight.device``, a method on quantized Linear), so the fast path
  is switched off on those layers only (their ``activation_relu_or_gelu`` flag, which gates
  nothing else);
- int8 LSTMs give no speed-up on AVX2 machines without VNNI: size shrinks, latency does not.

``nn.Embedding`` may be listed in ``module_types``: its rows are stored in int8 with a scale
each (weight-only), which is where most of a small text model's bytes are.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.ao.nn.quantized as nnq
import torch.nn as nn
from torch.ao.quantization import (
    default_dynamic_qconfig,
    float16_dynamic_qconfig,
    float_qparams_weight_only_qconfig,
    per_channel_dynamic_qconfig,
    quantize_dynamic,
)

from lightning_quant.quantization.config import LayerSetting, Precision, QuantizationConfig
from lightning_quant.quantization.engine import for_inference, quantized_engine
from lightning_quant.quantization.layers import resolve_layers
from lightning_quant.quantization.recipe import attach, dynamic_recipe
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.modules import locate_module_type

DEFAULT_DYNAMIC_TYPES: tuple[type, ...] = (nn.Linear, nn.LSTM, nn.GRU)
DYNAMIC_DTYPES = ("qint8", "float16")


def check_dynamic_options(dtype: str, module_types: Sequence[str | type]) -> tuple[type, ...]:
    """Validate ``dtype`` and resolve ``module_types`` (types or import paths) to module types.

    Raises:
        ValueError: an unknown dtype or a module type that cannot be found.
    """
    if dtype not in DYNAMIC_DTYPES:
        raise ValueError(f"dtype must be one of {DYNAMIC_DTYPES}, got {dtype!r}")
    if isinstance(module_types, (str, type)) or not isinstance(module_types, Sequence) or not module_types:
        raise ValueError(f"module_types must be a non-empty sequence of nn.Module types, got {module_types!r}")
    resolved = []
    for entry in module_types:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            resolved.append(entry)
            continue
        located = locate_module_type(entry) if isinstance(entry, str) else None
        if located is None:
            raise ValueError(
                f"module_types entries must be nn.Module types or import paths like 'torch.nn.LSTM', got {entry!r}"
            )
        resolved.append(located)
    return tuple(resolved)


def _qconfig_for(module_type: type, dtype: str, per_channel: bool):
    if issubclass(module_type, (nn.Embedding, nn.EmbeddingBag)):
        return float_qparams_weight_only_qconfig  # int8 rows with their own scale: weight-only
    if dtype == "float16":
        return float16_dynamic_qconfig
    if per_channel and issubclass(module_type, nn.Linear):
        return per_channel_dynamic_qconfig
    return default_dynamic_qconfig


#: what dynamic mode can run per layer, and the weight dtypes of its kernels
DYNAMIC_PRECISIONS = (Precision.INT8, Precision.FP16, Precision.FLOAT)
_DTYPE_PRECISION = {"qint8": Precision.INT8, "float16": Precision.FP16}


def _dynamic_precision(key: str, setting: LayerSetting, module_type: type) -> Precision:
    """The precision a per-layer setting asks dynamic mode for, or a ValueError naming what runs."""
    if setting.observer is not None:
        raise ValueError(
            f"layers[{key!r}] sets an observer, but dynamic mode quantizes activations at run time and has none; "
            f"a dynamic layer may set {['precision', 'per_channel', 'dtype']}"
        )
    precision = setting.precision
    if setting.dtype is not None:
        if setting.dtype not in _DTYPE_PRECISION:
            raise ValueError(
                f"layers[{key!r}] asks for {setting.dtype!r} weights; dynamic mode's kernels take "
                f"{list(_DTYPE_PRECISION)}"
            )
        precision = _DTYPE_PRECISION[setting.dtype]
    if precision not in DYNAMIC_PRECISIONS:
        raise ValueError(
            f"layers[{key!r}] asks for {precision.value!r}, which dynamic mode cannot run (int4 needs torchao's "
            f"weight schemes); its precisions are {[p.value for p in DYNAMIC_PRECISIONS]}"
        )
    if precision is Precision.FP16 and issubclass(module_type, (nn.Embedding, nn.EmbeddingBag)):
        raise ValueError(f"layers[{key!r}]: embeddings quantize to int8 rows or stay float, not fp16")
    return precision


def dynamic_spec(
    model: nn.Module, config: QuantizationConfig, module_types: tuple[type, ...], dtype: str
) -> dict[str, Any]:
    """Each candidate layer's dynamic qconfig by module name (``None``: kept float), from the global
    ``dtype``/``per_channel`` and ``config.layers`` (a name beats a type beats the global options).

    Raises:
        ValueError: a per-layer setting dynamic mode cannot run, or a layers/skip key the model lacks.
    """
    rules = resolve_layers(model, config)
    spec: dict[str, Any] = {}
    for name, module in model.named_modules():
        # the exact type, as torch matches it: subclasses such as attention's out_proj
        # (NonDynamicallyQuantizableLinear) are not candidates
        if not name or type(module) not in module_types:
            continue
        setting = rules.setting_of(name, module)
        if setting is None:
            spec[name] = _qconfig_for(type(module), dtype, bool(config.per_channel))
            continue
        precision = _dynamic_precision(name, setting, type(module))
        per_channel = bool(config.per_channel if setting.per_channel is None else setting.per_channel)
        spec[name] = (
            None
            if precision is Precision.FLOAT
            else _qconfig_for(type(module), "float16" if precision is Precision.FP16 else "qint8", per_channel)
        )
    return spec


#: engines with half-precision dynamic Linear kernels (qnnpack has none)
FP16_ENGINES = ("x86", "fbgemm")


def check_fp16_engine(spec: dict[str, Any], engine: str) -> None:
    """Refuse fp16 layers for an engine without fp16 kernels.

    Raises:
        ValueError: naming the layers and the engines that run them.
    """
    fp16 = [name for name, qconfig in spec.items() if qconfig is float16_dynamic_qconfig]
    if fp16 and engine not in FP16_ENGINES:
        raise ValueError(
            f"fp16 layers {fp16[:5]} cannot run on the {engine!r} engine, which has no half-precision kernels "
            f"(they run on {list(FP16_ENGINES)}): use int8 or float for them, or drop the 'mobile' export "
            "and backend='qnnpack'"
        )


def disable_transformer_fast_path(model: nn.Module) -> int:
    """Switch off the fused fast path of every ``nn.TransformerEncoderLayer``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    for layer in layers:
        layer.activation_relu_or_gelu = False
    return len(layers)


class ContiguousEmbedding(nnq.Embedding):
    """torch.ao's int8 embedding, taking indices that are not contiguous: its kernel refuses them
    ("Expect weight, indices, and offsets to be contiguous"), and Hugging Face's BERT looks up its
    position ids as a slice of a buffer. Scriptable (the body of the parent's ``forward``)."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.contiguous()
        if self.dtype == torch.quint4x2:
            return torch.ops.quantized.embedding_4bit(self._packed_params._packed_weight, indices)
        return torch.ops.quantized.embedding_byte(self._packed_params._packed_weight, indices)


def _take_any_indices(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nnq.Embedding:
            module.__class__ = ContiguousEmbedding


def quantize_dynamic_copy(
    model: nn.Module,
    config: QuantizationConfig,
    module_types: tuple[type, ...],
    dtype: str,
    engine: str | None = None,
) -> nn.Module:
    """A dynamically quantized copy of ``model``; ``model`` itself is not modified.

    Raises:
        ValueError: ``model`` has no module of ``module_types`` outside ``skip``.
    """
    spec = dynamic_spec(model, config, module_types, dtype)
    check_fp16_engine(spec, engine or config.engine)
    quantizable = [name for name, qconfig in spec.items() if qconfig is not None]
    if not quantizable:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"nothing to quantize dynamically: {type(model).__name__} has no "
            f"{[t.__name__ for t in module_types]} outside skip (its module types: {found}); use a static recipe "
            "(FxRecipe, Pt2eRecipe) for convolutional models"
        )
    float_model = copy.deepcopy(model).cpu().eval()
    with quantized_engine(engine or config.engine), known_torch_warnings_silenced():
        int8 = quantize_dynamic(
            float_model, qconfig_spec=spec, dtype=torch.float16 if dtype == "float16" else torch.qint8
        )
    disable_transformer_fast_path(int8)
    _take_any_indices(int8)
    recipe = {**dynamic_recipe(config, module_types, dtype), "engine": engine or config.engine}
    return attach(for_inference(int8), recipe)

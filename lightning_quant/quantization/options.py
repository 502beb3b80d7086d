"""The values the quantization options take: ``str`` enums, so the strings of a Hydra YAML file work unchanged.

The lowest module of the package's settings: the configs, the recipes and the flows' declarations
(:mod:`lightning_quant.quantization.flows.spec`) all read these, and this module reads none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch.nn as nn

from lightning_quant.utils.checks import parse_enum


class Backend(str, Enum):
    """What the int8 model runs on: ``x86``/``fbgemm`` for servers, ``qnnpack`` (torch.ao flows) or
    ``xnnpack`` (pt2e flow, ExecuTorch) for ARM phones."""

    X86 = "x86"
    FBGEMM = "fbgemm"
    QNNPACK = "qnnpack"
    XNNPACK = "xnnpack"


class Flow(str, Enum):
    """How the model is rewritten: FX graph tracing (automatic), eager module swapping (both on the
    deprecated ``torch.ao.quantization``), ``torch.export`` with torchao's pt2e quantizers, or
    torchao's ``quantize_`` (tensor-subclass weights in the model's own Linear layers; QAT through
    ``QATConfig``)."""

    FX = "fx"
    EAGER = "eager"
    PT2E = "pt2e"
    TORCHAO = "torchao"


class Scheme(str, Enum):
    """What torchao's flow computes a Linear layer in: int8 weights only (activations stay float),
    or int8 activations quantized per token at run time with int8 (per channel) or int4 (per
    group of ``group_size`` input features) weights."""

    INT8_WEIGHT_ONLY = "int8_weight_only"
    INT4_WEIGHT_ONLY = "int4_weight_only"
    INT8_DYN_INT8_WEIGHT = "int8_dyn_int8_weight"
    INT8_DYN_INT4_WEIGHT = "int8_dyn_int4_weight"

    @property
    def dynamic(self) -> bool:
        """Whether activations are quantized (per token, at run time)."""
        return self.value.startswith("int8_dyn")

    @property
    def weight_bits(self) -> int:
        return 4 if self.value.endswith("int4_weight") or self.value.startswith("int4") else 8


class Observer(str, Enum):
    """How activation ranges are estimated."""

    MOVING_AVERAGE = "moving_average"
    MINMAX = "minmax"
    HISTOGRAM = "histogram"


class ExportTarget(str, Enum):
    """Where an int8 model is written for. torch.ao flows: TorchScript for servers, lite interpreter
    for phones, ONNX. pt2e flow: a ``torch.export`` program (``.pt2``) and an ExecuTorch program
    (``.pte``, XNNPACK-delegated). torchao flow: its weights (``state_dict``, ``safetensors``) and a Hugging Face
    folder (``hf``: ``config.json`` with torchao's ``quantization_config`` beside safetensors weights, loaded by
    ``transformers`` and vLLM). pt2e flow on x86: an AOTInductor package (``aoti``: the program compiled ahead of time
    into a shared library with Inductor's int8 kernels, run without Python between kernels)."""

    TORCHSCRIPT = "torchscript"
    MOBILE = "mobile"
    ONNX = "onnx"
    PT2 = "pt2"
    EXECUTORCH = "executorch"
    STATE_DICT = "state_dict"
    SAFETENSORS = "safetensors"
    HF = "hf"
    AOTI = "aoti"


class Precision(str, Enum):
    """What a layer computes in: int8 (the default), float (kept as trained), fp16 (dynamic mode:
    half-precision weights), int4 (torchao weight schemes)."""

    INT8 = "int8"
    FP16 = "fp16"
    INT4 = "int4"
    FLOAT = "float"


class Mode(str, Enum):
    """Post-training modes: static (calibrated activations), dynamic (activations quantized at run
    time) or weight-only (int8/int4 weights, float activations: torchao's flow)."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight_only"


#: the options a layer may set for itself (the rest are the callback's)
LAYER_OPTIONS = ("precision", "observer", "per_channel", "dtype")


@dataclass(frozen=True)
class LayerSetting:
    """How one layer (or every layer of a type, or under a name) is quantized; ``None`` = the global value.

    ``dtype`` names the activation dtype of static int8 layers (only ``"quint8"`` runs on
    fbgemm/x86/qnnpack) or the weight dtype of dynamic layers (``"qint8"``, ``"float16"``);
    a dtype no kernel runs is refused when the flow reads the settings.
    """

    precision: Precision = Precision.INT8
    observer: Observer | None = None
    per_channel: bool | None = None
    dtype: str | None = None


def normalise_setting(key: Any, value: Any) -> LayerSetting:
    if isinstance(value, (str, Precision)):
        return LayerSetting(precision=parse_enum(Precision, value, f"layers[{key!r}]"))
    if not isinstance(value, Mapping):
        raise TypeError(
            f"layers[{key!r}] must be a precision {tuple(p.value for p in Precision)} or a mapping of "
            f"{LAYER_OPTIONS}, got {value!r}"
        )
    unknown = [k for k in value if k not in LAYER_OPTIONS]
    if unknown:
        raise ValueError(f"layers[{key!r}] has options {unknown}; a layer may set {LAYER_OPTIONS}")
    per_channel = value.get("per_channel")
    if per_channel is not None and not isinstance(per_channel, bool):
        raise TypeError(f"layers[{key!r}].per_channel must be True, False or None, got {per_channel!r}")
    dtype = value.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise TypeError(f"layers[{key!r}].dtype must be a dtype name such as 'quint8', got {dtype!r}")
    return LayerSetting(
        precision=parse_enum(Precision, value.get("precision", "int8"), f"layers[{key!r}].precision"),
        observer=parse_enum(Observer, value["observer"], f"layers[{key!r}].observer")
        if value.get("observer")
        else None,
        per_channel=per_channel,
        dtype=dtype,
    )


def normalise_layers(layers: Any) -> tuple[tuple[str | type, LayerSetting], ...]:
    if layers is None:
        return ()
    if isinstance(layers, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in layers):
        layers = dict(layers)  # already normalised (dataclasses.replace passes the tuple back in)
    if not isinstance(layers, Mapping):
        raise TypeError(
            "layers must be a mapping from a module name, an import path or an nn.Module type to a precision "
            f"or a mapping of options, e.g. {{'classifier': 'float', 'torch.nn.Linear': {{'observer': 'minmax'}}}}, "
            f"got {layers!r}"
        )
    rules = []
    for key, value in layers.items():
        if not (isinstance(key, str) and key) and not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(f"layers keys must be module names, import paths or nn.Module types, got {key!r}")
        rules.append((key, value if isinstance(value, LayerSetting) else normalise_setting(key, value)))
    return tuple(rules)


def normalise_skip(skip: Any) -> tuple[str | type, ...]:
    if skip is None:
        return ()
    if isinstance(skip, (str, type)):
        skip = (skip,)
    if not isinstance(skip, Sequence):
        raise TypeError(f"skip must be a sequence of module names or nn.Module types, got {skip!r}")
    for item in skip:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(f"skip entries must be module names (str) or nn.Module subclasses, got {item!r}")
    return tuple(skip)


def normalise_fuse(modules_to_fuse: Any) -> tuple[tuple[str, ...], ...] | None:
    if modules_to_fuse is None:
        return None
    error = TypeError(
        "modules_to_fuse must be a sequence of groups of module names, e.g. "
        f"[['conv', 'bn', 'relu']], got {modules_to_fuse!r}"
    )
    if isinstance(modules_to_fuse, str) or not isinstance(modules_to_fuse, Sequence):
        raise error
    groups = []
    for group in modules_to_fuse:
        if isinstance(group, str) or not isinstance(group, Sequence) or len(group) < 2:
            raise error
        if not all(isinstance(name, str) for name in group):
            raise error
        groups.append(tuple(group))
    return tuple(groups)


#: the torchao scheme a post-training mode means where none is named
MODE_SCHEMES = {Mode.WEIGHT_ONLY: Scheme.INT8_WEIGHT_ONLY, Mode.DYNAMIC: Scheme.INT8_DYN_INT8_WEIGHT}


class Algorithm(str, Enum):
    """torchao's post-training algorithms, which choose what the scheme's weights hold from calibration batches:
    AWQ (per-input-channel scales that protect the weights the activations weigh most), SmoothQuant (activation
    outliers moved into the weights before int8 activations) and GPTQ (weights rounded against the layer's
    input statistics)."""

    AWQ = "awq"
    SMOOTHQUANT = "smoothquant"
    GPTQ = "gptq"


#: the schemes each algorithm runs with here (converted on CPU with torchao 0.18), its default first
ALGORITHM_SCHEMES: dict[Algorithm, tuple[Scheme, ...]] = {
    Algorithm.AWQ: (Scheme.INT8_WEIGHT_ONLY, Scheme.INT8_DYN_INT8_WEIGHT),
    Algorithm.SMOOTHQUANT: (Scheme.INT8_DYN_INT8_WEIGHT,),
    Algorithm.GPTQ: (),
}

#: why a pair of algorithm and scheme does not exist here
ALGORITHM_LIMITS: dict[Algorithm, str] = {
    Algorithm.AWQ: (
        "AWQ keeps its scales in the weight tensor, which torchao 0.18's int8 tensors do; its int4 tensors that take "
        "them (Int4Tensor) run on CUDA only, and the int4 tensors that run on CPU (intx) take none: for int4 weights, "
        "train them (QuantizationAwareTraining)"
    ),
    Algorithm.SMOOTHQUANT: (
        "SmoothQuant moves activation outliers into the weights so that int8 activations lose less: it needs a "
        "scheme with int8 activations"
    ),
    Algorithm.GPTQ: (
        "torchao 0.18's GPTQ rounds on CUDA only ('GPTQ only supports CUDA currently'), and int8/int4 models are "
        "converted on CPU here: use algorithm='awq', or QAT for int4 weights"
    ),
}


def check_algorithm_scheme(algorithm: Algorithm, scheme: Scheme) -> None:
    """Raise ``ValueError`` for a pair of algorithm and scheme that does not exist, with the reason and the pairs
    that do."""
    allowed = ALGORITHM_SCHEMES[algorithm]
    if scheme not in allowed:
        pairs = [f"{a.value}: {[s.value for s in schemes]}" for a, schemes in ALGORITHM_SCHEMES.items() if schemes]
        raise ValueError(
            f"algorithm={algorithm.value!r} with scheme={scheme.value!r} does not exist here: "
            f"{ALGORITHM_LIMITS[algorithm]}. The pairs that run: {'; '.join(pairs)}"
        )

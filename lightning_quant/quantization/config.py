"""The options every quantization callback shares, validated once in one place.

The callbacks (QAT, PTQ) take the same ``backend``, ``flow``, ``observer``, ``per_channel``,
``skip``, ``qconfig_mapping``, ``export`` and ``export_dir`` arguments with the same meaning;
:class:`QuantizationConfig` holds and checks them so no callback repeats the checks.
Modes are ``str`` enums so the strings of a Hydra YAML file work unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.utils.checks import parse_enum, require_module


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
    (``.pte``, XNNPACK-delegated)."""

    TORCHSCRIPT = "torchscript"
    MOBILE = "mobile"
    ONNX = "onnx"
    PT2 = "pt2"
    EXECUTORCH = "executorch"
    STATE_DICT = "state_dict"
    SAFETENSORS = "safetensors"


class Precision(str, Enum):
    """What a layer computes in: int8 (the default), float (kept as trained), fp16 (dynamic mode:
    half-precision weights), int4 (torchao weight schemes)."""

    INT8 = "int8"
    FP16 = "fp16"
    INT4 = "int4"
    FLOAT = "float"


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


def _normalise_setting(key: Any, value: Any) -> LayerSetting:
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


def _normalise_layers(layers: Any) -> tuple[tuple[str | type, LayerSetting], ...]:
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
        rules.append((key, value if isinstance(value, LayerSetting) else _normalise_setting(key, value)))
    return tuple(rules)


BACKENDS = tuple(b.value for b in Backend)
FLOWS = tuple(f.value for f in Flow)
OBSERVERS = tuple(o.value for o in Observer)
EXPORT_TARGETS = tuple(e.value for e in ExportTarget)

#: Backends whose int8 kernels take per-channel weight scales by default. qnnpack can run
#: per-channel weights too, but torch's own qnnpack recipe is per-tensor, so that is the default.
PER_CHANNEL_BY_DEFAULT = (Backend.X86, Backend.FBGEMM, Backend.XNNPACK)

#: the backends each flow quantizes for (its first is the default)
FLOW_BACKENDS: dict[Flow, tuple[Backend, ...]] = {
    Flow.FX: (Backend.X86, Backend.FBGEMM, Backend.QNNPACK),
    Flow.EAGER: (Backend.X86, Backend.FBGEMM, Backend.QNNPACK),
    Flow.PT2E: (Backend.X86, Backend.XNNPACK),
    Flow.TORCHAO: (Backend.X86, Backend.XNNPACK),
}

#: the export targets each flow writes (its first is the default)
FLOW_EXPORTS: dict[Flow, tuple[ExportTarget, ...]] = {
    Flow.FX: (ExportTarget.TORCHSCRIPT, ExportTarget.MOBILE, ExportTarget.ONNX),
    Flow.EAGER: (ExportTarget.TORCHSCRIPT, ExportTarget.MOBILE, ExportTarget.ONNX),
    Flow.PT2E: (ExportTarget.PT2, ExportTarget.EXECUTORCH),
    Flow.TORCHAO: (ExportTarget.STATE_DICT, ExportTarget.EXECUTORCH, ExportTarget.PT2, ExportTarget.SAFETENSORS),
}

#: export targets that need one backend
TARGET_BACKENDS: dict[ExportTarget, Backend] = {ExportTarget.EXECUTORCH: Backend.XNNPACK}

#: the optional packages a flow or target needs: (import name, pip install line)
NEEDS: dict[str, tuple[str, str]] = {
    Flow.PT2E: ("torchao", "lightning-quant[pt2e]"),
    Flow.TORCHAO: ("torchao", "lightning-quant[torchao]"),
    ExportTarget.SAFETENSORS: ("safetensors", "safetensors"),
    Backend.XNNPACK: ("executorch", "lightning-quant[executorch]"),
    ExportTarget.EXECUTORCH: ("executorch", "lightning-quant[executorch]"),
}

#: the export default: the flow's first target
DEFAULT_EXPORT = "default"

#: input features sharing one scale in torchao's int4 weights
DEFAULT_GROUP_SIZE = 32


def _normalise_exports(export: Any) -> tuple[ExportTarget, ...] | str:
    if export is None:
        return ()
    if export == DEFAULT_EXPORT:
        return DEFAULT_EXPORT
    if isinstance(export, (str, ExportTarget)):
        export = (export,)
    if not isinstance(export, Sequence):
        raise TypeError(
            f"export must be {DEFAULT_EXPORT!r}, a target or a sequence of {EXPORT_TARGETS}, got {export!r}"
        )
    targets = tuple(parse_enum(ExportTarget, item, "each export target", _other_field_hint) for item in export)
    if len(set(targets)) != len(targets):
        raise ValueError(f"export lists a target twice: {[t.value for t in targets]}")
    return targets


def default_exports(flow: Flow, backend: Backend) -> tuple[ExportTarget, ...]:
    """What ``export="default"`` writes: the flow's server file, and its phone file when the backend
    is a phone backend (torchscript [+ mobile for qnnpack]; pt2 [+ executorch for xnnpack];
    torchao: state_dict [+ executorch for xnnpack])."""
    server, phone = FLOW_EXPORTS[flow][0], FLOW_EXPORTS[flow][1]
    return (server, phone) if backend in (Backend.QNNPACK, Backend.XNNPACK) else (server,)


def check_flow_pairs(flow: Flow, backend: Backend, export: tuple[ExportTarget, ...]) -> None:
    """Raise on a backend or export target the flow does not have, listing the pairs that exist.

    Raises:
        ValueError: naming what was asked and what each flow offers.
    """
    if backend not in FLOW_BACKENDS[flow]:
        pairs = "; ".join(f"{f.value}: {', '.join(b.value for b in bs)}" for f, bs in FLOW_BACKENDS.items())
        raise ValueError(f"flow={flow.value!r} has no backend {backend.value!r}; the backends of each flow are {pairs}")
    for target in export:
        if target not in FLOW_EXPORTS[flow]:
            pairs = "; ".join(f"{f.value}: {', '.join(t.value for t in ts)}" for f, ts in FLOW_EXPORTS.items())
            raise ValueError(
                f"flow={flow.value!r} cannot export {target.value!r}; the export targets of each flow are {pairs}"
            )
        needed = TARGET_BACKENDS.get(target)
        if needed is not None and backend is not needed:
            raise ValueError(
                f"export {target.value!r} needs backend={needed.value!r} (its runtime's kernels), got {backend.value!r}"
            )


def require_packages(flow: Flow, backend: Backend, export: tuple[ExportTarget, ...]) -> None:
    """Raise ``ModuleNotFoundError`` with the install line when what the config asks for is not installed."""
    for key, purpose in [
        (flow, f"flow={flow.value!r}"),
        (backend, f"backend={backend.value!r}"),
        *((t, f"export={t.value!r}") for t in export),
    ]:
        if key in NEEDS:
            module, install = NEEDS[key]
            require_module(module, f"'{install}'", purpose)
    if ExportTarget.ONNX in export:
        require_module("onnx", "onnx", 'export="onnx"')


def _normalise_skip(skip: Any) -> tuple[str | type, ...]:
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


def _normalise_fuse(modules_to_fuse: Any) -> tuple[tuple[str, ...], ...] | None:
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


@dataclass
class QuantizationConfig:
    """What to quantize and how; shared by every callback and by :func:`lightning_quant.quantize`.

    Args:
        backend: ``"x86"`` (default), ``"fbgemm"`` or ``"qnnpack"``; picks qconfig and engine.
        flow: ``"fx"`` (default; automatic fusion) or ``"eager"`` (module swapping).
        module: dotted path of the submodule of the LightningModule to quantize; ``None`` picks
            the only child with parameters.
        observer: activation observer, ``"moving_average"`` (default), ``"minmax"`` or ``"histogram"``.
        per_channel: per-channel weight scales; ``None`` means on for x86/fbgemm, off for qnnpack.
        skip: module names (``"classifier"``) or ``nn.Module`` types kept in float. A string that
            is not a submodule name but an import path (``"torch.nn.LSTM"``) is taken as a type.
        layers: per-layer settings: a mapping from a module name (that module and everything
            inside it), an import path or an ``nn.Module`` type to a precision (``"int8"``,
            ``"float"``, ``"fp16"``, ``"int4"``) or a mapping of ``precision``, ``observer``,
            ``per_channel``, ``dtype``. A name beats a type, which beats the global options.
            ``skip`` is shorthand for ``"float"``.
        qconfig_mapping: fx and eager flows: a ``torch.ao.quantization.QConfigMapping`` used as is
            (overrides ``observer``, ``per_channel`` and ``skip``); the flow checks its type.
        modules_to_fuse: eager flow only: explicit groups of module names to fuse.
        export: ``"default"`` (the flow's server file, and its phone file for qnnpack/xnnpack:
            :func:`default_exports`), ``None``, or any of the flow's targets: ``"torchscript"``,
            ``"mobile"``, ``"onnx"`` (fx, eager); ``"pt2"``, ``"executorch"`` (pt2e).
        export_dir: folder for exported files; ``None`` means ``<trainer.log_dir>/quantized``.
        scheme: torchao flow: what its Linear layers compute in (:class:`Scheme`):
            ``"int8_weight_only"``, ``"int4_weight_only"``, ``"int8_dyn_int8_weight"``,
            ``"int8_dyn_int4_weight"``; ``None`` means the use's default (QAT:
            ``int8_dyn_int4_weight``; ``mode="weight_only"``: ``int8_weight_only``;
            ``mode="dynamic"``: ``int8_dyn_int8_weight``).
        group_size: torchao flow: input features sharing one scale in int4 weights (default 32);
            it must divide the input size of every int4 layer.
        recipe: a stack's own object, used as it is: a pt2e ``Quantizer`` you configured
            (``X86InductorQuantizer``, ``XNNPACKQuantizer``, ``ComposableQuantizer``, your own; for QAT
            configured with ``is_qat=True``): the flow is pt2e, and a known quantizer's backend follows
            (X86Inductor: x86; XNNPACK: xnnpack); its per-layer settings, observers and granularity are its
            own, so ``layers``/``skip`` are refused with it. Or a torchao config (:data:`TORCHAO_RECIPES`, or a
            ``QATConfig`` of one): the flow is torchao, ``scheme``/``group_size`` are read off it, and it
            quantizes every planned Linear as it is (``layers`` may only keep layers float).

    Strings are accepted wherever an enum is expected (``backend="qnnpack"``, as YAML gives them)
    and sequences wherever a tuple is; both are normalised at construction.

    Raises:
        ValueError: an option outside its allowed values.
        TypeError: an option of the wrong type.
        ModuleNotFoundError: the flow, backend or an export target needs a package that is
            missing (``onnx``; torchao for pt2e; executorch for xnnpack); the message has the install line.

    Example::

        >>> QuantizationConfig(backend="qnnpack").per_channel
        False
    """

    backend: Backend = Backend.X86
    flow: Flow = Flow.FX
    module: str | None = None
    observer: Observer = Observer.MOVING_AVERAGE
    per_channel: bool | None = None
    skip: tuple[str | type, ...] = ()
    layers: tuple[tuple[str | type, LayerSetting], ...] = ()
    qconfig_mapping: Any = None
    modules_to_fuse: tuple[tuple[str, ...], ...] | None = None
    export: tuple[ExportTarget, ...] = DEFAULT_EXPORT  # type: ignore[assignment]  # resolved in __post_init__
    export_dir: str | os.PathLike | None = None
    scheme: Scheme | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    recipe: Any = None

    def __post_init__(self) -> None:
        self.backend = parse_enum(Backend, self.backend, "backend", _other_field_hint)
        self.flow = parse_enum(Flow, self.flow, "flow", _other_field_hint)
        self._take_recipe()
        self.observer = parse_enum(Observer, self.observer, "observer", _other_field_hint)
        if self.module is not None and (not isinstance(self.module, str) or not self.module):
            raise ValueError(f"module must be a dotted attribute path such as 'net' or None, got {self.module!r}")
        if self.per_channel is None:
            self.per_channel = self.backend in PER_CHANNEL_BY_DEFAULT or self.flow is Flow.TORCHAO
        elif not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel must be True, False or None (backend default), got {self.per_channel!r}")
        self.skip = _normalise_skip(self.skip)
        self.layers = _normalise_layers(self.layers)
        both = {key for key, _ in self.layers} & set(self.skip)
        if both:
            raise ValueError(f"{sorted(map(str, both))} are in both skip and layers: say it once (skip means 'float')")
        if self.layers and self.qconfig_mapping is not None:
            raise ValueError("layers and qconfig_mapping both say how layers are quantized: pass one of them")
        if self.qconfig_mapping is not None and self.flow in (Flow.PT2E, Flow.TORCHAO):
            raise ValueError(
                f'qconfig_mapping is a torch.ao setting of flow="fx"/"eager"; with flow="{self.flow.value}" say '
                "per-layer settings with layers= (or skip=)"
            )
        self._check_torchao_options()
        self.modules_to_fuse = _normalise_fuse(self.modules_to_fuse)
        if self.modules_to_fuse is not None and self.flow is not Flow.EAGER:
            raise ValueError(
                'modules_to_fuse is for flow="eager" only (flow="fx" fuses automatically), '
                f"got flow={self.flow.value!r}"
            )
        export = _normalise_exports(self.export)
        self.export = default_exports(self.flow, self.backend) if export == DEFAULT_EXPORT else export  # type: ignore[assignment]
        check_flow_pairs(self.flow, self.backend, self.export)
        require_packages(self.flow, self.backend, self.export)
        if self.export_dir is not None and not isinstance(self.export_dir, (str, os.PathLike)):
            raise TypeError(f"export_dir must be a path or None, got {self.export_dir!r}")

    def _take_recipe(self) -> None:
        """A stack's own object decides the flow (and a known quantizer's backend).

        Raises:
            TypeError: ``recipe`` is not a pt2e ``Quantizer``.
            ValueError: a flow or backend other than the recipe's, or per-layer settings beside it.
        """
        if self.recipe is None:
            return
        if _is_torchao_config(self.recipe):
            self._take_torchao_recipe()
            return
        quantizer_class = _pt2e_quantizer_class()
        if quantizer_class is None or not isinstance(self.recipe, quantizer_class):
            raise TypeError(
                "recipe must be a pt2e Quantizer (torchao.quantization.pt2e.quantizer.Quantizer: X86InductorQuantizer, "
                "XNNPACKQuantizer, ComposableQuantizer or your own) or a torchao config "
                f"({', '.join(TORCHAO_RECIPES)}, or a QATConfig of one), got {type(self.recipe).__name__}"
            )
        if self.flow not in (Flow.FX, Flow.PT2E):  # fx is the default: a quantizer means pt2e
            raise ValueError(
                f"recipe={type(self.recipe).__name__}(...) is a pt2e quantizer: leave flow out (or flow='pt2e'), "
                f"got flow={self.flow.value!r}"
            )
        self.flow = Flow.PT2E
        known = _known_quantizer_backend(self.recipe)
        if known is not None and known is not self.backend:
            if self.backend is not Backend.X86:  # x86 is the default: the quantizer's own backend holds
                raise ValueError(
                    f"recipe={type(self.recipe).__name__}(...) quantizes for backend={known.value!r}, got "
                    f"backend={self.backend.value!r}: leave backend out"
                )
            self.backend = known
        if self.layers or self.skip:
            raise ValueError(
                f"recipe={type(self.recipe).__name__}(...) holds its own per-layer settings (set_module_name_qconfig, "
                "set_module_type_qconfig; None keeps a layer float): leave layers= and skip= out"
            )

    def _take_torchao_recipe(self) -> None:
        """A torchao config: the torchao flow, its scheme and group read off the object (for the checks and the
        report); the object itself is what quantizes (``QATConfig(recipe)`` for QAT).

        Raises:
            ValueError: a config class this flow does not run, a QATConfig without a base config, another flow,
                or per-layer settings other than ``"float"``.
        """
        recipe = self.recipe
        if type(recipe).__name__ == "QATConfig":
            if getattr(recipe, "base_config", None) is None:
                raise ValueError(
                    "recipe=QATConfig(...) without a base_config: give the config it trains for, e.g. "
                    "QATConfig(Int8DynamicActivationIntxWeightConfig(...)) or that config itself"
                )
            recipe = self.recipe = recipe.base_config
        name = type(recipe).__name__
        if name not in TORCHAO_RECIPES:
            raise ValueError(f"recipe={name}(...) is not one of the torchao configs this flow runs: {TORCHAO_RECIPES}")
        if self.flow not in (Flow.FX, Flow.TORCHAO):  # fx is the default: a torchao config means torchao
            raise ValueError(
                f"recipe={name}(...) is a torchao config: leave flow out (or flow='torchao'), "
                f"got flow={self.flow.value!r}"
            )
        self.flow = Flow.TORCHAO
        bits = 4 if getattr(recipe, "weight_dtype", None) is INT4 else 8
        dynamic = "DynamicActivation" in name
        self.scheme = {
            (8, False): Scheme.INT8_WEIGHT_ONLY,
            (4, False): Scheme.INT4_WEIGHT_ONLY,
            (8, True): Scheme.INT8_DYN_INT8_WEIGHT,
            (4, True): Scheme.INT8_DYN_INT4_WEIGHT,
        }[(bits, dynamic)]
        granularity = getattr(recipe, "granularity", None) or getattr(recipe, "weight_granularity", None)
        self.group_size = int(getattr(granularity, "group_size", None) or DEFAULT_GROUP_SIZE)
        layers = _normalise_layers(self.layers)
        other = [key for key, setting in layers if setting != LayerSetting(precision=Precision.FLOAT)]
        if other:
            raise ValueError(
                f"recipe={name}(...) quantizes every Linear layer as it says: layers={sorted(map(str, other))} may "
                "only keep layers 'float' (or use skip=)"
            )

    def _check_torchao_options(self) -> None:
        if self.scheme is not None:
            self.scheme = parse_enum(Scheme, self.scheme, "scheme", _other_field_hint)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(
                f"group_size must be a positive int (input features per int4 scale), got {self.group_size!r}"
            )
        if self.flow is not Flow.TORCHAO:
            given = [
                name
                for name, changed in (
                    ("scheme", self.scheme is not None),
                    ("group_size", self.group_size != DEFAULT_GROUP_SIZE),
                )
                if changed
            ]
            if given:
                raise ValueError(
                    f"{given} are options of torchao's weight schemes (flow='torchao'), but flow={self.flow.value!r}: "
                    "set flow='torchao', or leave them out"
                )
        elif self.per_channel is False:
            raise ValueError(
                "flow='torchao' quantizes weights per channel (int8) or per group of group_size features (int4); "
                "per_channel=False has no scheme there: leave per_channel out"
            )

    @property
    def engine(self) -> str:
        """The ``torch.backends.quantized.engine`` the int8 model runs on. pt2e and torchao models do
        not use torch's quantized engines (their int8 kernels come from Inductor, torchao's tensor
        subclasses or ExecuTorch): the process's current engine, so selecting it changes nothing."""
        return pt2e_engine() if self.flow in (Flow.PT2E, Flow.TORCHAO) else self.backend.value


def _other_field_hint(value: Any) -> str:
    """Where a value of another option was given (``backend="torchao"``: a flow), said after the allowed values."""
    text = str(getattr(value, "value", value))
    owners = {
        "backend": BACKENDS,
        "flow": FLOWS,
        "observer": OBSERVERS,
        "export": EXPORT_TARGETS,
        "scheme": tuple(s.value for s in Scheme),
    }
    for option, values in owners.items():
        if text in values:
            return f"; {text!r} is a value of {option}: {option}={text!r}"
    return ""


#: torch's 4-bit integer dtype (missing from torch's type stubs)
INT4: torch.dtype = getattr(torch, "int4")  # noqa: B009

#: the torchao configs ``recipe=`` takes (QAT: the intx ones, whose fake quantizers the schedule switches)
TORCHAO_RECIPES = (
    "IntxWeightOnlyConfig",
    "Int8DynamicActivationIntxWeightConfig",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
)
#: those QAT trains with
TORCHAO_QAT_RECIPES = TORCHAO_RECIPES[:2]


def _is_torchao_config(value: Any) -> bool:
    try:
        from torchao.core.config import AOBaseConfig
    except ImportError:
        return False
    return isinstance(value, AOBaseConfig)


def _pt2e_quantizer_class() -> type | None:
    try:
        from torchao.quantization.pt2e.quantizer import Quantizer
    except ImportError:
        return None
    return Quantizer


def _known_quantizer_backend(quantizer: Any) -> Backend | None:
    """The backend of a quantizer whose kernels are known (by class name: no ExecuTorch import to check)."""
    names = {cls.__name__ for cls in type(quantizer).__mro__}
    if "X86InductorQuantizer" in names:
        return Backend.X86
    if "XNNPACKQuantizer" in names:
        return Backend.XNNPACK
    return None


def pt2e_engine() -> str:
    """The quantized engine named for pt2e models, which use none: the current one."""
    import torch

    return str(torch.backends.quantized.engine)


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, Sequence) and not isinstance(value, str) and isinstance(default, Sequence):
        return not isinstance(default, str) and tuple(value) == tuple(default)
    return bool(value == default)


def config_from(
    config: QuantizationConfig | None,
    arguments: Mapping[str, Any],
    parameters: Mapping[str, inspect.Parameter],
    owner: str,
) -> QuantizationConfig:
    """The config of a call that takes ``config=`` beside the config's fields as keyword arguments.

    Args:
        config: the ``config=`` argument.
        arguments: every argument of the call by name (its ``locals()``); those named like a
            field of :class:`QuantizationConfig` are the options.
        parameters: the call's signature parameters, for the options' defaults.
        owner: the call's name, for messages.

    Returns:
        ``config`` when given (every option must then keep its default), else a config built
        from the options.

    Raises:
        TypeError: ``config`` is not a ``QuantizationConfig``.
        ValueError: ``config`` is given and an option was also given a non-default value.
    """
    fields = {f.name for f in dataclasses.fields(QuantizationConfig)}
    options = {name: value for name, value in arguments.items() if name in fields}
    if options.get("recipe") is not None:
        decided = [
            name
            for name in ("observer", "per_channel", "scheme", "group_size", "qconfig_mapping", "modules_to_fuse")
            if name in options and not _same(options[name], parameters[name].default)
        ]
        if decided:
            raise ValueError(
                f"{owner} got recipe={type(options['recipe']).__name__}(...) and {decided}, which the recipe decides "
                "(its observers, granularity and per-layer settings): configure them on the recipe"
            )
    if config is None:
        return QuantizationConfig(**options)
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig or None, got {type(config).__name__}")
    both = [name for name, value in options.items() if not _same(value, parameters[name].default)]
    if both:
        raise ValueError(
            f"{owner} got config= and also {both}: set them on the QuantizationConfig "
            "(dataclasses.replace(config, ...)), or pass keyword arguments without config="
        )
    return config

"""Recipes: one small, frozen config per stack, taking that stack's own objects. The flow follows from the type.

=====================  =================================================================================
recipe                 what it takes
=====================  =================================================================================
:class:`FxRecipe`      torch.ao FX graph mode: a backend string or a ``QConfigMapping``; observer, per-layer
:class:`EagerRecipe`   torch.ao eager mode: as fx, and explicit ``modules_to_fuse``
:class:`Pt2eRecipe`    ``torch.export`` + torchao's pt2e: a ``Quantizer`` you built, or ``"x86"``/``"xnnpack"``
:class:`TorchaoRecipe` torchao's ``quantize_``/``QATConfig``: an ``AOBaseConfig``/``QATConfig``, or a scheme name
:class:`DynamicRecipe` torch.ao dynamic int8 (Linear/LSTM/GRU, activations quantized at run time)
=====================  =================================================================================

A callback or :func:`~lightning_quant.quantize` takes any of them as ``recipe=``, or the stack's own object
directly (an ``AOBaseConfig``, a pt2e ``Quantizer``, a ``QConfigMapping``), or a short string
(:data:`SHORTHANDS`: ``"x86"``, ``"xnnpack"``, ``"int8_dyn_int4_weight"``, ``"dynamic"``...). A recipe holds only
what its stack can do, so ``FxRecipe(scheme=...)`` cannot be written; values are checked when it is built, with
the messages of :class:`~lightning_quant.QuantizationConfig`, which every recipe resolves to.

Hydra builds them with ``_target_`` nodes (``_target_: lightning_quant.TorchaoRecipe``) or, where a sweep
switches stacks by a value, with :func:`recipe_for` (``_target_: lightning_quant.recipe_for``, ``flow: fx``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.flows.dynamic import DEFAULT_DYNAMIC_TYPES, check_dynamic_options
from lightning_quant.quantization.flows.spec import (
    DEFAULT_FLOW,
    SPECS,
    is_pt2e_quantizer,
    is_qconfig_mapping,
    is_torchao_config,
    native_flow,
    torchao_base,
    torchao_scheme,
)
from lightning_quant.quantization.options import ALGORITHM_SCHEMES, MODE_SCHEMES, Algorithm, Backend, Flow, Mode, Scheme
from lightning_quant.utils.checks import parse_enum


def code_of(value: Any) -> str:
    """A value as code: plain values by ``repr``, objects by their class (``X86InductorQuantizer(...)``)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(code_of(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{code_of(k)}: {code_of(v)}" for k, v in value.items()) + "}"
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return f"{type(value).__name__}(...)"


def _layers(value: Any) -> dict[Any, Any]:
    return dict(value or {})


@dataclass(frozen=True, repr=False)
class Recipe:
    """What every recipe answers: its flow, the post-training mode it means, and the settings it resolves to."""

    #: the flow this recipe runs on
    flow: ClassVar[Flow]

    @property
    def mode(self) -> Mode:
        """The post-training mode: static (calibrated activations) unless the recipe says otherwise."""
        return Mode.STATIC

    def settings(self) -> dict[str, Any]:
        """The :class:`~lightning_quant.QuantizationConfig` fields this recipe sets."""
        raise NotImplementedError

    def to_config(self, **shared: Any) -> QuantizationConfig:
        """The config of this recipe with the options every stack shares (``module``, ``export``, ``export_dir``)."""
        settings = self.settings()
        if settings.get("observer", "") is None:
            del settings["observer"]  # the call's default
        return QuantizationConfig(**settings, **shared)

    def __post_init__(self) -> None:
        self.to_config(export=())  # every value checked now, with the config's messages

    def __repr__(self) -> str:
        """The recipe as it would be written: the fields that differ from their defaults."""
        shown = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            default = item.default if item.default is not dataclasses.MISSING else None
            if value != default and not (default is None and value in ({}, [], ())):
                shown.append(f"{item.name}={code_of(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, repr=False)
class FxRecipe(Recipe):
    """torch.ao's FX graph mode: the model is traced, fused automatically and quantized per the backend.

    Args:
        backend: ``"x86"`` (default), ``"fbgemm"`` (servers) or ``"qnnpack"`` (ARM phones).
        qconfig_mapping: a ``torch.ao.quantization.QConfigMapping`` of your own, used as it is (its observers
            and per-layer settings; then ``layers`` is refused).
        observer: activation observer: ``"moving_average"``, ``"minmax"`` or ``"histogram"``; ``None``: the
            call's default (QAT: ``"moving_average"``; post-training: ``"histogram"``, which clips outliers best
            with a few calibration batches).
        per_channel: per-channel weights (``None``: the backend's default: on for x86/fbgemm, off for qnnpack).
        layers: per layer (name, import path or type) a precision (``"int8"``, ``"float"``) or a mapping of
            ``precision``, ``observer``, ``per_channel``, ``dtype``; a name beats a type beats the global value.
        skip: module names or types kept in float (shorthand for ``layers={name: "float"}``).

    Example::

        >>> FxRecipe(backend="qnnpack").settings()["backend"]
        <Backend.QNNPACK: 'qnnpack'>
    """

    flow: ClassVar[Flow] = Flow.FX
    backend: str = "x86"
    qconfig_mapping: Any = None
    observer: str | None = None
    per_channel: bool | None = None
    layers: Mapping[Any, Any] | None = None
    skip: Sequence[Any] = ()

    def settings(self) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "backend": self.backend,
            "qconfig_mapping": self.qconfig_mapping,
            "observer": self.observer,
            "per_channel": self.per_channel,
            "layers": _layers(self.layers),
            "skip": self.skip,
        }


@dataclass(frozen=True, repr=False)
class EagerRecipe(FxRecipe):
    """torch.ao's eager mode: modules swapped one by one (no tracing), stubs added where the model has none.

    Args:
        modules_to_fuse: explicit fusion groups, e.g. ``[["conv", "bn", "relu"]]`` (``None``: found by name).
        **others: as :class:`FxRecipe`.
    """

    flow: ClassVar[Flow] = Flow.EAGER
    modules_to_fuse: Sequence[Sequence[str]] | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "modules_to_fuse": self.modules_to_fuse}


@dataclass(frozen=True, repr=False)
class Pt2eRecipe(Recipe):
    """``torch.export`` with torchao's pt2e quantization: a program quantized by a ``Quantizer``.

    Args:
        quantizer: a pt2e ``Quantizer`` you configured (``X86InductorQuantizer``, ``XNNPACKQuantizer``,
            ``ComposableQuantizer`` or your own; for QAT configured with ``is_qat=True``), used as it is; or
            ``"x86"`` (Inductor's int8 kernels, default) / ``"xnnpack"`` (ExecuTorch on phones) for the built-in
            quantizer of that backend, which the options below configure. The x86 one is torchao's
            ``X86InductorQuantizer`` that also quantizes attention's query and key to int8, as OpenVINO's int8
            attention takes them (:mod:`lightning_quant.quantization.flows.pt2e.attention`).
        observer, per_channel, layers, skip: the built-in quantizer's settings, as :class:`FxRecipe`'s; a
            quantizer object holds its own, so they are refused beside one.
    """

    flow: ClassVar[Flow] = Flow.PT2E
    quantizer: Any = "x86"
    observer: str | None = None
    per_channel: bool | None = None
    layers: Mapping[Any, Any] | None = None
    skip: Sequence[Any] = ()

    def settings(self) -> dict[str, Any]:
        shared = {"flow": self.flow, "layers": _layers(self.layers), "skip": self.skip}
        if isinstance(self.quantizer, (str, Backend)):
            return {**shared, "backend": self.quantizer, "observer": self.observer, "per_channel": self.per_channel}
        decided = [
            name
            for name, value, default in (
                ("observer", self.observer, None),
                ("per_channel", self.per_channel, None),
            )
            if value != default
        ]
        if decided:
            raise ValueError(
                f"Pt2eRecipe(quantizer={type(self.quantizer).__name__}(...)) and {decided}, which the quantizer "
                "decides (its observers and granularity): configure them on the quantizer"
            )
        return {**shared, "recipe": self.quantizer}


@dataclass(frozen=True, repr=False)
class TorchaoRecipe(Recipe):
    """torchao's ``quantize_`` (post-training) and ``QATConfig`` (QAT) on the model's Linear layers.

    Args:
        config: a torchao config used as it is (``IntxWeightOnlyConfig(weight_dtype=torch.int4,
            granularity=PerGroup(32))``, ``Int8DynamicActivationIntxWeightConfig``, ``Int8WeightOnlyConfig``,
            ``Int8DynamicActivationInt8WeightConfig``, or a ``QATConfig`` of one), or a scheme name:
            ``"int8_dyn_int4_weight"``, ``"int8_dyn_int8_weight"``, ``"int8_weight_only"``,
            ``"int4_weight_only"``; ``None``: the default of the call (QAT: ``int8_dyn_int4_weight``;
            post-training: ``int8_weight_only``).
        backend: ``"x86"`` (default; served compiled) or ``"xnnpack"`` (ExecuTorch).
        group_size: with a scheme name, input features per int4 weight scale (default 32); a config says its own.
        layers: per layer ``"int8"``, ``"int4"`` or ``"float"`` (a config object: ``"float"`` only).
        skip: module names or types kept in float.
        algorithm: post-training only: ``"awq"`` (with ``int8_weight_only``, its default, or
            ``int8_dyn_int8_weight``) or ``"smoothquant"`` (``int8_dyn_int8_weight``): torchao's AWQ/SmoothQuant
            run on the calibration batches before conversion. ``"gptq"`` is refused: torchao 0.18 runs it on
            CUDA only.
        range_learning: QAT only: the weights' scales and zero points are trained as parameters (torchao's
            learned ranges), set from the weights when fake quantization starts; for the layers converted to
            torchao's intx tensors (int4 weights, embeddings, ``backend="xnnpack"``), which take them.

    Example::

        >>> TorchaoRecipe(algorithm="smoothquant").mode
        <Mode.DYNAMIC: 'dynamic'>
    """

    flow: ClassVar[Flow] = Flow.TORCHAO
    config: Any = None
    backend: str = "x86"
    group_size: int | None = None
    layers: Mapping[Any, Any] | None = None
    skip: Sequence[Any] = ()
    algorithm: str | None = None
    range_learning: bool = False

    @property
    def native(self) -> Any:
        """The torchao config object, if one was given."""
        return None if isinstance(self.config, (str, Scheme)) else self.config

    @property
    def mode(self) -> Mode:
        """Weight-only or dynamic, as the scheme says (``None``: weight-only, the post-training default)."""
        scheme = self.scheme
        if scheme is None and self.algorithm is not None:  # the algorithm's default scheme
            defaults = ALGORITHM_SCHEMES[parse_enum(Algorithm, self.algorithm, "algorithm")]
            scheme = defaults[0] if defaults else None
        return Mode.DYNAMIC if scheme is not None and scheme.dynamic else Mode.WEIGHT_ONLY

    @property
    def scheme(self) -> Scheme | None:
        if self.config is None:
            return None
        if self.native is not None:
            return torchao_scheme(torchao_base(self.native))[0]
        return Scheme(self.config)

    def settings(self) -> dict[str, Any]:
        shared: dict[str, Any] = {
            "flow": self.flow,
            "backend": self.backend,
            "layers": _layers(self.layers),
            "skip": self.skip,
        }
        if self.algorithm is not None:
            shared["algorithm"] = self.algorithm
        if self.range_learning:
            shared["range_learning"] = self.range_learning
        if self.native is not None:
            if self.group_size is not None:
                raise ValueError(
                    f"TorchaoRecipe(config={type(self.native).__name__}(...)) says its own granularity: leave "
                    "group_size out (set it on the config: granularity=PerGroup(n))"
                )
            return {**shared, "recipe": self.native}
        options: dict[str, Any] = {"scheme": self.config}
        if self.group_size is not None:
            options["group_size"] = self.group_size
        return {**shared, **options}


@dataclass(frozen=True, repr=False)
class DynamicRecipe(Recipe):
    """torch.ao's dynamic int8: weights int8 ahead of time, activations quantized at run time (no calibration).

    Args:
        backend: ``"x86"`` (default), ``"fbgemm"`` or ``"qnnpack"``.
        dtype: ``"qint8"`` (default) or ``"float16"`` weights.
        module_types: what is quantized (default Linear, LSTM, GRU; types or import paths).
        per_channel: per-channel Linear weights (``None``: the backend's default).
        layers: per layer ``"int8"``, ``"fp16"`` or ``"float"``.
        skip: module names or types kept in float.
    """

    flow: ClassVar[Flow] = DEFAULT_FLOW
    backend: str = "x86"
    dtype: str = "qint8"
    module_types: Sequence[Any] = DEFAULT_DYNAMIC_TYPES
    per_channel: bool | None = None
    layers: Mapping[Any, Any] | None = None
    skip: Sequence[Any] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "module_types", check_dynamic_options(self.dtype, self.module_types))
        super().__post_init__()

    @property
    def mode(self) -> Mode:
        return Mode.DYNAMIC

    def settings(self) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "backend": self.backend,
            "observer": None,  # no activation observer: the call's default, recorded as the previous release did
            "per_channel": self.per_channel,
            "layers": _layers(self.layers),
            "skip": self.skip,
        }


#: the recipe type of each flow (:func:`recipe_for`)
RECIPES: dict[Flow, type[Recipe]] = {
    Flow.FX: FxRecipe,
    Flow.EAGER: EagerRecipe,
    Flow.PT2E: Pt2eRecipe,
    Flow.TORCHAO: TorchaoRecipe,
}
assert set(RECIPES) == set(SPECS), "every declared flow has a recipe"

#: short strings ``recipe=`` takes, and the recipe each means
SHORTHANDS: dict[str, Recipe] = {}


def _shorthands() -> dict[str, Recipe]:
    if not SHORTHANDS:
        SHORTHANDS.update(
            {
                "x86": FxRecipe(backend="x86"),
                "fbgemm": FxRecipe(backend="fbgemm"),
                "qnnpack": FxRecipe(backend="qnnpack"),
                "fx": FxRecipe(),
                "eager": EagerRecipe(),
                "dynamic": DynamicRecipe(),
            }
        )
        # the pt2e and torchao shorthands need torchao's import only when used
    return SHORTHANDS


_LAZY_SHORTHANDS: dict[str, tuple[type[Recipe], dict[str, Any]]] = {
    "pt2e": (Pt2eRecipe, {}),
    "xnnpack": (Pt2eRecipe, {"quantizer": "xnnpack"}),
    "torchao": (TorchaoRecipe, {}),
    **{scheme.value: (TorchaoRecipe, {"config": scheme.value}) for scheme in Scheme},
}


def shorthand_names() -> tuple[str, ...]:
    return (*_shorthands(), *_LAZY_SHORTHANDS)


def as_recipe(value: Any) -> Recipe:
    """The recipe ``value`` means: a recipe as it is; a stack's own object in its stack's recipe; a short string.

    Raises:
        ValueError: a string that is no shorthand (listing them).
        TypeError: anything else (listing what is taken).
    """
    if isinstance(value, Recipe):
        return value
    if isinstance(value, str):
        if value in _shorthands():
            return SHORTHANDS[value]
        if value in _LAZY_SHORTHANDS:
            kind, options = _LAZY_SHORTHANDS[value]
            return kind(**options)
        raise ValueError(f"recipe={value!r} is not a shorthand; the shorthands are {shorthand_names()}")
    if is_qconfig_mapping(value):
        return FxRecipe(qconfig_mapping=value)
    if is_torchao_config(value) or is_pt2e_quantizer(value):
        flow = native_flow(value)
        return TorchaoRecipe(config=value) if flow is Flow.TORCHAO else Pt2eRecipe(quantizer=value)
    raise TypeError(
        "recipe must be a recipe (FxRecipe, EagerRecipe, Pt2eRecipe, TorchaoRecipe, DynamicRecipe), a stack's own "
        "object (a torchao AOBaseConfig or QATConfig, a pt2e Quantizer, a torch.ao QConfigMapping) or a shorthand "
        f"{shorthand_names()}, got {type(value).__name__}"
    )


def _empty(value: Any) -> bool:
    return isinstance(value, (Mapping, Sequence)) and not isinstance(value, str) and len(value) == 0


def recipe_for(flow: str = DEFAULT_FLOW.value, **options: Any) -> Recipe:
    """The recipe of ``flow`` with ``options``, for configs that switch stacks by a value (a Hydra sweep over
    ``quant.recipe.flow``); ``None`` values mean "not given". ``mode="dynamic"`` on fx gives a
    :class:`DynamicRecipe`.

    Raises:
        ValueError: an option the flow's recipe does not have (listing those it has).
    """
    given = {name: value for name, value in options.items() if value is not None and not _empty(value)}
    mode = given.pop("mode", None)
    kind: type[Recipe] = RECIPES[Flow(flow)] if flow in {f.value for f in Flow} else None  # type: ignore[assignment]
    if kind is None:
        raise ValueError(f"flow must be one of {tuple(f.value for f in Flow)}, got {flow!r}")
    if mode is not None and Mode(mode) not in SPECS[Flow(flow)].modes:
        modes = [m.value for m in SPECS[Flow(flow)].modes]
        raise ValueError(f"flow={flow!r} has no mode={mode!r}; its post-training modes are {modes}")
    if mode == Mode.DYNAMIC.value and kind in (FxRecipe, EagerRecipe):
        kind = DynamicRecipe
    if kind is TorchaoRecipe:
        scheme = given.pop("scheme", None)
        if scheme is None and mode is not None:
            scheme = MODE_SCHEMES[Mode(mode)].value
        if scheme is not None:
            given["config"] = scheme
    if kind is Pt2eRecipe and "backend" in given:
        given["quantizer"] = given.pop("backend")
    names = {f.name for f in dataclasses.fields(kind)}
    other = sorted(set(given) - names)
    if other:
        raise ValueError(f"{kind.__name__} (flow={flow!r}) has no {other}; it takes {sorted(names)}")
    return kind(**given)


__all__ = [
    "RECIPES",
    "SHORTHANDS",
    "DynamicRecipe",
    "EagerRecipe",
    "FxRecipe",
    "Pt2eRecipe",
    "Recipe",
    "TorchaoRecipe",
    "as_recipe",
    "recipe_for",
]

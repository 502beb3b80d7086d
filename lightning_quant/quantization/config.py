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
from typing import Any

import torch

from lightning_quant.quantization.flows.spec import (
    DEFAULT_FLOW,
    check_flow_pairs,
    default_exports,
    flows_with,
    known_quantizer_backend,
    native_flow,
    spec_of,
    spelled,
    torchao_base,
    torchao_scheme,
)
from lightning_quant.quantization.options import (
    ALGORITHM_LIMITS,
    ALGORITHM_SCHEMES,
    Algorithm,
    Backend,
    ExportTarget,
    Flow,
    LayerSetting,
    Observer,
    Precision,
    Scheme,
    check_algorithm_scheme,
    normalise_fuse,
    normalise_layers,
    normalise_skip,
)
from lightning_quant.utils.checks import parse_enum, require_module

BACKENDS = tuple(b.value for b in Backend)
FLOWS = tuple(f.value for f in Flow)
OBSERVERS = tuple(o.value for o in Observer)
EXPORT_TARGETS = tuple(e.value for e in ExportTarget)

#: Backends whose int8 kernels take per-channel weight scales by default. qnnpack can run
#: per-channel weights too, but torch's own qnnpack recipe is per-tensor, so that is the default.
PER_CHANNEL_BY_DEFAULT = (Backend.X86, Backend.FBGEMM, Backend.XNNPACK)

#: the optional packages a backend or target needs (a flow's: its spec): (import name, pip install line)
NEEDS: dict[str, tuple[str, str]] = {
    ExportTarget.SAFETENSORS: ("safetensors", "safetensors"),
    ExportTarget.HF: ("transformers", "transformers"),
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


def require_packages(flow: Flow, backend: Backend, export: tuple[ExportTarget, ...]) -> None:
    """Raise ``ModuleNotFoundError`` with the install line when what the config asks for is not installed."""
    package = spec_of(flow).package
    if package is not None:
        require_module(package[0], f"'{package[1]}'", f"flow={flow.value!r}")
    for key, purpose in [
        (backend, f"backend={backend.value!r}"),
        *((t, f"export={t.value!r}") for t in export),
    ]:
        if key in NEEDS:
            module, install = NEEDS[key]
            require_module(module, f"'{install}'", purpose)
    if ExportTarget.ONNX in export:
        require_module("onnx", "onnx", 'export="onnx"')
        if spec_of(flow).int8_file == "program":  # written by torch.onnx's dynamo exporter, which needs onnxscript
            require_module("onnxscript", "onnxscript", 'export="onnx" of a pt2e program')


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
            ``"mobile"``, ``"onnx"`` (fx, eager, pt2e); ``"pt2"``, ``"executorch"``, ``"aoti"`` (pt2e).
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
        algorithm: torchao flow, post-training: ``"awq"`` or ``"smoothquant"`` (:class:`Algorithm`), torchao's
            algorithms run on the calibration batches before the Linear layers are converted; each runs with
            the schemes of :data:`ALGORITHM_SCHEMES` (a pair that does not exist is refused with the reason).
        range_learning: torchao flow, QAT: each weight's scales and zero points become parameters the optimizer
            trains (torchao's ``range_learning``), set from the weights when fake quantization starts and
            converted with them; for the layers whose int8 model takes given scales (int4 weights, embeddings,
            ``backend="xnnpack"``).

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
    flow: Flow = DEFAULT_FLOW
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
    algorithm: Algorithm | None = None
    range_learning: bool = False

    def __post_init__(self) -> None:
        self.backend = parse_enum(Backend, self.backend, "backend", _other_field_hint)
        self.flow = parse_enum(Flow, self.flow, "flow", _other_field_hint)
        self._take_recipe()
        self.observer = parse_enum(Observer, self.observer, "observer", _other_field_hint)
        if self.module is not None and (not isinstance(self.module, str) or not self.module):
            raise ValueError(f"module must be a dotted attribute path such as 'net' or None, got {self.module!r}")
        if self.per_channel is None:
            self.per_channel = self.backend in PER_CHANNEL_BY_DEFAULT or spec_of(self.flow).per_channel_only
        elif not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel must be True, False or None (backend default), got {self.per_channel!r}")
        self.skip = normalise_skip(self.skip)
        self.layers = normalise_layers(self.layers)
        both = {key for key, _ in self.layers} & set(self.skip)
        if both:
            raise ValueError(f"{sorted(map(str, both))} are in both skip and layers: say it once (skip means 'float')")
        if self.layers and self.qconfig_mapping is not None:
            raise ValueError("layers and qconfig_mapping both say how layers are quantized: pass one of them")
        if self.qconfig_mapping is not None and "qconfig_mapping" not in spec_of(self.flow).options:
            owners = spelled(flows_with("qconfig_mapping"), quote='"')
            raise ValueError(
                f"qconfig_mapping is a torch.ao setting of flow={owners}; with "
                f'flow="{self.flow.value}" say per-layer settings with layers= (or skip=)'
            )
        self._check_torchao_options()
        self.modules_to_fuse = normalise_fuse(self.modules_to_fuse)
        if self.modules_to_fuse is not None and "modules_to_fuse" not in spec_of(self.flow).options:
            owners = spelled(flows_with("modules_to_fuse"), quote='"')
            raise ValueError(
                f'modules_to_fuse is for flow={owners} only (flow="fx" fuses automatically), '
                f"got flow={self.flow.value!r}"
            )
        export = _normalise_exports(self.export)
        self.export = default_exports(self.flow, self.backend) if export == DEFAULT_EXPORT else export  # type: ignore[assignment]
        check_flow_pairs(self.flow, self.backend, self.export)
        require_packages(self.flow, self.backend, self.export)
        if self.export_dir is not None and not isinstance(self.export_dir, (str, os.PathLike)):
            raise TypeError(f"export_dir must be a path or None, got {self.export_dir!r}")

    def _take_recipe(self) -> None:
        """A stack's own object decides the flow (and a known quantizer's backend; a torchao config's scheme).

        Raises:
            TypeError: ``recipe`` is neither a pt2e ``Quantizer`` nor a torchao config.
            ValueError: a flow or backend other than the recipe's, or per-layer settings it decides itself.
        """
        if self.recipe is None:
            return
        flow = native_flow(self.recipe)
        name = type(self.recipe).__name__
        if self.flow not in (DEFAULT_FLOW, flow):  # the default flow is what a plain call has: the object decides
            raise ValueError(
                f"recipe={name}(...) runs on flow={flow.value!r}: leave flow out (or flow={flow.value!r}), "
                f"got flow={self.flow.value!r}"
            )
        self.flow = flow
        if "scheme" in spec_of(flow).options:
            self._take_scheme_recipe()
            return
        known = known_quantizer_backend(self.recipe)
        if known is not None and known is not self.backend:
            if self.backend is not Backend.X86:  # x86 is the default: the quantizer's own backend holds
                raise ValueError(
                    f"recipe={name}(...) quantizes for backend={known.value!r}, got "
                    f"backend={self.backend.value!r}: leave backend out"
                )
            self.backend = known
        if self.layers or self.skip:
            raise ValueError(
                f"recipe={name}(...) holds its own per-layer settings (set_module_name_qconfig, "
                "set_module_type_qconfig; None keeps a layer float): leave layers= and skip= out"
            )

    def _take_scheme_recipe(self) -> None:
        """A torchao config: its scheme and group read off the object (for the checks and the report); the
        object itself is what quantizes (``QATConfig(recipe)`` for QAT).

        Raises:
            ValueError: a config class this flow does not run, a QATConfig without a base config, or per-layer
                settings other than ``"float"``.
        """
        recipe = self.recipe = torchao_base(self.recipe)
        self.scheme, group = torchao_scheme(recipe)
        self.group_size = group or DEFAULT_GROUP_SIZE
        layers = normalise_layers(self.layers)
        other = [key for key, setting in layers if setting != LayerSetting(precision=Precision.FLOAT)]
        if other:
            raise ValueError(
                f"recipe={type(recipe).__name__}(...) quantizes every Linear layer as it says: "
                f"layers={sorted(map(str, other))} may only keep layers 'float' (or use skip=)"
            )

    def _check_torchao_options(self) -> None:
        if self.scheme is not None:
            self.scheme = parse_enum(Scheme, self.scheme, "scheme", _other_field_hint)
        if self.algorithm is not None:
            self.algorithm = parse_enum(Algorithm, self.algorithm, "algorithm")
            if "algorithm" not in spec_of(self.flow).options:
                owners = flows_with("algorithm")
                raise ValueError(
                    f"algorithm={self.algorithm.value!r} is torchao's (flow={spelled(owners)}), but "
                    f"flow={self.flow.value!r}: write "
                    f"recipe=TorchaoRecipe(config=..., algorithm={self.algorithm.value!r})"
                )
            if not ALGORITHM_SCHEMES[self.algorithm]:
                raise ValueError(
                    f"algorithm={self.algorithm.value!r} does not run here: {ALGORITHM_LIMITS[self.algorithm]}"
                )
            if self.backend is Backend.XNNPACK:
                raise ValueError(
                    f"algorithm={self.algorithm.value!r} keeps its scales in torchao's int8 tensors of backend='x86'; "
                    "backend='xnnpack' converts to intx tensors, which take none: use backend='x86'"
                )
            if self.scheme is not None:
                check_algorithm_scheme(self.algorithm, self.scheme)
        if not isinstance(self.range_learning, bool):
            raise TypeError(f"range_learning must be True or False, got {self.range_learning!r}")
        if self.range_learning:
            if "range_learning" not in spec_of(self.flow).options:
                raise ValueError(
                    f"range_learning=True is torchao's QAT (flow={spelled(flows_with('range_learning'))}), but "
                    f"flow={self.flow.value!r}: write recipe=TorchaoRecipe('int8_dyn_int4_weight', range_learning=True)"
                )
            if self.recipe is not None:
                raise ValueError(
                    f"range_learning=True with recipe={type(self.recipe).__name__}(...): a torchao config object says "
                    "its own fake quantization; name the scheme instead: "
                    "TorchaoRecipe('int8_dyn_int4_weight', range_learning=True)"
                )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(
                f"group_size must be a positive int (input features per int4 scale), got {self.group_size!r}"
            )
        if "scheme" not in spec_of(self.flow).options:
            given = [
                name
                for name, changed in (
                    ("scheme", self.scheme is not None),
                    ("group_size", self.group_size != DEFAULT_GROUP_SIZE),
                )
                if changed
            ]
            if given:
                owners = flows_with("scheme")
                raise ValueError(
                    f"{given} are options of torchao's weight schemes (flow={spelled(owners)}), but "
                    f"flow={self.flow.value!r}: set flow={owners[0]!r}, or leave them out"
                )
        if self.per_channel is False and spec_of(self.flow).per_channel_only:
            raise ValueError(
                f"flow={self.flow.value!r} quantizes weights per channel (int8) or per group of group_size features "
                "(int4); per_channel=False has no scheme there: leave per_channel out"
            )

    @property
    def engine(self) -> str:
        """The ``torch.backends.quantized.engine`` the int8 model runs on. pt2e and torchao models do
        not use torch's quantized engines (their int8 kernels come from Inductor, torchao's tensor
        subclasses or ExecuTorch): the process's current engine, so selecting it changes nothing."""
        return self.backend.value if spec_of(self.flow).torch_engine else pt2e_engine()


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


def pt2e_engine() -> str:
    """The quantized engine named for pt2e models, which use none: the current one."""

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

"""What each flow declares: its backends, export targets, modes, the options of its stack alone, and what it can do.

The rest of the package never asks *which* flow it holds; it asks the flow's :class:`FlowSpec`
(``spec_of(config.flow).calibrates``) or the flow object's optional capabilities
(:mod:`lightning_quant.quantization.flows.common`). This module imports neither the flows nor the
configs (the configs read it while they are built), only the option values.

The stacks' own objects decide their flow: a pt2e ``Quantizer`` means pt2e, a torchao ``AOBaseConfig``
means torchao (:func:`native_flow`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lightning_quant.quantization.options import Backend, ExportTarget, Flow, Mode, Precision, Scheme


@dataclass(frozen=True)
class FlowSpec:
    """One flow's declaration.

    Attributes:
        flow: its name.
        backends: the backends it quantizes for (the first is the default).
        exports: the export targets it writes (the first is its server file, the second its phone file).
        modes: the post-training modes it runs.
        package: ``(import name, pip install line)`` of the package it needs beyond torch, if any.
        options: the config options of its stack alone that it reads (``qconfig_mapping``, ``modules_to_fuse``,
            ``scheme``, ``group_size``, ``dtype``/``module_types`` of torch.ao's dynamic mode).
        per_channel_only: its weights are always per channel (or per group): ``per_channel=False`` has no scheme.
        observes: prepared models hold observers whose ranges a schedule can freeze.
        calibrates: static ranges come from calibration batches (else its modes quantize without data).
        keeps_float: its conversion can leave layers float after preparation (``keep_diverging_float``, the
            latency search) without preparing again.
        int8_file: what :func:`~lightning_quant.save_int8` writes for it: ``"recipe"`` (the int8 state dict and
            the recipe that rebuilds it), ``"weights"`` (the flow's own weight files) or ``"program"`` (none: a
            program is written with ``export='pt2'``).
        torch_engine: its int8 kernels are torch's quantized engines (``torch.backends.quantized.engine``).
        search_precisions: what a precision search may give a layer, cheapest first (``None``: by mode).
        shards: its QAT models train sharded by FSDP2 (Lightning's ``ModelParallelStrategy``): prepared whole, its
            layers keep their module structure for ``fully_shard``.
    """

    flow: Flow
    backends: tuple[Backend, ...]
    exports: tuple[ExportTarget, ...]
    modes: tuple[Mode, ...]
    package: tuple[str, str] | None
    options: frozenset[str]
    per_channel_only: bool
    observes: bool
    calibrates: bool
    keeps_float: bool
    int8_file: str
    torch_engine: bool
    search_precisions: tuple[Precision, ...] | None = None
    shards: bool = False


_FX = FlowSpec(
    Flow.FX,
    backends=(Backend.X86, Backend.FBGEMM, Backend.QNNPACK),
    exports=(ExportTarget.TORCHSCRIPT, ExportTarget.MOBILE, ExportTarget.ONNX),
    modes=(Mode.STATIC, Mode.DYNAMIC),
    package=None,
    options=frozenset({"qconfig_mapping", "dtype", "module_types"}),
    per_channel_only=False,
    observes=True,
    calibrates=True,
    keeps_float=True,
    int8_file="recipe",
    torch_engine=True,
)

#: every flow's declaration, by name
SPECS: dict[Flow, FlowSpec] = {
    Flow.FX: _FX,
    Flow.EAGER: dataclasses.replace(_FX, flow=Flow.EAGER, options=_FX.options | {"modules_to_fuse"}, keeps_float=False),
    Flow.PT2E: FlowSpec(
        Flow.PT2E,
        backends=(Backend.X86, Backend.XNNPACK),
        exports=(ExportTarget.PT2, ExportTarget.EXECUTORCH, ExportTarget.AOTI, ExportTarget.ONNX),
        modes=(Mode.STATIC,),
        package=("torchao", "lightning-quant[pt2e]"),
        options=frozenset(),
        per_channel_only=False,
        observes=True,
        calibrates=True,
        keeps_float=False,
        int8_file="program",
        torch_engine=False,
    ),
    Flow.TORCHAO: FlowSpec(
        Flow.TORCHAO,
        backends=(Backend.X86, Backend.XNNPACK),
        exports=(
            ExportTarget.STATE_DICT,
            ExportTarget.EXECUTORCH,
            ExportTarget.PT2,
            ExportTarget.SAFETENSORS,
            ExportTarget.HF,
        ),
        modes=(Mode.WEIGHT_ONLY, Mode.DYNAMIC),
        package=("torchao", "lightning-quant[torchao]"),
        options=frozenset({"scheme", "group_size", "algorithm", "range_learning"}),
        per_channel_only=True,
        observes=False,
        calibrates=False,
        keeps_float=False,
        int8_file="weights",
        torch_engine=False,
        search_precisions=(Precision.INT4, Precision.INT8, Precision.FLOAT),
        shards=True,
    ),
}

#: the flow of a plain call (the README's first example)
DEFAULT_FLOW = Flow.FX


def spec_of(flow: Flow | str) -> FlowSpec:
    """The declaration of ``flow``."""
    return SPECS[Flow(flow)]


def flows_with(option: str) -> tuple[str, ...]:
    """The flows whose stack has ``option`` (for messages)."""
    return tuple(spec.flow.value for spec in SPECS.values() if option in spec.options)


def spelled(flows: Any, quote: str = "'") -> str:
    """Flow names as a message writes them: ``'fx'``, or ``'fx'/'eager'``."""
    return "/".join(f"{quote}{getattr(flow, 'value', flow)}{quote}" for flow in flows)


def default_exports(flow: Flow, backend: Backend) -> tuple[ExportTarget, ...]:
    """What ``export="default"`` writes: the flow's server file, and its phone file when the backend
    is a phone backend (torchscript [+ mobile for qnnpack]; pt2 [+ executorch for xnnpack];
    torchao: state_dict [+ executorch for xnnpack])."""
    server, phone = spec_of(flow).exports[0], spec_of(flow).exports[1]
    return (server, phone) if backend in (Backend.QNNPACK, Backend.XNNPACK) else (server,)


#: export targets that need one backend
TARGET_BACKENDS: dict[ExportTarget, Backend] = {
    ExportTarget.EXECUTORCH: Backend.XNNPACK,
    ExportTarget.AOTI: Backend.X86,
}


def check_flow_pairs(flow: Flow, backend: Backend, export: tuple[ExportTarget, ...]) -> None:
    """Raise on a backend or export target the flow does not have, listing the pairs that exist.

    Raises:
        ValueError: naming what was asked and what each flow offers.
    """
    spec = spec_of(flow)
    if backend not in spec.backends:
        pairs = "; ".join(f"{s.flow.value}: {', '.join(b.value for b in s.backends)}" for s in SPECS.values())
        raise ValueError(f"flow={flow.value!r} has no backend {backend.value!r}; the backends of each flow are {pairs}")
    for target in export:
        if target not in spec.exports:
            pairs = "; ".join(f"{s.flow.value}: {', '.join(t.value for t in s.exports)}" for s in SPECS.values())
            raise ValueError(
                f"flow={flow.value!r} cannot export {target.value!r}; the export targets of each flow are {pairs}"
            )
        needed = TARGET_BACKENDS.get(target)
        if needed is not None and backend is not needed:
            raise ValueError(
                f"export {target.value!r} needs backend={needed.value!r} (its runtime's kernels), got {backend.value!r}"
            )


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


def is_torchao_config(value: Any) -> bool:
    try:
        from torchao.core.config import AOBaseConfig
    except ImportError:
        return False
    return isinstance(value, AOBaseConfig)


def is_pt2e_quantizer(value: Any) -> bool:
    try:
        from torchao.quantization.pt2e.quantizer import Quantizer
    except ImportError:
        return False
    return isinstance(value, Quantizer)


def is_qconfig_mapping(value: Any) -> bool:
    from torch.ao.quantization import QConfigMapping

    return isinstance(value, QConfigMapping)


def known_quantizer_backend(quantizer: Any) -> Backend | None:
    """The backend of a quantizer whose kernels are known (by class name: no ExecuTorch import to check)."""
    names = {cls.__name__ for cls in type(quantizer).__mro__}
    if "X86InductorQuantizer" in names:
        return Backend.X86
    if "XNNPACKQuantizer" in names:
        return Backend.XNNPACK
    return None


def native_flow(native: Any) -> Flow:
    """The flow a stack's own object runs on: a pt2e ``Quantizer`` on pt2e, a torchao config on torchao.

    Raises:
        TypeError: neither.
    """
    if is_torchao_config(native):
        return Flow.TORCHAO
    if is_pt2e_quantizer(native):
        return Flow.PT2E
    raise TypeError(
        "recipe must be a pt2e Quantizer (torchao.quantization.pt2e.quantizer.Quantizer: "
        "X86InductorQuantizer, XNNPACKQuantizer, ComposableQuantizer or your own) or a torchao config "
        f"({', '.join(TORCHAO_RECIPES)}, or a QATConfig of one), got {type(native).__name__}"
    )


def torchao_base(native: Any) -> Any:
    """A torchao config, unwrapped from a ``QATConfig``.

    Raises:
        ValueError: a ``QATConfig`` without a base config, or a config class this flow does not run.
    """
    if type(native).__name__ == "QATConfig":
        if getattr(native, "base_config", None) is None:
            raise ValueError(
                "recipe=QATConfig(...) without a base_config: give the config it trains for, e.g. "
                "QATConfig(Int8DynamicActivationIntxWeightConfig(...)) or that config itself"
            )
        native = native.base_config
    name = type(native).__name__
    if name not in TORCHAO_RECIPES:
        raise ValueError(f"recipe={name}(...) is not one of the torchao configs this flow runs: {TORCHAO_RECIPES}")
    return native


def torchao_scheme(native: Any) -> tuple[Scheme, int | None]:
    """The scheme a torchao config computes and the group size of its int4 weights (``None``: not grouped)."""
    name = type(native).__name__
    bits = 4 if getattr(native, "weight_dtype", None) is INT4 else 8
    dynamic = "DynamicActivation" in name
    scheme = {
        (8, False): Scheme.INT8_WEIGHT_ONLY,
        (4, False): Scheme.INT4_WEIGHT_ONLY,
        (8, True): Scheme.INT8_DYN_INT8_WEIGHT,
        (4, True): Scheme.INT8_DYN_INT4_WEIGHT,
    }[(bits, dynamic)]
    granularity = getattr(native, "granularity", None) or getattr(native, "weight_granularity", None)
    group = getattr(granularity, "group_size", None)
    return scheme, int(group) if group else None


def check_qat_native(native: Any) -> None:
    """Raise on a stack's own object that has no quantization-aware training.

    Raises:
        ValueError: a torchao config torchao's ``QATConfig`` does not train, or a pt2e quantizer not made for QAT.
    """
    if native_flow(native) is Flow.TORCHAO:
        name = type(native).__name__
        if name not in TORCHAO_QAT_RECIPES:
            raise ValueError(
                f"recipe={name}(...) has no QAT in torchao's QATConfig; QuantizationAwareTraining trains "
                f"{TORCHAO_QAT_RECIPES} (post-training: PostTrainingQuantization(recipe=...))"
            )

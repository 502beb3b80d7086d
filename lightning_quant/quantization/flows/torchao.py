"""The torchao flow: torchao's ``quantize_`` puts tensor-subclass weights into the model's own
``nn.Linear`` (and, when asked, ``nn.Embedding``) layers; QAT trains through ``QATConfig``.

Nothing is traced or captured: the model keeps its Python ``forward`` (Hugging Face models with
``**kwargs`` included), its module names and its ``ModelOutput``. A layer computes in one of
four schemes (:class:`~lightning_quant.quantization.config.Scheme`): int8 or int4 weights, with
activations left float (weight-only) or quantized per token at run time (dynamic).

- **QAT**: each layer becomes torchao's ``FakeQuantizedLinear``/``FakeQuantizedEmbedding`` with
  the fake quantization of its scheme (torchao's intx configs: asymmetric per-token int8
  activations, symmetric per-channel int8 or per-group int4 weights). Its fake quantizers are
  :class:`SwitchableFakeQuantizer`: torch.ao's switches (``enable_fake_quant``) and flags, so the
  QAT schedule, evaluation and checkpoints treat them like any other. There are no observers:
  every range is computed from the tensor it quantizes, at every call.
- **Convert** (QAT and post-training alike): ``backend="x86"`` swaps in the schemes that run int8
  kernels on x86 (``Int8WeightOnlyConfig``; ``Int8DynamicActivationInt8WeightConfig`` with the
  same asymmetric per-token activations the QAT model trained with); int4 schemes and
  ``backend="xnnpack"`` keep torchao's intx tensors, which lower to XNNPACK in an ExecuTorch
  program (dynamic schemes only: XNNPACK computes weight-only intx programs wrongly).

The plan (which layer gets which scheme) is checked against the model before anything changes
and kept on the model (:data:`PLAN_ATTRIBUTE`), so conversion needs nothing but the model.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.config import (
    DEFAULT_GROUP_SIZE,
    Backend,
    ExportTarget,
    Precision,
    QuantizationConfig,
    Scheme,
)
from lightning_quant.quantization.flows.spec import SPECS
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.layers import resolve_layers
from lightning_quant.quantization.options import (
    ALGORITHM_LIMITS,
    ALGORITHM_SCHEMES,
    Algorithm,
    Flow,
)
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.integrity import (
    SAFETENSORS_SHA_KEY,
    check_safetensors,
    check_zip,
    load_weights_only,
    tensors_sha256,
)

#: what a layer may compute in under the torchao flow
TORCHAO_PRECISIONS = (Precision.INT8, Precision.INT4, Precision.FLOAT)
#: the scheme QAT trains for when none is named: the one whose accuracy QAT is there to recover
DEFAULT_QAT_SCHEME = Scheme.INT8_DYN_INT4_WEIGHT
#: torch's 4-bit integer dtype (missing from torch's type stubs)
INT4: torch.dtype = getattr(torch, "int4")  # noqa: B009
#: where a prepared or converted model keeps its plan
PLAN_ATTRIBUTE = "_lightning_quant_torchao"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchaoPlan:
    """Which layer computes in which scheme, for which backend; kept on the model."""

    layers: dict[str, Scheme]
    group_size: int
    backend: Backend
    qat: bool
    converted: bool = False
    #: the user's torchao config (``recipe=``), used as it is for every planned layer; else the schemes' own
    recipe: Any = None
    #: torchao's post-training algorithm run on the calibration batches (AWQ, SmoothQuant), or none
    algorithm: Algorithm | None = None


def scheme_of(config: QuantizationConfig) -> Scheme:
    """The config's scheme, or QAT's default."""
    return Scheme(config.scheme) if config.scheme is not None else DEFAULT_QAT_SCHEME


def layer_scheme(scheme: Scheme, precision: Precision | None) -> Scheme | None:
    """A layer's scheme: the global one, or the same activations with int8/int4 weights (``None``: float)."""
    if precision is None:
        return scheme
    if precision is Precision.FLOAT:
        return None
    if precision is Precision.INT8:
        return Scheme.INT8_DYN_INT8_WEIGHT if scheme.dynamic else Scheme.INT8_WEIGHT_ONLY
    return Scheme.INT8_DYN_INT4_WEIGHT if scheme.dynamic else Scheme.INT4_WEIGHT_ONLY


def _candidate(module: nn.Module) -> bool:
    """Linear layers torchao can hold (attention's ``out_proj`` is read by ``multi_head_attention_forward``
    as a plain tensor, so it stays float)."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    return isinstance(module, nn.Linear) and not isinstance(module, NonDynamicallyQuantizableLinear)


def _embedding(module: nn.Module) -> bool:
    return type(module) is nn.Embedding


def plan_layers(model: nn.Module, config: QuantizationConfig, require: bool = True) -> dict[str, Scheme]:
    """Each quantized layer's scheme by module name: every Linear outside ``skip``, and embeddings a
    ``layers`` rule names with int8 or int4 (embeddings take weight-only schemes: a lookup has no
    activation to quantize).

    Raises:
        ValueError: a layers/skip key the model lacks, a setting torchao cannot run, an int4 layer
            whose input size ``group_size`` does not divide (under the default group size, a layer of the
            global scheme gets int8 weights instead, logged), a quantized embedding with export 'executorch',
            or (``require``) no layer to quantize.
    """
    TorchaoFlow().check(config)
    scheme = scheme_of(config)
    rules = resolve_layers(model, config)
    plan: dict[str, Scheme] = {}
    misfits: list[str] = []
    fallbacks: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        setting = rules.setting_of(name, module)
        if _candidate(module):
            chosen = layer_scheme(scheme, setting.precision if setting is not None else None)
            features = module.in_features
        elif _embedding(module) and setting is not None and setting.precision is not Precision.FLOAT:
            chosen = layer_scheme(Scheme.INT8_WEIGHT_ONLY, setting.precision)
            features = module.embedding_dim
        else:
            continue
        if chosen is None:
            continue
        if chosen.weight_bits == 4 and features % config.group_size:
            if setting is None and config.group_size == DEFAULT_GROUP_SIZE:
                # a small layer of the global scheme, under the default group: int8 weights, said; a group or
                # an int4 layer the user asked for is refused below
                chosen = layer_scheme(scheme, Precision.INT8)
                assert chosen is not None
                fallbacks.append(f"{name} ({features})")
            else:
                misfits.append(f"{name} ({features})")
        plan[name] = chosen
    tied = _tied_to_embeddings(model, plan)
    if tied:
        log.info(
            "%s share their weight with an embedding (tied): quantized, each becomes a tensor of its own (the "
            "embedding keeps its float weight unless layers= gives it int8/int4); an export='hf' folder says they "
            "are untied",
            tied,
        )
    if fallbacks:
        log.info(
            "int8 weights for %s: the default group_size=%d does not divide their input size (int4 groups need it "
            "to); set group_size= or layers={name: 'int4'|'float'} to choose otherwise",
            fallbacks[:5],
            DEFAULT_GROUP_SIZE,
        )
    if misfits:
        raise ValueError(
            f"group_size={config.group_size} does not divide the input size of the int4 layers {misfits[:5]}"
            f"{' ...' if len(misfits) > 5 else ''}: pick a group_size that divides them, or give them "
            f"layers={{name: 'int8'}} (or 'float')"
        )
    if ExportTarget.EXECUTORCH in config.export:
        modules = dict(model.named_modules())
        embeddings = sorted(name for name in plan if isinstance(modules[name], nn.Embedding))
        if embeddings:
            raise ValueError(
                f"export 'executorch' with quantized embeddings {embeddings}: XNNPACK runs the quantized Linear "
                "layers, and a quantized embedding lowers to torchao::dequantize_affine, which ExecuTorch's "
                "runtime here has no kernel for. Keep the embeddings float for this export (leave them out of "
                "layers=), or write int8 embeddings to 'hf' or 'state_dict'"
            )
    if not plan and require:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"nothing to quantize with flow='torchao': {type(model).__name__} has no nn.Linear outside skip "
            f"(its module types: {found}); torchao's schemes quantize Linear layers (and embeddings named in "
            "layers=); use flow='fx' or 'pt2e' for convolutional models"
        )
    return plan


def _tied_to_embeddings(model: nn.Module, plan: dict[str, Scheme]) -> list[str]:
    """Planned Linear layers (a language model's ``lm_head``) whose weight is an embedding's."""
    embedded = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    modules = dict(model.named_modules())
    return [
        f"{name} ~ {embedded[id(modules[name].weight)]}"
        for name in plan
        if isinstance(modules[name], nn.Linear) and id(modules[name].weight) in embedded
    ]


def _granularity(scheme: Scheme, group_size: int) -> Any:
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerGroup(group_size) if scheme.weight_bits == 4 else PerAxis(0)


def fake_quant_config(scheme: Scheme, group_size: int) -> Any:
    """torchao's intx config of a scheme: what QAT fake-quantizes with (and xnnpack converts to)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    dtype = INT4 if scheme.weight_bits == 4 else torch.int8
    if scheme.dynamic:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=_granularity(scheme, group_size)
        )
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=_granularity(scheme, group_size))


def _x86_int8_tensors(scheme: Scheme, backend: Backend, embedding: bool) -> bool:
    """Whether a layer converts to torchao's x86 int8 tensors (which choose their own scales) rather than to the intx
    tensors QAT fake-quantizes with (which take given ones)."""
    return backend is Backend.X86 and not embedding and scheme.weight_bits == 8


def learns_ranges(scheme: Scheme, backend: Backend, embedding: bool) -> bool:
    """Whether a layer's int8 model takes learned scales: torchao's intx tensors do (int4 weights, embeddings,
    xnnpack); the x86 int8 tensors of :func:`convert_config` choose their own."""
    return not _x86_int8_tensors(scheme, backend, embedding)


def qat_prepare_config(scheme: Scheme, group_size: int, range_learning: bool) -> Any:
    """torchao's ``QATConfig(step="prepare")`` of a scheme; with ``range_learning``, its weight fake quantization
    learns its scales and zero points (torchao's ``IntxFakeQuantizeConfig(range_learning=True)``)."""
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    base = fake_quant_config(scheme, group_size)
    if not range_learning:
        return QATConfig(base, step="prepare")
    activation, weight = _infer_fake_quantize_configs(base)
    weight = copy.copy(weight)
    weight.is_dynamic, weight.range_learning = False, True
    return QATConfig(activation_config=activation, weight_config=weight, step="prepare")


def convert_config(scheme: Scheme, group_size: int, backend: Backend, embedding: bool) -> Any:
    """The config a layer is converted with: x86 int8 schemes take the tensors with x86 int8 kernels,
    with the activation quantization QAT trained with (asymmetric per token)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, MappingType

    if _x86_int8_tensors(scheme, backend, embedding):
        if scheme.dynamic:
            return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)
        return Int8WeightOnlyConfig()
    return fake_quant_config(scheme, group_size)


def with_algorithm(config: Any, algorithm: Algorithm, step: str) -> Any:
    """``config`` inside torchao's config of ``algorithm`` for ``step`` (``"prepare"``: its observers into the Linear
    layers; ``"convert"``: the weights it chose)."""
    if algorithm is Algorithm.AWQ:
        from torchao.prototype.awq import AWQConfig

        return AWQConfig(config, step=step)
    from torchao.prototype.smoothquant import SmoothQuantConfig

    return SmoothQuantConfig(config, step=step)


def _fake_quantizer_class() -> type:
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    class SwitchableFakeQuantizer(IntxFakeQuantizer):
        """torchao's fake quantizer with torch.ao's switches and flags, kept in the state dict.

        ``observer_enabled`` is kept for the schedule's bookkeeping only: ranges are computed from
        each tensor at each call, so there is nothing to observe or freeze.
        """

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
            self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))

        @property
        def learns_ranges(self) -> bool:
            return bool(getattr(self.config, "range_learning", False))

        def enable_fake_quant(self, enabled: bool = True) -> SwitchableFakeQuantizer:
            self.fake_quant_enabled[0] = 1 if enabled else 0
            return self

        @torch.no_grad()
        def initialize_ranges(self, weight: torch.Tensor) -> None:
            """Learned ranges: scales and zero points from ``weight``, as parameters; set again from the weight
            at the first training call with fake quantization on (the schedule may start it later)."""
            self._initialized = True
            self.scale = self.zero_point = None
            enabled = int(self.fake_quant_enabled[0])
            self.fake_quant_enabled[0] = 1
            IntxFakeQuantizer.forward(self, weight.detach())  # torchao turns them into parameters
            self.fake_quant_enabled[0] = enabled
            self.register_buffer("ranges_pending", torch.tensor([1], dtype=torch.uint8))

        @torch.no_grad()
        def _reset_ranges(self, weight: torch.Tensor) -> None:
            """The learned ranges set again from ``weight``, in place (the optimizer holds these parameters)."""
            fresh = IntxFakeQuantizer(copy.copy(self.config))
            fresh.config.range_learning = False  # torchao's own qparams of the weight, as plain tensors
            fresh(weight.detach())
            scale, zero_point = self.scale, self.zero_point
            assert scale is not None and zero_point is not None  # made parameters by initialize_ranges
            scale.copy_(fresh.scale.clamp(min=self._scale_eps))
            zero_point.copy_(fresh.zero_point.to(zero_point.dtype))
            self.ranges_pending[0] = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.fake_quant_enabled[0]:
                return x
            if self.training and self.learns_ranges and self.ranges_pending[0]:
                self._reset_ranges(x)
            return super().forward(x)

        @torch.no_grad()
        def project(self) -> None:
            """After an optimizer step: learned scales back to at least torchao's epsilon. A step can move a scale
            past zero (a learning rate that suits the weights moves a scale of 0.01 by more than itself); negative
            scales fake-quantize as sign flips in torch, but XNNPACK's kernels refuse them."""
            if self.learns_ranges and isinstance(self.scale, nn.Parameter):
                self.scale.clamp_(min=self._scale_eps)

        def enable_observer(self, enabled: bool = True) -> SwitchableFakeQuantizer:
            self.observer_enabled[0] = 1 if enabled else 0
            return self

    return SwitchableFakeQuantizer


_SWITCHABLE: list[type] = []


def switchable_class() -> type:
    """The :class:`SwitchableFakeQuantizer` class (built once torchao is imported)."""
    if not _SWITCHABLE:
        _SWITCHABLE.append(_fake_quantizer_class())
    return _SWITCHABLE[0]


def _fake_quantized_classes() -> tuple[type, ...]:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return FakeQuantizedLinear, FakeQuantizedEmbedding


def _subclass_weight(module: nn.Module) -> Any:
    from torchao.utils import TorchAOBaseTensor

    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, TorchAOBaseTensor) else None


def weight_precision(weight: Any) -> str:
    """``"int4"`` or ``"int8"`` for a torchao weight tensor."""
    return "int4" if getattr(weight, "target_dtype", torch.int8) == INT4 else "int8"


def _by_name(plan: dict[str, Scheme]) -> Callable[[nn.Module, str], bool]:
    names = set(plan)
    return lambda module, fqn: fqn in names


def _groups(plan: TorchaoPlan, model: nn.Module) -> dict[tuple[Scheme, bool], dict[str, Scheme]]:
    """Layers of one scheme and kind (embedding or not) together: one ``quantize_`` call each."""
    modules = dict(model.named_modules())
    groups: dict[tuple[Scheme, bool], dict[str, Scheme]] = {}
    for name, scheme in plan.layers.items():
        embedding = isinstance(modules[name], nn.Embedding)
        groups.setdefault((scheme, embedding), {})[name] = scheme
    return groups


def plan_of(model: nn.Module) -> TorchaoPlan | None:
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    return plan if isinstance(plan, TorchaoPlan) else None


class TorchaoFlow:
    """Quantize through torchao's ``quantize_`` and ``QATConfig`` (see the module docstring)."""

    stack = "torchao.quantization"
    spec = SPECS[Flow.TORCHAO]

    def check(self, config: QuantizationConfig) -> None:
        """Raises ``ValueError`` on settings the torchao flow cannot honour."""
        for key, setting in config.layers:
            if setting.precision not in TORCHAO_PRECISIONS:
                raise ValueError(
                    f"layers[{key!r}] asks for {setting.precision.value!r}, which flow='torchao' cannot run; "
                    f"its precisions are {[p.value for p in TORCHAO_PRECISIONS]}"
                )
            given = [
                option
                for option, value in (
                    ("observer", setting.observer),
                    ("per_channel", setting.per_channel),
                    ("dtype", setting.dtype),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"layers[{key!r}] sets {given}: torchao's schemes fix them (ranges from each tensor at run time, "
                    "per-channel int8 or per-group int4 weights); a torchao layer sets only its precision "
                    f"{[p.value for p in TORCHAO_PRECISIONS]}"
                )
        scheme = scheme_of(config)
        if config.algorithm is not None:  # (the global scheme's pair is checked by the config itself)
            for key, setting in config.layers:
                layer = layer_scheme(scheme, setting.precision)
                if layer is not None and layer not in ALGORITHM_SCHEMES[config.algorithm]:
                    raise ValueError(
                        f"layers[{key!r}] asks for {setting.precision.value!r} weights, which "
                        f"algorithm={config.algorithm.value!r} cannot give: {ALGORITHM_LIMITS[config.algorithm]}"
                    )
        if ExportTarget.EXECUTORCH in config.export and not scheme.dynamic:
            raise ValueError(
                f"export 'executorch' needs a dynamic scheme ('int8_dyn_int8_weight' or 'int8_dyn_int4_weight'), got "
                f"scheme={scheme.value!r}: XNNPACK computes weight-only programs wrongly (their reload check fails)"
            )

    def check_model(self, model: nn.Module, config: QuantizationConfig) -> None:
        """Raise before any training on a model this config cannot quantize (see :func:`plan_layers`)."""
        plan_layers(model, config)

    def quantize_without_data(
        self,
        model: nn.Module,
        config: QuantizationConfig,
        module_types: tuple[type, ...] = (),
        dtype: str = "qint8",
        engine: str | None = None,
        allow_float: bool = False,
    ) -> nn.Module:
        """A copy of ``model`` with torchao's int8/int4 weights in its Linear layers (weight-only and dynamic
        schemes need no calibration; ``module_types``, ``dtype`` and ``engine`` are torch.ao's, unused here).

        Raises:
            ValueError: nothing to quantize (unless ``allow_float``), or an int4 group size that does not divide.
        """
        if allow_float and not self.quantizes_any(model, config):
            return copy.deepcopy(model).cpu().eval().requires_grad_(False)
        prepared = self.prepare(copy.deepcopy(model).cpu().eval(), config, ExampleInputs(), qat=False)
        return self.convert(prepared).eval().requires_grad_(False)

    def quantizes_any(self, model: nn.Module, config: QuantizationConfig) -> bool:
        """Whether ``config`` leaves any layer of ``model`` to quantize (a search may keep all float)."""
        return bool(plan_layers(model, config, require=False))

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        """QAT: swap each planned layer for torchao's fake-quantized one; post-training: only record
        the plan (weight-only and dynamic schemes need no calibration)."""
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        plan = TorchaoPlan(
            plan_layers(model, config),
            config.group_size,
            Backend(config.backend),
            qat,
            recipe=config.recipe,
            algorithm=None if qat else config.algorithm,
        )
        if plan.algorithm is not None:  # its observers into the Linear layers; the calibration batches feed them
            with known_torch_warnings_silenced():
                for (scheme, embedding), layers in _groups(plan, model).items():
                    if not embedding:
                        config_ = self._layer_config(plan, scheme, embedding)
                        quantize_(model, with_algorithm(config_, plan.algorithm, "prepare"), _by_name(layers))
        if qat:
            with known_torch_warnings_silenced():
                if plan.recipe is not None:
                    quantize_(model, QATConfig(plan.recipe, step="prepare"), _by_name(plan.layers))
                else:
                    for (scheme, embedding), layers in _groups(plan, model).items():
                        learns = config.range_learning and learns_ranges(scheme, plan.backend, embedding)
                        quantize_(model, qat_prepare_config(scheme, plan.group_size, learns), _by_name(layers))
            self._make_switchable(model)
            if config.range_learning:
                self._initialize_ranges(model, plan)
            if plan.recipe is not None and not self.fake_quantizers(model):
                raise ValueError(
                    f"recipe={type(plan.recipe).__name__}(...): torchao's QAT for it has fake quantizers the schedule "
                    "cannot switch; QuantizationAwareTraining trains IntxWeightOnlyConfig and "
                    "Int8DynamicActivationIntxWeightConfig"
                )
        setattr(model, PLAN_ATTRIBUTE, plan)
        return model

    @staticmethod
    def _initialize_ranges(model: nn.Module, plan: TorchaoPlan) -> None:
        """Each learning weight quantizer's scales and zero points as parameters, from the weights now, so that the
        optimizer (built after prepare) holds them; refused when no planned layer can take learned ranges."""
        learning = [
            name
            for name, module in model.named_modules()
            if getattr(getattr(module, "weight_fake_quantizer", None), "learns_ranges", False)
        ]
        if not learning:
            kinds = sorted({f"{s.value}" for s in plan.layers.values()})
            raise ValueError(
                f"range_learning=True, but no layer can take learned ranges: the planned layers ({kinds}, "
                f"backend={plan.backend.value!r}) convert to torchao's x86 int8 tensors, which choose their own "
                "scales. Learned ranges go into int4 weights (scheme 'int8_dyn_int4_weight' or 'int4_weight_only', "
                "or layers={name: 'int4'}), embeddings named in layers=, or backend='xnnpack'"
            )
        for name in learning:
            module = model.get_submodule(name)
            quantizer: Any = module.weight_fake_quantizer
            quantizer.initialize_ranges(module.weight)
        log.info("range_learning: the scales and zero points of %d layer(s) are parameters", len(learning))

    @staticmethod
    def _make_switchable(model: nn.Module) -> None:
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        switchable = switchable_class()
        for module in list(model.modules()):
            for attribute in ("activation_fake_quantizer", "weight_fake_quantizer"):
                quantizer = getattr(module, attribute, None)
                if isinstance(quantizer, IntxFakeQuantizer) and not isinstance(quantizer, switchable):
                    setattr(module, attribute, switchable(quantizer.config))

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        plan = plan_of(prepared)
        assert plan is not None, "the torchao flow converts what it prepared"
        with known_torch_warnings_silenced():
            if plan.recipe is not None and plan.algorithm is None:  # the user's config, as it is
                config = QATConfig(plan.recipe, step="convert") if plan.qat else plan.recipe
                quantize_(prepared, config, _by_name(plan.layers))
            else:
                for (scheme, embedding), layers in _groups(plan, prepared).items():
                    config = self._layer_config(plan, scheme, embedding)
                    if plan.algorithm is not None and not embedding:  # the weights the algorithm chose
                        config = with_algorithm(config, plan.algorithm, "convert")
                    elif plan.qat:
                        config = QATConfig(config, step="convert")
                    quantize_(prepared, config, _by_name(layers))
        setattr(prepared, PLAN_ATTRIBUTE, dataclasses.replace(plan, converted=True))
        return prepared

    @staticmethod
    def _layer_config(plan: TorchaoPlan, scheme: Scheme, embedding: bool) -> Any:
        """The torchao config a planned layer is converted with: the user's, else its scheme's for the backend."""
        if plan.recipe is not None and not embedding:
            return plan.recipe
        return convert_config(scheme, plan.group_size, plan.backend, embedding)

    def layer_configs(self, model: nn.Module) -> dict[str, Any]:
        """``{module name: torchao config}`` each quantized layer of a converted ``model`` was converted with (what
        a Hugging Face ``TorchAoConfig`` records, so that ``transformers`` rebuilds the same tensors); names are
        relative to ``model``."""
        configs: dict[str, Any] = {}
        for prefix, module in model.named_modules():
            plan = plan_of(module)
            if plan is None or not plan.converted:
                continue
            modules = dict(module.named_modules())
            for name, scheme in plan.layers.items():
                embedding = isinstance(modules[name], nn.Embedding)
                configs[f"{prefix}.{name}" if prefix else name] = self._layer_config(plan, scheme, embedding)
        return configs

    def owns(self, model: nn.Module) -> bool:
        return any(plan_of(m) is not None or _subclass_weight(m) is not None for m in model.modules())

    def served_by(self, model: nn.Module) -> str:
        """x86: ``torch.compile`` fuses the run-time quantization of activations with the int8 kernels
        (eager runs them op by op); xnnpack: the ExecuTorch program. A prepared model: eager."""
        plans = [p for p in map(plan_of, model.modules()) if p is not None and p.converted]
        if not plans:
            return "eager"
        return "executorch" if plans[0].backend is Backend.XNNPACK else "compiled"

    def fake_quantizers(self, model: nn.Module) -> list[tuple[str, Any]]:
        if not _SWITCHABLE:
            return []
        return [(name, m) for name, m in model.named_modules() if isinstance(m, _SWITCHABLE[0])]

    def int8_layers(self, model: nn.Module) -> dict[str, str]:
        """Layers holding torchao weights (``int8``/``int4``) and, beside them, the Linear layers kept float."""
        quantized = {name: m for name, m in model.named_modules() if _subclass_weight(m) is not None}
        if not quantized:
            return {}
        layers = {}
        for name, module in model.named_modules():
            if name in quantized:
                layers[name] = weight_precision(_subclass_weight(module))
            elif isinstance(module, nn.Linear):
                layers[name] = "float"
        return layers

    def output_steps(self, model: nn.Module, output: Any = None) -> list[float]:
        """Dynamic schemes quantize activations per token at run time, so no scale is fixed: one int8
        step of the ``output``'s own range stands for it. Weight-only models: none (float activations)."""
        plan = next((p for p in map(plan_of, model.modules()) if p is not None), None)
        if output is None or plan is None or not any(s.dynamic for s in plan.layers.values()):
            return []
        from lightning_quant.utils.tensors import largest_abs

        largest = largest_abs(output)
        return [largest / 127] if largest else []

    def layer_outputs(self, model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
        from lightning_quant.quantization.flows.common import module_layer_outputs

        return module_layer_outputs(model, inputs, names)

    # ------------------------------------------------------------------ weights files
    def float_skeleton(self, model: nn.Module) -> nn.Module:
        """A copy of a converted model with plain zero weights where torchao's were: the float model a
        user rebuilds before loading the int8 weights."""
        import copy

        skeleton = copy.deepcopy(model)
        for module in skeleton.modules():
            weight = _subclass_weight(module)
            if weight is not None:
                module.weight = nn.Parameter(torch.zeros(weight.shape), requires_grad=False)
            if plan_of(module) is not None:
                delattr(module, PLAN_ATTRIBUTE)
        return skeleton

    def weights_bytes(self, model: nn.Module, target: ExportTarget) -> bytes:
        """The model's state dict, torchao tensors included: ``torch.save`` (``state_dict``) or safetensors
        with torchao's tensor metadata (``safetensors``)."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if target is ExportTarget.SAFETENSORS:
            from safetensors.torch import save
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

            tensors, metadata = flatten_tensor_state_dict(state)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            return bytes(save(tensors, metadata={**metadata, SAFETENSORS_SHA_KEY: tensors_sha256(tensors)}))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_weights(
        self,
        model: nn.Module,
        data: bytes,
        target: ExportTarget,
        source: str | os.PathLike = "the weights",
        state: dict[str, Any] | None = None,
    ) -> nn.Module:
        """Load weights written by :meth:`weights_bytes` into ``model`` (the float model, same structure):
        its layers take the int8 tensors as they are (``assign``); returned in eval mode, without gradients.
        ``source`` names the file in errors; ``state``: the ``torch.save`` state dict already read (and
        checked) from ``data``, not parsed again.

        Raises:
            CorruptFileError: the bytes are not a complete file of that kind, or differ from their SHA-256.
            UnsafeFileError: a ``torch.save`` file that holds pickled objects beyond tensors and plain values.
            RuntimeError: the file's keys or shapes do not fit ``model``.
        """
        import torchao.quantization  # noqa: F401  # registers the tensor classes as safe to load

        if target is ExportTarget.SAFETENSORS:
            from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

            tensors, metadata = check_safetensors(data, source)
            metadata.pop(SAFETENSORS_SHA_KEY, None)
            state, leftover = unflatten_tensor_state_dict(tensors, metadata)
            if leftover:
                raise RuntimeError(f"the safetensors file holds tensors no layer takes: {sorted(leftover)[:5]}")
        elif state is None:
            check_zip(data, source, "torch.save file")
            state = load_weights_only(data, source, "state dict")
        model.eval().requires_grad_(False)
        model.load_state_dict(state, assign=True)
        return model

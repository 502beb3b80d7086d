"""The eager flow: swap modules, never trace. For models FX cannot trace.

- Fusion: the groups in ``modules_to_fuse``, or else every adjacent Conv/BN/ReLU,
  Conv/BN, Conv/ReLU, BN/ReLU, Linear/BN and Linear/ReLU run found inside ``nn.Sequential``
  containers. Only ``nn.Sequential`` order is known to be execution order, so patterns
  elsewhere are left to ``modules_to_fuse`` rather than guessed from registration order.
- Quant/dequant stubs: the model is placed inside a :class:`QuantBoundary` module that
  quantizes each floating-point input and dequantizes each output; skipped modules are
  placed inside a :class:`FloatIsland` that dequantizes on the way in and re-quantizes on the
  way out. Both are module swaps: ``forward`` is never wrapped in a closure.
- Functional ops the model calls on quantized tensors (``x + y``) need
  ``torch.ao.nn.quantized.FloatFunctional`` in the model, as torch's eager mode requires.
- Eager-ready models (torchvision's quantizable ones) are used as written: modules that are
  already fused (``ConvReLU2d``...) are left alone, and a model holding its own ``QuantStub`` and
  ``DeQuantStub`` gets no second boundary. ``FloatFunctional`` adders a model defines but never
  calls (torchvision's blocks without a residual) do not block conversion.
- A model whose inputs are all integers (token ids) has no float input to quantize at the
  boundary: it is refused before training, with the flows that do take it.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization import DeQuantStub, QConfigMapping, QuantStub, convert, prepare, prepare_qat
from torch.ao.quantization.fuse_modules import fuse_modules, fuse_modules_qat

from lightning_quant.quantization.config import Precision, QuantizationConfig
from lightning_quant.quantization.flows.qconfig import build_qconfig_mapping
from lightning_quant.quantization.flows.spec import SPECS
from lightning_quant.quantization.flows.torch_ao_quantization import (
    TorchAoModels,
    calibrated_codes,
    convert_with_trained_qparams,
    fake_quantize_in_float32,
    fused_names,
    record_activation_codes,
)
from lightning_quant.quantization.fusion import fusable_groups as find_fusable_groups
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.layers import resolve_layers
from lightning_quant.quantization.options import Flow
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.modules import within

log = logging.getLogger(__name__)


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _map_outputs(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor of a nested output, keeping each container's own type (a Hugging Face
    ``ModelOutput``, a namedtuple)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [_map_outputs(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_map_outputs(v, fn) for v in value]
    if isinstance(value, dict):
        mapped = {k: _map_outputs(v, fn) for k, v in value.items()}
        if type(value) is dict:
            return mapped
        try:
            return type(value)(**mapped)  # ModelOutput and other dict subclasses built by keyword
        except TypeError:
            copied = copy.copy(value)
            copied.update(mapped)
            return copied
    return value


def _dequantized(value: Any, dequant: nn.Module) -> Any:
    """Float island inputs: quantized (and float) tensors through ``dequant``; integer tensors such
    as token ids as they are."""
    if isinstance(value, torch.Tensor) and (value.is_quantized or value.is_floating_point()):
        return dequant(value)
    return value


class QuantBoundary(nn.Module):
    """Quantizes the floating-point inputs of ``module`` and dequantizes its outputs.

    Inputs are matched to ``module.forward``'s parameters by name, so an input gets the same
    ``QuantStub`` (and learns one range) whether it is passed by position or by keyword.
    One stub per floating-point input seen in the example; integer inputs such as token ids
    pass through untouched.
    """

    #: what the wrapped model's module names start with inside the boundary
    wrapped_prefix = "module."

    def __init__(self, module: nn.Module, example: ExampleInputs) -> None:
        super().__init__()
        self.module = module
        self.input_signature = inspect.signature(module.forward)
        arguments = self.input_signature.bind_partial(*example.args, **example.kwargs).arguments
        self.quant = nn.ModuleDict({name: QuantStub() for name, value in arguments.items() if _is_float_tensor(value)})
        self.dequant = DeQuantStub()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.input_signature.bind(*args, **kwargs)
        for name, stub in self.quant.items():
            if name in bound.arguments:
                bound.arguments[name] = stub(bound.arguments[name])
        return _map_outputs(self.module(*bound.args, **bound.kwargs), self.dequant)


#: attributes torch's eager quantization reads off a module, which a float island answers for itself
_OWN_ATTRIBUTES = frozenset({"qconfig", "activation_post_process", "weight_fake_quant", "training"})


class FloatIsland(nn.Module):
    """Runs ``module`` in float inside a quantized model: dequantize in, quantize out."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.module = module
        self.quant = QuantStub()
        self.module.qconfig = None  # type: ignore[assignment]  # torch reads qconfig attributes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_dequantized(a, self.dequant) for a in args)
        kwargs = {k: _dequantized(v, self.dequant) for k, v in kwargs.items()}
        return _map_outputs(self.module(*args, **kwargs), lambda t: self.quant(t) if t.is_floating_point() else t)

    def __getattr__(self, name: str) -> Any:
        """The wrapped module's attributes (``batch_first``, ``config``...) read through the island;
        not what torch's quantization reads off modules (``qconfig``...: the island has its own)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module" or name.startswith("_") or name in _OWN_ATTRIBUTES:
                raise
            return getattr(self.module, name)


def check_fusion_groups(model: nn.Module, groups: list[list[str]]) -> None:
    """Raise before fusing when a group names a module ``model`` does not have.

    Raises:
        ValueError: naming the missing module and the modules there are.
    """
    names = {name for name, _ in model.named_modules() if name}
    for group in groups:
        missing = [name for name in group if name not in names]
        if missing:
            raise ValueError(
                f"modules_to_fuse group {group} names {missing}, which {type(model).__name__} does not have; "
                f"its modules include {sorted(names)[:20]}"
            )


def _rule_type(module: nn.Module) -> type:
    """The type a per-type setting matches: a fused module (``LinearReLU``...) counts as its first layer."""
    return type(module[0]) if isinstance(module, _FusedModule) else type(module)


def _assign_qconfigs(model: nn.Module, mapping: QConfigMapping) -> None:
    """Write a ``QConfigMapping`` as eager-mode ``qconfig`` attributes: a name (for that module and
    everything inside it, the nearest name winning) beats a type, which beats the global qconfig."""
    model.qconfig = mapping.global_qconfig  # type: ignore[assignment]
    names = sorted(mapping.module_name_qconfigs, key=lambda n: -n.count("."))
    fused = fused_names(model)
    for name, module in model.named_modules():
        if within(name, fused, strictly=True):
            continue  # the layers inside a fused module are quantized as part of it
        enclosing = within(name, names) if name else None
        if enclosing is not None:
            module.qconfig = mapping.module_name_qconfigs[enclosing]
        elif _rule_type(module) in mapping.object_type_qconfigs:
            module.qconfig = mapping.object_type_qconfigs[_rule_type(module)]


def _keep_embeddings_float(model: nn.Module) -> None:
    """Embeddings stay float: torch's static eager mode has no int8 lookup with int8 activations (the
    general qconfig makes ``convert`` raise); their output is quantized where the next stub says."""
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.qconfig = None  # type: ignore[assignment]


def _without_int8_kernel(model: nn.Module) -> tuple[str, ...]:
    """Layers with weights that eager conversion would leave float while their input arrives int8
    (no int8 module for their type, and not fused into one: a ``BatchNorm1d`` after a ``Linear``):
    the int8 model would fail on them at run time, so they become float islands, logged."""
    from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

    known = set(get_default_static_quant_module_mappings())
    fused = fused_names(model)
    qconfigs: dict[str, Any] = {}  # each module's qconfig as prepare will propagate it
    found = []
    for name, module in model.named_modules():
        parent = qconfigs.get(name.rpartition(".")[0]) if name else None
        qconfigs[name] = module.qconfig if "qconfig" in vars(module) else parent
        if (
            name
            and qconfigs[name] is not None
            and type(module) not in known
            and not isinstance(module, (nn.Embedding, nn.EmbeddingBag, _FusedModule))
            and not within(name, fused, strictly=True)
            and not any(True for _ in module.children())
            and any(True for _ in module.parameters(recurse=False))
        ):
            found.append(name)
    if found:
        described = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in found]
        log.info("kept float, no int8 module for them in eager mode: %s", described[:10])
    return tuple(found)


def _swap_in_islands(model: nn.Module, names: tuple[str, ...], types: tuple[type, ...]) -> None:
    targets = [name for name, m in model.named_modules() if name and (name in names or isinstance(m, types))]
    # outermost first, and nothing inside an island already made
    chosen: list[str] = []
    for name in sorted(targets, key=lambda n: n.count(".")):
        if not within(name, chosen, strictly=True):
            chosen.append(name)
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FloatIsland(getattr(parent, attr)))


def _has_own_stubs(model: nn.Module) -> bool:
    """Whether the model quantizes and dequantizes itself (torchvision's quantizable models do)."""
    modules = list(model.modules())
    return any(isinstance(m, QuantStub) for m in modules) and any(isinstance(m, DeQuantStub) for m in modules)


def _auto_fusion_groups(model: nn.Module) -> list[list[str]]:
    """Fusable runs outside modules that are fused already (a ``ConvReLU2d`` is an ``nn.Sequential``
    too, and fusing inside it again breaks it)."""
    fused = fused_names(model)
    return [group for group in find_fusable_groups(model) if not any(within(n, fused) for n in group)]


def _call_fuse_model(model: nn.Module, qat: bool) -> bool:
    """Fuse the way the model says, when it says (torchvision's quantizable models define
    ``fuse_model(is_qat=None)``: conv/BN/ReLU runs that are attributes, not a ``nn.Sequential``, which
    no automatic rule can see), unless it is fused already. Returns whether it was called."""
    fuse = getattr(model, "fuse_model", None)
    if not callable(fuse) or any(isinstance(m, _FusedModule) for m in model.modules()):
        return False
    parameters = inspect.signature(fuse).parameters
    flag = next((name for name in ("is_qat", "qat") if name in parameters), None)
    if flag is None and qat:
        return False  # a fuse_model without a QAT switch folds BatchNorm away, which QAT must keep
    fuse(**({flag: qat} if flag else {}))
    return True


def check_float_inputs(model: nn.Module, example: ExampleInputs) -> None:
    """Refuse, before any training, a model whose inputs are all integers: eager mode quantizes at
    the float inputs, and token ids have none.

    Raises:
        ValueError: naming the flows and options that quantize such a model.
    """
    values = [*example.args, *example.kwargs.values()]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors and not any(t.is_floating_point() for t in tensors):
        raise ValueError(
            f"flow='eager' quantizes a model at its float inputs, and {type(model).__name__} takes only integer "
            "inputs (token ids?): nothing would be quantized. Use flow='fx' (it quantizes from the embeddings "
            "on, their rows int8), flow='pt2e' (static int8 through torch.export), mode='dynamic' or "
            "flow='torchao' (weight schemes, for transformers), or module=<the submodule after the embeddings>, "
            "whose input is float"
        )


class EagerFlow(TorchAoModels):
    """Quantize through ``torch.ao.quantization`` eager mode (fuse, stubs, prepare, convert)."""

    spec = SPECS[Flow.EAGER]

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        own_stubs = _has_own_stubs(model)
        if not own_stubs:
            check_float_inputs(model, example)
        mapping = build_qconfig_mapping(config, model, qat)
        rules = resolve_layers(model, config)  # layers kept float (skip included) become float islands
        names = tuple(n for n, s in rules.names.items() if s.precision is Precision.FLOAT)
        types = tuple(t for t, s in rules.types if s.precision is Precision.FLOAT)
        model.train(qat)
        if config.modules_to_fuse is not None:  # the user's groups; an empty list switches fusion off
            groups = [list(g) for g in config.modules_to_fuse]
        else:
            _call_fuse_model(model, qat)
            groups = _auto_fusion_groups(model)
        check_fusion_groups(model, groups)
        with known_torch_warnings_silenced():
            if groups:
                (fuse_modules_qat if qat else fuse_modules)(model, groups, inplace=True)
            _assign_qconfigs(model, mapping)
            _keep_embeddings_float(model)
            _swap_in_islands(model, names + _without_int8_kernel(model), types)
            if own_stubs:  # used as written: its stubs are the boundary
                prepared = model
            else:
                prepared = QuantBoundary(model, example)
            prepared.qconfig = mapping.global_qconfig  # type: ignore[assignment]
            prepared.train(qat)
            (prepare_qat if qat else prepare)(prepared, inplace=True)
        return fake_quantize_in_float32(prepared)

    def convert(self, prepared: nn.Module) -> nn.Module:
        codes = calibrated_codes(prepared)
        convert_with_trained_qparams(prepared)
        with known_torch_warnings_silenced():
            return record_activation_codes(convert(prepared, inplace=True), codes)

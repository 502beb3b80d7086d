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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QConfigMapping, QuantStub, convert, prepare, prepare_qat
from torch.ao.quantization.fuse_modules import fuse_modules, fuse_modules_qat

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.qconfig import build_qconfig_mapping, resolve_skip
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.modules import within

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Fusable runs, longest first, as type tuples; torch's eager fuser supports each.
_FUSION_PATTERNS: tuple[tuple[tuple[type, ...], ...], ...] = (
    (_CONV, _BN, (nn.ReLU,)),
    (_CONV, _BN),
    (_CONV, (nn.ReLU,)),
    ((nn.BatchNorm2d, nn.BatchNorm3d), (nn.ReLU,)),
    ((nn.Linear,), (nn.BatchNorm1d,)),
    ((nn.Linear,), (nn.ReLU,)),
)


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _map_outputs(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_outputs(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_outputs(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_outputs(v, fn) for k, v in value.items()}
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


class FloatIsland(nn.Module):
    """Runs ``module`` in float inside a quantized model: dequantize in, quantize out."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.module = module
        self.quant = QuantStub()
        self.module.qconfig = None  # type: ignore[assignment]  # torch reads qconfig attributes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(self.dequant(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: self.dequant(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return _map_outputs(self.module(*args, **kwargs), self.quant)


def find_fusable_groups(model: nn.Module) -> list[list[str]]:
    """Names of adjacent fusable modules inside every ``nn.Sequential`` of ``model``."""
    groups: list[list[str]] = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        i = 0
        while i < len(children):
            for pattern in _FUSION_PATTERNS:
                run = children[i : i + len(pattern)]
                if len(run) == len(pattern) and all(isinstance(m, t) for (_, m), t in zip(run, pattern)):
                    groups.append([f"{prefix}.{name}" if prefix else name for name, _ in run])
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups


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


def _assign_qconfigs(model: nn.Module, mapping: QConfigMapping) -> None:
    """Write a ``QConfigMapping`` as eager-mode ``qconfig`` attributes (name beats type beats global)."""
    model.qconfig = mapping.global_qconfig  # type: ignore[assignment]
    for name, module in model.named_modules():
        if name in mapping.module_name_qconfigs:
            module.qconfig = mapping.module_name_qconfigs[name]
        elif type(module) in mapping.object_type_qconfigs:
            module.qconfig = mapping.object_type_qconfigs[type(module)]


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


class EagerFlow:
    """Quantize through ``torch.ao.quantization`` eager mode (fuse, stubs, prepare, convert)."""

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        mapping = build_qconfig_mapping(config, model, qat)
        names, types = resolve_skip(model, config.skip)
        model.train(qat)
        groups = [list(g) for g in config.modules_to_fuse] if config.modules_to_fuse else find_fusable_groups(model)
        check_fusion_groups(model, groups)
        with known_torch_warnings_silenced():
            if groups:
                (fuse_modules_qat if qat else fuse_modules)(model, groups, inplace=True)
            _assign_qconfigs(model, mapping)
            _swap_in_islands(model, names, types)
            boundary = QuantBoundary(model, example)
            boundary.qconfig = mapping.global_qconfig  # type: ignore[assignment]
            boundary.train(qat)
            (prepare_qat if qat else prepare)(boundary, inplace=True)
        return boundary

    def convert(self, prepared: nn.Module) -> nn.Module:
        with known_torch_warnings_silenced():
            return convert(prepared, inplace=True)

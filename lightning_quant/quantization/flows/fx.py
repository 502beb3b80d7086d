"""The FX flow: trace the model's graph, fuse Conv/BN/ReLU and Linear/ReLU/BN automatically."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch.fx
import torch.nn as nn
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.flows.qconfig import build_qconfig_mapping
from lightning_quant.quantization.flows.spec import SPECS
from lightning_quant.quantization.flows.torch_ao_quantization import (
    TorchAoModels,
    calibrated_codes,
    convert_with_trained_qparams,
    fake_quantize_in_float32,
    is_quantized_module,
    record_activation_codes,
)
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.layers import resolve_skip
from lightning_quant.quantization.options import Flow
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.timing import median_ms


class FxTracingError(RuntimeError):
    """FX could not trace the model; the message names the submodule and the remedies."""


class FxFlow(TorchAoModels):
    """Quantize through ``torch.ao.quantization.quantize_fx``.

    Skipped modules are also made non-traceable, so ``skip`` is the way around a submodule
    that FX cannot trace (data-dependent control flow, say).
    """

    spec = SPECS[Flow.FX]

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        mapping = build_qconfig_mapping(config, model, qat)
        names, types = resolve_skip(model, config.skip)
        custom = PrepareCustomConfig().set_non_traceable_module_names(list(names))
        custom.set_non_traceable_module_classes([*types, *mode_dependent_types(model)])
        model.train(qat)
        prepare = prepare_qat_fx if qat else prepare_fx
        try:
            with known_torch_warnings_silenced():
                return fake_quantize_in_float32(prepare(model, mapping, example.args, prepare_custom_config=custom))
        except Exception as err:
            raise FxTracingError(_tracing_message(model, err, names, types)) from err

    def convert(self, prepared: nn.Module) -> nn.Module:
        return self.convert_keeping_float(prepared, ())

    def convert_keeping_float(self, prepared: nn.Module, names: Sequence[str]) -> nn.Module:
        """:meth:`convert`, with the named layers converted to float (a fused QAT Conv-BN folded):
        FX's conversion takes the prepared model's qconfig mapping again, with ``None`` for those
        layers. It still turns the observers around them into quantize/dequantize pairs with
        nothing int8 in between; those round trips are removed (a float layer reads float).

        Raises:
            ValueError: a name that is not a layer of ``prepared``.
        """
        assert isinstance(prepared, torch.fx.GraphModule), "the FX flow converts what it prepared"
        mapping = None
        if names:
            modules = dict(prepared.named_modules())
            unknown = [name for name in names if name not in modules]
            if unknown:
                raise ValueError(f"cannot keep {unknown[:5]} float: not layers of the prepared model")
            mapping = copy.deepcopy(prepared.meta["_observed_graph_module_attrs"].qconfig_mapping)
            for name in names:
                mapping.set_module_name(name, None)
        codes = calibrated_codes(prepared)
        with known_torch_warnings_silenced():
            convert_with_trained_qparams(prepared)
            converted = _drop_string_annotations(convert_fx(prepared, qconfig_mapping=mapping))
        return record_activation_codes(_drop_round_trips(converted) if names else converted, codes)


def _drop_round_trips(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove ``quantize_per_tensor`` nodes whose every use is a ``dequantize``: float in, float out."""
    graph = model.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.quantize_per_tensor or not node.users:
            continue
        if all(user.op == "call_method" and user.target == "dequantize" for user in node.users):
            for user in list(node.users):
                user.replace_all_uses_with(node.args[0])
                graph.erase_node(user)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    model.recompile()
    return model


def boundary_layers(int8: nn.Module) -> dict[str, tuple[bool, bool]]:
    """The int8 layers of a converted FX graph that pay a boundary, with which: ``(quantized before,
    dequantized after)`` (a float op on that side), in graph order."""
    graph = getattr(int8, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return {}
    modules = dict(int8.named_modules())
    found: dict[str, tuple[bool, bool]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_quantized_module(modules[str(node.target)]):
            continue
        source = node.args[0] if node.args else None
        quantized_here = isinstance(source, torch.fx.Node) and source.target is torch.quantize_per_tensor
        dequantized_next = any(u.op == "call_method" and u.target == "dequantize" for u in node.users)
        if (quantized_here or dequantized_next) and str(node.target) not in found:
            found[str(node.target)] = (quantized_here, dequantized_next)
    return found


def float_savings(int8: nn.Module, floated: nn.Module, example: ExampleInputs, repeats: int = 30) -> dict[str, float]:
    """For each boundary layer of ``int8`` (:func:`boundary_layers`), the ms a call saves with the
    layer float (``floated``: the same model converted with those layers float), each timed alone on
    its input from ``example``: the int8 layer with the quantize before it and the dequantize after
    it that it pays, against the float layer with the dequantize and quantize it would then need
    where a neighbour stays int8."""
    layers = boundary_layers(int8)
    int8_modules, float_modules = dict(int8.named_modules()), dict(floated.named_modules())
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, args[0])

        return hook

    handles = [int8_modules[name].register_forward_pre_hook(keep_input(name)) for name in layers]
    try:
        with torch.inference_mode():
            example(int8)
    finally:
        for handle in handles:
            handle.remove()
    savings: dict[str, float] = {}
    with torch.inference_mode():
        for name, (quantized_here, dequantized_next) in layers.items():
            x = inputs.get(name)
            float_layer = float_modules.get(name)
            floated_here = float_layer is not None and not is_quantized_module(float_layer)
            if isinstance(x, torch.Tensor) and x.is_quantized and floated_here:  # (a BN FX keeps int8 stays out)
                sides = (quantized_here, dequantized_next)
                savings[name] = _saving(int8_modules[name], float_modules[name], x, sides, repeats)
    return savings


def _saving(layer: nn.Module, float_layer: nn.Module, x: torch.Tensor, sides: tuple[bool, bool], repeats: int) -> float:
    """ms saved by one call of ``float_layer`` instead of ``layer`` on ``x`` (see :func:`float_savings`)."""
    quantized_here, dequantized_next = sides
    x_float, out = x.dequantize(), layer(x)
    if not isinstance(out, torch.Tensor) or not out.is_quantized:
        return 0.0  # not a layer that requantizes its output: nothing to weigh
    out_float = out.dequantize()
    int8_ms = median_ms(lambda: layer(x), repeats, 3)
    float_ms = median_ms(lambda: float_layer(x_float), repeats, 3)
    quantize_in = median_ms(
        lambda: torch.quantize_per_tensor(x_float, x.q_scale(), x.q_zero_point(), x.dtype), repeats, 3
    )
    dequantize_in = median_ms(lambda: x.dequantize(), repeats, 3)
    quantize_out = median_ms(
        lambda: torch.quantize_per_tensor(out_float, out.q_scale(), out.q_zero_point(), out.dtype), repeats, 3
    )
    dequantize_out = median_ms(lambda: out.dequantize(), repeats, 3)
    paid = int8_ms + (quantize_in if quantized_here else 0.0) + (dequantize_out if dequantized_next else 0.0)
    instead = float_ms + (0.0 if quantized_here else dequantize_in) + (0.0 if dequantized_next else quantize_out)
    return paid - instead


def mode_dependent_types(model: nn.Module) -> list[type]:
    """Parameter-free module types outside ``torch.nn`` whose ``forward`` reads ``self.training``
    (stochastic depth, drop path). Traced, their branch would be frozen in the mode of the trace
    (train mode for QAT: an int8 model that drops paths at random); kept as modules, they follow
    ``train()``/``eval()``. ``torch.nn``'s own (dropout, batch norm) are modules in the graph already."""
    found: list[type] = []
    for module in model.modules():
        cls = type(module)
        if cls in found or cls.__module__.startswith("torch.nn") or any(True for _ in module.parameters()):
            continue
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if "self.training" in source:
            found.append(cls)
    return found


def _drop_string_annotations(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove annotations FX kept as strings (``from __future__ import annotations`` in the model).

    FX writes them into the generated code as names like ``_torch_Tensor_`` that TorchScript
    cannot resolve; without them TorchScript infers the types itself.
    """
    changed = False
    for node in graph_module.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
            changed = True
    if changed:
        graph_module.recompile()
    return graph_module


class _LocatingTracer(torch.fx.Tracer):
    """A tracer that remembers the innermost submodule whose forward raised."""

    def __init__(self, leaf_names: tuple[str, ...], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.failed_at: str | None = None
        self._leaf_names = leaf_names
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self._leaf_names or isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def _tracing_message(model: nn.Module, err: Exception, names: tuple, types: tuple) -> str:
    tracer = _LocatingTracer(names, types)
    try:
        tracer.trace(model)
    except Exception:
        pass
    if tracer.failed_at:
        where = f"submodule {tracer.failed_at!r} ({type(model.get_submodule(tracer.failed_at)).__name__})"
        remedy = (
            f'use flow="pt2e" (torch.export captures what FX cannot), keep it in float with '
            f'skip=[{tracer.failed_at!r}], or use flow="eager"'
        )
    else:
        where = f"the forward of {type(model).__name__} itself"
        remedy = (
            'use flow="pt2e" (torch.export captures what FX cannot: keyword-only **kwargs forwards such as '
            'Hugging Face models), flow="torchao" (nothing is traced: its Linear layers become int8/int4; for '
            'transformers), flow="eager", or move the untraceable code into a submodule and skip it'
        )
    return f"FX could not trace {where}: {type(err).__name__}: {err}. To quantize this model, {remedy}."

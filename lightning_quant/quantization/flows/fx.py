"""The FX flow: trace the model's graph, fuse Conv/BN/ReLU and Linear/ReLU/BN automatically."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch.fx
import torch.nn as nn
from torch.ao.quantization import FakeQuantize, FakeQuantizeBase, FusedMovingAvgObsFakeQuantize, ObserverBase
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
from lightning_quant.quantization.inputs import ExampleInputs, forward_signature, inference_inputs
from lightning_quant.quantization.layers import resolve_skip
from lightning_quant.quantization.options import Flow
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.tensors import flat_tensors
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
            with known_torch_warnings_silenced(), traced_as_called(model, example) as trace:
                prepared = prepare(model, mapping, example.args, prepare_custom_config=custom)
        except Exception as err:
            with traced_as_called(model, example):
                message = _tracing_message(model, err, names, types)
            if message is None:  # traced: torch failed on what it traced, and its own error says on what
                raise
            raise FxTracingError(message) from err
        prepared = drop_non_float_observers(_output_as_traced(prepared, trace.output_type), example)
        if qat:
            _observe_row_weights(prepared)
        predicting = inference_inputs(forward_signature(model), example)
        passed = _left_out(prepared, example)
        training_only = tuple(name for name in _left_out(prepared, predicting) if name not in passed)
        if training_only:  # labels handed to the model for its loss: the int8 model is called without them
            prepared.meta[_TRAINING_ONLY] = training_only
            _check_prediction_graph(model, prepared, predicting)
        return fake_quantize_in_float32(prepared)

    def convert(self, prepared: nn.Module) -> nn.Module:
        return self.convert_keeping_float(prepared, ())

    def inference_view(self, prepared: nn.Module) -> nn.Module:
        """``prepared`` as called to predict (:func:`prediction_graph`); a model that is no FX graph as it is."""
        return prediction_graph(prepared) if isinstance(prepared, torch.fx.GraphModule) else prepared

    def convert_keeping_float(self, prepared: nn.Module, names: Sequence[str]) -> nn.Module:
        """:meth:`convert`, with the named layers converted to float (a fused QAT Conv-BN folded):
        FX's conversion takes the prepared model's qconfig mapping again, with ``None`` for those
        layers. It still turns the observers around them into quantize/dequantize pairs with
        nothing int8 in between; those round trips are removed (a float layer reads float).

        Raises:
            ValueError: a name that is not a layer of ``prepared``.
        """
        assert isinstance(prepared, torch.fx.GraphModule), "the FX flow converts what it prepared"
        prepared = prediction_graph(prepared)
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


def _observe_row_weights(prepared: nn.Module) -> None:
    """Give the embeddings' per-row weight quantizers their ranges now, from the weights as they are: torch's
    ``FakeQuantize`` cannot fake-quantize per row before it has observed, and a validation before the first
    training step (Lightning's sanity check) runs with observers paused. The first training step observes the
    same weights, so it ends as it would have."""
    for module in prepared.modules():
        quantizer = getattr(module, "weight_fake_quant", None)
        weight = getattr(module, "weight", None)
        if (
            isinstance(quantizer, FakeQuantize)
            and not isinstance(quantizer, FusedMovingAvgObsFakeQuantize)  # (it handles an unobserved weight)
            and quantizer.is_per_channel
            and isinstance(weight, torch.Tensor)
            and bool(quantizer.observer_enabled[0])
        ):
            with torch.no_grad():
                quantizer(weight.detach())


def drop_non_float_observers(prepared: torch.fx.GraphModule, example: ExampleInputs) -> torch.fx.GraphModule:
    """Remove the observers FX put on integer tensors and numbers: an input such as an attention mask or
    token ids that goes through a tensor op (``mask.unsqueeze(-1)``) gets one, as FX quantizes the values
    of such ops, and so does a number input (``scale=2.0``) that multiplies; torch's observers and fake
    quantizers refuse both. Which values are not floating-point tensors is
    read off one float run of the graph on ``example`` (:class:`_PassingObservers`). Returns ``prepared``."""
    interpreter = _PassingObservers(prepared)
    if not interpreter.observers:
        return prepared
    try:
        with torch.no_grad(), _float_run(prepared):
            interpreter.run(*_placeholder_values(prepared, example))
    except Exception:
        return prepared  # the graph's own run fails with torch's error, which says where
    for node in interpreter.not_float:
        source = node.args[0]
        assert isinstance(source, torch.fx.Node), "an observer observes a node"
        node.replace_all_uses_with(source)
        prepared.graph.erase_node(node)
    used = {str(node.target) for node in prepared.graph.nodes if node.op == "call_module"}
    for node in interpreter.not_float:
        if str(node.target) not in used and hasattr(prepared, str(node.target)):
            delattr(prepared, str(node.target))
    if interpreter.not_float:
        prepared.recompile()
    return prepared


class _PassingObservers(torch.fx.Interpreter):
    """Runs a prepared graph with its observer and fake-quantizer nodes passed over (each hands on its
    input: nothing observed), noting those that were handed anything but a floating-point tensor
    (``not_float``: an integer tensor, or a Python number such as a ``scale=2.0`` input)."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.not_float: list[torch.fx.Node] = []
        self.observers = {  # (by target: FX shares one observer between an op's input and output, under two names)
            node
            for node in graph_module.graph.nodes
            if node.op == "call_module"
            and isinstance(graph_module.get_submodule(str(node.target)), (ObserverBase, FakeQuantizeBase))
        }

    def run_node(self, node: torch.fx.Node) -> Any:
        if node not in self.observers:
            return super().run_node(node)
        value = self.env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else node.args[0]
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            self.not_float.append(node)
        return value


@contextlib.contextmanager
def _float_run(prepared: nn.Module) -> Iterator[None]:
    """``prepared`` in eval mode with its fake quantizers (QAT layers' weights) and their observers off, so a
    run computes the float function and moves no statistics; put back as it was after."""
    training = {module: module.training for module in prepared.modules()}
    switches = {
        quantizer: (quantizer.observer_enabled.clone(), quantizer.fake_quant_enabled.clone())
        for quantizer in prepared.modules()
        if isinstance(quantizer, FakeQuantizeBase)
    }
    try:
        prepared.eval()
        for quantizer in switches:
            quantizer.disable_observer()
            quantizer.disable_fake_quant()
        yield
    finally:
        for module, mode in training.items():
            module.training = mode
        for quantizer, (observer, fake_quant) in switches.items():
            quantizer.observer_enabled.copy_(observer)
            quantizer.fake_quant_enabled.copy_(fake_quant)


def _placeholder_values(graph_module: torch.fx.GraphModule, example: ExampleInputs) -> list[Any]:
    """``example`` as the graph's placeholders in order: keyword inputs by name, defaults for the rest."""
    positional = list(example.args)
    values = []
    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        if positional:
            values.append(positional.pop(0))
        elif node.target in example.kwargs:
            values.append(example.kwargs[node.target])
        else:
            values.append(node.args[0] if node.args else None)
    return values


@dataclasses.dataclass
class _Trace:
    """What :func:`traced_as_called` saw: the type the forward returned."""

    output_type: type | None = None


@contextlib.contextmanager
def traced_as_called(model: nn.Module, example: ExampleInputs) -> Iterator[_Trace]:
    """While FX traces ``model``, its forward is traced as the call ``example`` makes it:

    - inputs that default to ``None`` and that the call leaves out are fixed at ``None``: FX cannot
      follow ``if attention_mask is not None`` (a traced input is never ``None``) and would trace the
      branch the call does not take. The graph has no such input: passing one later is a
      ``TypeError``, never silently ignored;
    - the type the forward returns is recorded: FX turns a ``dict`` subclass (a Hugging Face
      ``ModelOutput``) into a plain ``dict``, and :func:`_output_as_traced` gives it back.

    A forward with ``*args``/``**kwargs`` or positional-only inputs is traced as it is.
    """
    cls, trace = type(model), _Trace()
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        params = []
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not params or any(p.kind not in plain for p in params):
        yield trace
        return
    given = {p.name for p in params[: len(example.args)]} | set(example.kwargs)
    fixed = [p.name for p in params if p.name not in given and p.default is None]
    kept = [p for p in params if p.name not in fixed]
    defaults = {f"_default_{p.name}": p.default for p in kept if p.default is not inspect.Parameter.empty}
    declared = ["self"]
    for p in kept:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in declared:
            declared.append("*")
        declared.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}=_default_{p.name}")
    passed = [*(f"{p.name}={p.name}" for p in kept), *(f"{name}=None" for name in fixed)]
    # FX reads a forward's inputs off its code object, so the forward it traces is written as code (from the
    # identifiers of the signature only), made by a factory so that what it uses are closure variables and
    # its globals can be those of the model's own forward, which FX patches while tracing (``math`` calls)
    namespace: dict[str, Any] = {}
    exec(
        f"def _make(_forward, _trace, {''.join(name + ', ' for name in defaults)}):\n"
        f"    def forward({', '.join(declared)}):\n"
        f"        out = _forward(self, {', '.join(passed)})\n"
        "        _trace.output_type = type(out)\n"
        "        return out\n"
        "    return forward\n",
        namespace,
    )
    made = namespace["_make"](cls.forward, trace, *defaults.values())
    forward = types.FunctionType(
        made.__code__, inspect.unwrap(cls.forward).__globals__, "forward", made.__defaults__, made.__closure__
    )
    forward.__kwdefaults__ = made.__kwdefaults__
    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    try:
        yield trace
    finally:
        model.__class__ = cls


def _output_as_traced(prepared: torch.fx.GraphModule, output_type: type | None) -> torch.fx.GraphModule:
    """Give the graph's output back the ``dict`` subclass the model returned (see :func:`traced_as_called`)."""
    output = next(node for node in reversed(prepared.graph.nodes) if node.op == "output")
    if output_type is None or output_type is dict or not issubclass(output_type, dict):
        return prepared
    if not isinstance(output.args[0], dict):  # (FX's immutable dict)
        return prepared
    with prepared.graph.inserting_before(output):
        rebuilt = prepared.graph.call_function(output_type, (), dict(output.args[0]))
    output.args = (rebuilt,)
    observed = prepared.meta.get("_observed_graph_module_attrs")  # what FX's conversion reads of each node
    if observed is not None:
        observed.node_name_to_scope[rebuilt.name] = ("", None)  # (as the forward's own code, outside any layer)
    prepared.recompile()
    return prepared


def prediction_graph(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``prepared`` as called to predict, where QAT traced it on a call with training-only inputs (labels):
    its graph without them (:func:`without_inputs`), sharing its layers and their trained state; else
    ``prepared`` itself."""
    training_only = prepared.meta.get(_TRAINING_ONLY)
    if not training_only:
        return prepared
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(prepared.graph, {}))
    view = torch.fx.GraphModule(prepared, graph)
    view.meta.update({key: value for key, value in prepared.meta.items() if key != _TRAINING_ONLY})
    without_inputs(view, training_only)
    observed = view.meta.get("_observed_graph_module_attrs")  # what FX's conversion reads of each node
    if observed is not None:
        kept = {node.name for node in view.graph.nodes}
        observed = copy.copy(observed)
        observed.node_name_to_qconfig = {k: v for k, v in observed.node_name_to_qconfig.items() if k in kept}
        observed.node_name_to_scope = {k: v for k, v in observed.node_name_to_scope.items() if k in kept}
        view.meta["_observed_graph_module_attrs"] = observed
    return view.train(prepared.training)


#: ``GraphModule.meta`` key: the inputs of the training call that the int8 model is not called with
_TRAINING_ONLY = "lightning_quant_training_only_inputs"


def _left_out(graph_module: torch.fx.GraphModule, call: ExampleInputs) -> tuple[str, ...]:
    """The graph's inputs that ``call`` does not pass."""
    placeholders = [str(node.target) for node in graph_module.graph.nodes if node.op == "placeholder"]
    return tuple(name for name in placeholders[len(call.args) :] if name not in call.kwargs)


def without_inputs(graph_module: torch.fx.GraphModule, names: Sequence[str]) -> torch.fx.GraphModule:
    """``graph_module`` as called without the inputs ``names``: the graph traced on the training call
    computes a loss from ``labels``; the model called without them computes everything but that. Every
    node computed from those inputs is removed; an output that held one is left out (a ``ModelOutput``'s
    ``loss``: ``None``, as the model without labels gives) or ``None`` (in a tuple). Returns it."""
    graph = graph_module.graph
    gone: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.target in names:
                gone.add(node)
        elif node.op == "output" or _builds_output(node):
            node.args = _leaving_out(node.args, gone)
            node.kwargs = _leaving_out(node.kwargs, gone)
        elif any(arg in gone for arg in node.all_input_nodes):
            gone.add(node)
    for node in reversed(graph.nodes):
        if node in gone:
            graph.erase_node(node)
    graph.lint()
    graph_module.delete_all_unused_submodules()  # a loss module's state is not the prediction model's
    graph_module.recompile()
    return graph_module


def _builds_output(node: torch.fx.Node) -> bool:
    """The node :func:`_output_as_traced` added: the ``dict`` subclass the model returns, built."""
    return node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, dict)


def _leaving_out(value: Any, gone: set[torch.fx.Node]) -> Any:
    """A node's arguments without the ``gone`` nodes: left out of a dict, ``None`` in a sequence."""
    if isinstance(value, torch.fx.Node):
        return None if value in gone else value
    if isinstance(value, dict):
        return {k: _leaving_out(v, gone) for k, v in value.items() if not (isinstance(v, torch.fx.Node) and v in gone)}
    if isinstance(value, (tuple, list)):
        return type(value)([_leaving_out(v, gone) for v in value])  # (FX's immutable list: a list)
    return value


def _check_prediction_graph(model: nn.Module, prepared: torch.fx.GraphModule, predicting: ExampleInputs) -> None:
    """The prediction graph of ``prepared`` (:func:`prediction_graph`: without its training-only inputs) must
    compute what ``model`` computes called without them (a forward that does something else when ``labels is
    None`` would differ): both are run in float on ``predicting``.

    Raises:
        ValueError: they differ, or the graph cannot run without those inputs.
    """
    training_only = list(prepared.meta[_TRAINING_ONLY])
    sliced = prediction_graph(prepared)
    try:
        # (model first: the layers it shares with prepared get their modes back last, as the model had them)
        with torch.no_grad(), _float_run(model), _float_run(prepared):
            expected = predicting(model)
            got = _PassingObservers(sliced).run(*_placeholder_values(sliced, predicting))
        wanted, computed = flat_tensors(expected), flat_tensors(got)
        same = len(wanted) == len(computed) and all(
            a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
            for a, b in zip(wanted, computed)
        )
    except Exception as err:  # any failure is the same answer: the graph is not the call
        same, why = False, f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    else:
        why = ""
    if not same:
        raise ValueError(
            f"the fx flow traced {type(model).__name__}.forward as the training step calls it, with "
            f"{training_only}, and that graph without them does not compute what the model computes "
            f"called without them{why}: "
            'a trace cannot follow `if labels is None`. Use flow="pt2e" (it captures the int8 model from its '
            "own call), or compute the loss in the step from the model's outputs"
        )


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


def _tracing_message(model: nn.Module, err: Exception, names: tuple, types: tuple) -> str | None:
    """What to say where FX could not trace ``model``; ``None`` where it traces (``err`` came after)."""
    tracer = _LocatingTracer(names, types)
    try:
        tracer.trace(model)
    except Exception:
        pass
    else:
        return None
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

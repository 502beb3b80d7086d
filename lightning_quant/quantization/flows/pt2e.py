"""The pt2e flow: ``torch.export`` the model, then torchao's ``prepare_pt2e``/``prepare_qat_pt2e``
and ``convert_pt2e`` with a backend quantizer.

- ``backend="x86"``: torchao's ``X86InductorQuantizer`` (uint8 activations, int8 per-channel
  weights); the converted model runs int8 kernels once ``torch.compile`` lowers it;
- ``backend="xnnpack"``: ExecuTorch's ``XNNPACKQuantizer`` (int8 symmetric weights); the
  converted model lowers to XNNPACK in an ExecuTorch program (``export="executorch"``).

The model is captured with a dynamic batch axis on every tensor input (and a dynamic sequence
axis on integer inputs), from a batch of at least two, so the prepared model takes any batch
size; a model whose code fixes the batch size is refused at prepare, before any training.

An exported graph ignores ``train()``/``eval()`` and torchao's switch rewrites dropout with a
different probability, so prepared and converted models are a :class:`Pt2eGraphModule` whose
``train(mode)`` rewrites the ``training`` arguments of the graph's dropout and batch-norm nodes
(batch norm stays in inference form while its statistics are frozen). Lightning's own calls
then work unchanged, and deep copies keep the mode.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from lightning_quant.quantization.config import Backend, Observer, Precision, QuantizationConfig
from lightning_quant.quantization.flows.spec import SPECS
from lightning_quant.quantization.flows.torch_ao import convert_with_trained_qparams, fake_quantize_in_float32
from lightning_quant.quantization.inputs import ExampleInputs, export_program, forward_signature, inference_inputs
from lightning_quant.quantization.layers import LayerRules, resolve_layers
from lightning_quant.quantization.options import Flow
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.integrity import check_pt2_archive, read_checked

log = logging.getLogger(__name__)

_aten = torch.ops.aten
#: nodes whose third argument is ``train``
_DROPOUTS = (
    _aten.dropout.default,
    _aten.feature_dropout.default,
    _aten.alpha_dropout.default,
    _aten.feature_alpha_dropout.default,
)
#: layers with weights that quantizers annotate
_COMPUTE = (
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.conv_transpose1d.default,
    _aten.conv_transpose2d.input,
    _aten.linear.default,
)
#: what pt2e layers may compute in
PT2E_PRECISIONS = (Precision.INT8, Precision.FLOAT)


class Pt2eExportError(RuntimeError):
    """``torch.export`` could not capture the model; the message names the construct and the remedies."""


def _quant_ops() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    decomposed = torch.ops.quantized_decomposed
    return (
        (decomposed.quantize_per_tensor.default, decomposed.quantize_per_tensor.tensor),
        (
            decomposed.dequantize_per_tensor.default,
            decomposed.dequantize_per_tensor.tensor,
            decomposed.dequantize_per_channel.default,
        ),
    )


class Pt2eGraphModule(torch.fx.GraphModule):
    """An exported (prepared or converted) graph that follows ``train()``/``eval()``."""

    #: where the flow keeps its state in ``meta`` (which deep copies keep)
    META = "lightning_quant"

    @property
    def bn_frozen(self) -> bool:
        return bool(self.meta.setdefault(self.META, {}).get("bn_frozen", False))

    def train(self, mode: bool = True) -> Pt2eGraphModule:
        nn.Module.train(self, mode)
        self._sync_graph()
        return self

    def eval(self) -> Pt2eGraphModule:
        return self.train(False)

    def set_bn_frozen(self, frozen: bool) -> None:
        self.meta.setdefault(self.META, {})["bn_frozen"] = frozen
        self._sync_graph()

    def _sync_graph(self) -> None:
        bn_training = self.training and not self.bn_frozen
        changed = False
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _DROPOUTS and len(node.args) > 2 and node.args[2] != self.training:
                node.args = (*node.args[:2], self.training, *node.args[3:])
                changed = True
            elif node.target is _aten.batch_norm.default and node.args[5] != bn_training:
                node.args = (*node.args[:5], bn_training, *node.args[6:])
                changed = True
            elif node.target is _aten.add_.Tensor and _counts_batches(node) and node.args[1] != int(bn_training):
                node.args = (node.args[0], int(bn_training))  # eager BN counts batches only while it updates
                changed = True
        if changed:
            self.recompile()

    def __deepcopy__(self, memo: dict[int, Any]) -> Pt2eGraphModule:
        copied = super().__deepcopy__(memo)
        assert isinstance(copied, Pt2eGraphModule)
        nn.Module.train(copied, self.training)
        return copied


#: pattern graphs torchao exported once in this process, by what determines them
_PATTERNS: dict[Any, torch.fx.GraphModule] = {}


def _pattern_key(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    """What a pattern graph depends on: the pattern's code and captured values, and the shapes and
    dtypes (not the values) of its example inputs. ``None`` when something is not hashable."""

    def shape(value: Any) -> Any:
        return ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

    try:
        cells = tuple(c.cell_contents for c in (pattern.__closure__ or ()))
        key = (
            pattern.__code__,
            cells,
            tuple(shape(x) for x in example_inputs),
            is_cuda,
            tuple(sorted((k, shape(v)) for k, v in kwargs.items())),
        )
        hash(key)
    except (AttributeError, TypeError, ValueError):
        return None
    return key


@contextlib.contextmanager
def _quicker_conv_bn_folding() -> Iterator[None]:
    """Make torchao's QAT conv-BN folding affordable, without changing what it computes.

    On every prepare and convert, torchao 0.18 exports ~100 small pattern graphs with
    ``torch.export`` (every conv type x bias x per-channel x BN-mode combination), about 25 s
    on a 2-core CPU, even for conv types the model does not have. Here, inside our calls only:
    pattern graphs are kept for the process (keyed by the pattern's code, captured values and
    input shapes; a copy is handed out each time), and the folding of a conv type absent from the
    graph is skipped. When torchao's private names differ (another release), nothing is changed.
    """
    try:
        from torchao.quantization.pt2e import qat_utils
    except ImportError:
        yield
        return
    export_pattern = getattr(qat_utils, "_get_aten_graph_module_for_pattern", None)
    fold_helper = getattr(qat_utils, "_fold_conv_bn_qat_helper", None)
    duplicate_dequantize = getattr(qat_utils, "_duplicate_dequantize_node", None)
    if export_pattern is None or fold_helper is None or duplicate_dequantize is None:
        yield
        return
    import torch.nn.functional as F

    conv_ops = {
        F.conv1d: _aten.conv1d.default,
        F.conv2d: _aten.conv2d.default,
        F.conv_transpose1d: _aten.conv_transpose1d.default,
        F.conv_transpose2d: _aten.conv_transpose2d.input,
    }

    def cached_pattern(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])

    def fold_present(m: torch.fx.GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> Any:
        op = conv_ops.get(conv_fn)
        if op is not None and not any(n.target is op for n in m.graph.nodes):
            m.graph.eliminate_dead_code()
            m.recompile()
            duplicate_dequantize(m)
            return m
        return fold_helper(m, conv_fn, example_inputs, is_cuda)

    qat_utils._get_aten_graph_module_for_pattern = cached_pattern
    qat_utils._fold_conv_bn_qat_helper = fold_present
    try:
        yield
    finally:
        qat_utils._get_aten_graph_module_for_pattern = export_pattern
        qat_utils._fold_conv_bn_qat_helper = fold_helper


def _counts_batches(node: torch.fx.Node) -> bool:
    """The in-place ``num_batches_tracked += 1`` export writes for each batch-norm layer."""
    target = node.args[0]
    return (
        isinstance(target, torch.fx.Node)
        and target.op == "get_attr"
        and str(target.target).endswith("num_batches_tracked")
    )


def _as_pt2e_module(graph_module: torch.fx.GraphModule, training: bool) -> Pt2eGraphModule:
    """Give ``graph_module`` the mode switching of :class:`Pt2eGraphModule`, in place."""
    for name in ("train", "eval"):  # torch.export's instance-level refusals
        graph_module.__dict__.pop(name, None)
    if not isinstance(graph_module, Pt2eGraphModule):
        # GraphModule gives each instance its own class (its code lives there): make it one of ours
        graph_module.__class__ = type("GraphModuleImpl", (Pt2eGraphModule,), {})
        graph_module.recompile()
    assert isinstance(graph_module, Pt2eGraphModule)
    return graph_module.train(training)


def capture(module: nn.Module, example: ExampleInputs) -> torch.fx.GraphModule:
    """``torch.export`` ``module`` (in its current mode) with a dynamic batch axis.

    A Hugging Face model that returns a key/value cache (``config.use_cache``, GPT-2's default) is
    captured without it (:func:`~lightning_quant.quantization.inputs.generation_cache_off`); the
    model's own setting is left as it was.

    Raises:
        Pt2eExportError: export failed, or the model's code fixes the batch size.
    """
    try:
        exported = export_program(module, example)
    except Exception as err:
        first = " ".join(str(err).split())[:600]
        raise Pt2eExportError(
            f"torch.export could not capture {type(module).__name__} for flow='pt2e': {type(err).__name__}: "
            f"{first}. To quantize this model, make that construct exportable, quantize a submodule that is "
            "(module=<submodule>), or use flow='torchao' (nothing is traced: the model keeps its own forward and "
            "its Linear layers become int8/int4; for transformers), flow='fx' or flow='eager'"
        ) from err
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    graph_module = exported.module()
    # export asserts the dtype the capture saw after each explicit cast (Llama's RMSNorm: .to(float32));
    # under autocast (precision="bf16-mixed") the values before it are bfloat16, and the cast handles that
    for node in [n for n in graph_module.graph.nodes if n.target is _aten._assert_tensor_metadata.default]:
        if not node.users:
            graph_module.graph.erase_node(node)
    graph_module.recompile()
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            value = node.meta["val"]
            if value.dim() > 0 and is_concrete_int(value.shape[0]):
                raise Pt2eExportError(
                    f"torch.export fixed the batch size of input {node.name!r} to {int(value.shape[0])}: the code "
                    "of the model depends on it (a reshape to a literal batch size, say). pt2e models must take "
                    "any batch size; use -1 or x.shape[0] there, or flow='fx'"
                )
    return graph_module


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """torchao logs warnings as it is first imported (CUDA/MX kernels it cannot load on a CPU build,
    no Triton, an Enum registration torch calls deprecated); none concern a user on CPU. Raised to
    ERROR for the first import only, and restored."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_pt2e() -> None:
    """Import torchao's pt2e (which registers the ``quantized_decomposed`` ops pt2e programs call)."""
    if "torchao.quantization.pt2e.quantize_pt2e" not in sys.modules:
        with _quiet_torchao_import(), known_torch_warnings_silenced():
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """Load a ``.pt2`` file the pt2e flow wrote, as a module that follows ``eval()``.

    Its quantize/dequantize ops are torchao's, so they are registered first (plain
    ``torch.export.load`` fails on them in a process that never imported torchao). Serve an x86
    program compiled: ``torch.compile(module)`` under ``torch._inductor.config.freezing=True``.

    The file is read once and checked before torch sees it: against its export set's manifest (SHA-256),
    its zip checksums, and for any part that would run code (pickled objects, compiled code): only data
    is loaded (:func:`~lightning_quant.utils.integrity.check_pt2_archive`).

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: the file is empty, truncated, damaged or differs from its manifest.
        UnsafeFileError: a part of the file would run code when loaded; nothing of it ran.
    """
    data = read_checked(path, ".pt2 program (torch.export.save)", zip_format=True)
    import_pt2e()  # torchao's ops, and its tensor classes registered as safe for the weights-only reader
    check_pt2_archive(data, path)
    with known_torch_warnings_silenced():
        module = torch.export.load(io.BytesIO(data)).module()
    module.meta[Pt2eGraphModule.META] = {"converted": True}
    return _as_pt2e_module(module, False)


def _observer_class(observer: Observer) -> Any:
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    return {
        Observer.MOVING_AVERAGE: MovingAverageMinMaxObserver,
        Observer.MINMAX: MinMaxObserver,
        Observer.HISTOGRAM: HistogramObserver,
    }[observer]


def _with_observer(spec: Any, observer: Observer, qat: bool) -> Any:
    """An activation spec whose range comes from ``observer`` (QAT: inside fake quantization)."""
    import dataclasses

    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize

    if spec is None or getattr(spec, "is_dynamic", False):
        return spec
    cls = _observer_class(observer)
    if qat:
        fake = FusedMovingAvgObsFakeQuantize if observer is Observer.MOVING_AVERAGE else FakeQuantize
        ctr = fake.with_args(observer=cls)
    else:
        ctr = cls.with_args(eps=2**-12)
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)


def _per_tensor_weights(spec: Any, qat: bool) -> Any:
    import dataclasses

    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import MinMaxObserver, MovingAverageMinMaxObserver

    ctr = (
        FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver)
        if qat
        else MinMaxObserver.with_args(eps=2**-12)
    )
    return dataclasses.replace(spec, qscheme=torch.per_tensor_symmetric, ch_axis=None, observer_or_fake_quant_ctr=ctr)


def _quantization_config(backend: Backend, observer: Observer, per_channel: bool, qat: bool) -> Any:
    """The torchao ``QuantizationConfig`` of one setting: the backend's recipe with our observer
    for activations and per-channel or per-tensor weights."""
    import dataclasses

    if backend is Backend.X86:
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            get_default_x86_inductor_quantization_config,
        )

        base = get_default_x86_inductor_quantization_config(is_qat=qat)
    else:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

        base = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    weight = base.weight
    if not per_channel and backend is Backend.X86:
        weight = _per_tensor_weights(weight, qat)
    return dataclasses.replace(
        base,
        input_activation=_with_observer(base.input_activation, observer, qat),
        output_activation=_with_observer(base.output_activation, observer, qat),
        weight=weight,
    )


def _quantizer(model: nn.Module, config: QuantizationConfig, rules: LayerRules, qat: bool) -> Any:
    """The backend quantizer with the global setting and one per layer rule."""
    assert isinstance(config.per_channel, bool)

    def setting_config(setting: Any) -> Any:
        if setting.precision is Precision.FLOAT:
            return None
        per_channel = bool(config.per_channel if setting.per_channel is None else setting.per_channel)
        return _quantization_config(config.backend, setting.observer or config.observer, per_channel, qat)

    quantizer: Any
    if config.backend is Backend.X86:
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

        quantizer = X86InductorQuantizer()
        by_name, by_type = quantizer.set_module_name_qconfig, quantizer.set_module_type_qconfig
    else:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

        quantizer = XNNPACKQuantizer()
        by_name, by_type = quantizer.set_module_name, quantizer.set_module_type
    quantizer.set_global(_quantization_config(config.backend, config.observer, config.per_channel, qat))
    for name, setting in rules.names.items():
        by_name(name, setting_config(setting))
    for cls, setting in rules.types:
        by_type(cls, setting_config(setting))
    return quantizer


_ARITHMETIC = (_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor)


def _quantizer_sources(graph: torch.fx.GraphModule) -> dict[str, tuple[str, str, str]]:
    """Each quantizer module of a prepared graph, by the node whose value it quantizes: that node's name, op
    and the module it was captured in."""
    classes = Pt2eFlow()._quantizer_classes()
    sources: dict[str, tuple[str, str, str]] = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or not isinstance(graph.get_submodule(str(node.target)), classes):
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node):
            stack = source.meta.get("nn_module_stack") or {}
            where = str(list(stack.values())[-1][0]) if stack else ""
            sources.setdefault(str(node.target), (source.name, str(source.target), where))
    return sources


def _state_names(
    training: torch.fx.GraphModule, prediction: torch.fx.GraphModule, call: ExampleInputs, inference: ExampleInputs
) -> dict[str, str]:
    """``{prediction graph state key: training graph state key}``. Parameters and buffers keep their module
    names in both captures; quantizers are numbered in the order a graph meets them, and the training
    graph may quantize more (around the loss), so each is matched by the node whose value it quantizes.

    Raises:
        Pt2eExportError: a tensor of the prediction graph has no counterpart of the same shape.
    """
    trained = {node: name for name, node in _quantizer_sources(training).items()}
    renamed = {name: trained.get(node) for name, node in _quantizer_sources(prediction).items()}
    training_state = training.state_dict()
    names: dict[str, str] = {}
    missing: list[str] = []
    for key, value in prediction.state_dict().items():
        module, _, rest = key.partition(".")
        source: str | None = key
        if module in renamed:
            source = f"{renamed[module]}.{rest}" if renamed[module] is not None else None
        counterpart = training_state.get(source) if source is not None else None
        if source is None or counterpart is None or counterpart.shape != value.shape:
            missing.append(key)
        else:
            names[key] = source
    if missing:
        dropped = sorted(set(call.kwargs) - set(inference.kwargs))
        raise Pt2eExportError(
            f"flow='pt2e' captured the training call (with {dropped}) and the prediction call (without them) "
            f"as graphs whose state does not line up (e.g. {missing[:3]}), so the trained ranges could not be "
            "carried to the int8 model; compute the loss in training_step from the model's logits (call it "
            "without labels), or use flow='torchao', which keeps the model's own forward"
        )
    return names


def _restore_integer_constants(graph_module: torch.fx.GraphModule) -> int:
    """Give back their integer dtype to scalars a quantizer turned into float constants in integer
    arithmetic. XNNPACKQuantizer's annotation pass makes every scalar operand of add/sub/mul a float32
    tensor, integer index arithmetic included (a Hugging Face model's position offset): the indices
    then come out float and the graph fails. A constant whose values are whole numbers, added to
    (or multiplied with) an integer tensor, becomes that integer dtype again. Returns how many."""
    restored = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in _ARITHMETIC or len(node.args) < 2:
            continue
        for constant, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if not (isinstance(constant, torch.fx.Node) and constant.op == "get_attr"):
                continue
            value = getattr(graph_module, str(constant.target), None)
            other_value = other.meta.get("val") if isinstance(other, torch.fx.Node) else None
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and isinstance(other_value, torch.Tensor)
                and not other_value.is_floating_point()
                and other_value.dtype is not torch.bool
                and bool((value == value.round()).all())
            ):
                setattr(graph_module, str(constant.target), value.to(other_value.dtype))
                restored += 1
    return restored


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Remove the float weights that conversion replaced by int8 constants but left registered, so
    the int8 model's size, state dict and exported files hold only what it computes with."""
    used = {str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"}
    names = [name for name, _ in graph_module.named_parameters()] + [name for name, _ in graph_module.named_buffers()]
    for name in names:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    graph_module.delete_all_unused_submodules()


def _layer_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0]) or None


def _is_quant_point(node: torch.fx.Node) -> bool:
    """An activation observer or fake quantizer (prepared) or an activation quantize node (converted)."""
    if node.op == "call_module":
        return str(node.target).startswith("activation_post_process_")
    quantize, _ = _quant_ops()
    return node.op == "call_function" and node.target in quantize


def _layer_end(node: torch.fx.Node) -> torch.fx.Node:
    """Where a compute layer's output is taken: follow single-user nodes (bias, batch norm, ReLU,
    reshapes) until the next quantization point, compute layer, or branch."""
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        if user.op != "call_function" or _is_quant_point(user) or user.target in _COMPUTE:
            break
        if user.target is operator.getitem:
            break
        current = user
    return current


class _Recorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, wanted: dict[torch.fx.Node, tuple[str, str]]) -> None:
        super().__init__(module)
        self.wanted = wanted
        self.values: dict[tuple[str, str], Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        key = self.wanted.get(n)
        if key is not None:
            self.values.setdefault(key, value)
        return value


class Pt2eFlow:
    """Quantize through ``torch.export`` and torchao's pt2e (see the module docstring)."""

    stack = "torchao.quantization.pt2e"
    spec = SPECS[Flow.PT2E]

    def check(self, config: QuantizationConfig) -> None:
        """Raises ``ValueError`` on per-layer settings pt2e cannot honour."""
        for key, setting in config.layers:
            if setting.precision not in PT2E_PRECISIONS:
                raise ValueError(
                    f"layers[{key!r}] asks for {setting.precision.value!r}, which flow='pt2e' cannot run; "
                    f"its precisions are {[p.value for p in PT2E_PRECISIONS]}"
                )
            if setting.dtype is not None:
                raise ValueError(
                    f"layers[{key!r}] sets dtype={setting.dtype!r}: with flow='pt2e' the backend quantizer picks "
                    "the dtypes (x86: uint8 activations; xnnpack: int8); leave dtype out"
                )

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        self.check(config)
        import_pt2e()
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

        _linear_for_conv1d(model)
        quantizer = (
            config.recipe
            if config.recipe is not None
            else _quantizer(model, config, resolve_layers(model, config), qat)
        )
        model.train(qat)
        inference = inference_inputs(forward_signature(model), example)
        if not qat:  # a post-training model is captured as it is called for a prediction
            example = inference

        def prepared_graph(call: ExampleInputs) -> torch.fx.GraphModule:
            graph_module = capture(model, call)
            with known_torch_warnings_silenced(), _quicker_conv_bn_folding():
                graph = (prepare_qat_pt2e if qat else prepare_pt2e)(graph_module, quantizer)
            _restore_integer_constants(graph)
            fake_quantize_in_float32(graph, self._quantizer_classes()[0])
            return graph

        prepared = prepared_graph(example)
        prepared.meta[Pt2eGraphModule.META] = {"backend": config.backend.value}
        prepared = _as_pt2e_module(prepared, qat)
        if inference is not example:
            # QAT trains the graph of the training call (labels in, loss out); the int8 model is the graph
            # of the prediction call, given the trained state at conversion (see inference_view)
            prediction = _as_pt2e_module(prepared_graph(inference), qat)
            names = _state_names(prepared, prediction, example, inference)
            prepared.meta[Pt2eGraphModule.META]["inference"] = (prediction, names)
        if qat and config.recipe is not None and not self.fake_quantizers(prepared):
            raise ValueError(
                f"recipe={type(quantizer).__name__}(...) put observers, not fake quantization, into the graph: QAT "
                "needs a quantizer configured for QAT, e.g. quantizer.set_global("
                "get_default_x86_inductor_quantization_config(is_qat=True))"
            )
        if not (self.fake_quantizers(prepared) or self.observers(prepared)):
            import torchao

            raise Pt2eExportError(
                f"the {type(quantizer).__name__} annotated no layer of {type(model).__name__}: nothing would be "
                f"quantized and the 'int8' model would be the float one. Either every layer is kept float "
                f"(skip/layers), or this torch ({torch.__version__}) and torchao ({torchao.__version__}) do not work "
                "together: lightning-quant's pt2e flow is tested with torch 2.13-2.15 and torchao 0.18"
            )
        return prepared

    def inference_view(self, prepared: nn.Module) -> nn.Module:
        """The graph of the prediction call with ``prepared``'s trained state, where QAT trained the graph of
        a call with training-only inputs (labels); else ``prepared`` itself."""
        meta: dict[str, Any] = (
            prepared.meta.get(Pt2eGraphModule.META, {}) if isinstance(prepared, Pt2eGraphModule) else {}
        )
        if "inference" not in meta:
            return prepared
        graph, names = meta["inference"]
        view = copy.deepcopy(graph)
        state = prepared.state_dict()
        view.load_state_dict({key: state[source] for key, source in names.items()})
        view.meta[Pt2eGraphModule.META] = {k: v for k, v in meta.items() if k != "inference"}
        first = next(iter(state.values()), None)
        return view.to(first.device if isinstance(first, torch.Tensor) else "cpu").train(prepared.training)

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        assert isinstance(prepared, Pt2eGraphModule), "the pt2e flow converts what it prepared"
        prepared = self.inference_view(prepared)
        assert isinstance(prepared, Pt2eGraphModule)
        prepared.eval()
        convert_with_trained_qparams(prepared, self._quantizer_classes()[0])
        with known_torch_warnings_silenced(), _quicker_conv_bn_folding():
            converted = convert_pt2e(prepared)
        for node in [n for n in converted.graph.nodes if n.op == "call_function" and n.target is _aten.add_.Tensor]:
            if _counts_batches(node) and not node.users:  # an int8 model counts no batches
                converted.graph.erase_node(node)
        converted.recompile()
        _drop_unused_tensors(converted)
        backend = prepared.meta.get(Pt2eGraphModule.META, {}).get("backend", Backend.X86.value)
        converted.meta[Pt2eGraphModule.META] = {"converted": True, "backend": backend}
        return _as_pt2e_module(converted, False)

    def owns(self, model: nn.Module) -> bool:
        return any(True for _ in _pt2e_modules(model))

    def served_by(self, model: nn.Module) -> str:
        """x86 programs: Inductor lowers their quantize/dequantize pairs to int8 kernels. xnnpack ones
        (int8 activations) run in ExecuTorch; Inductor's int8 lowering takes uint8 activations only.
        Uncompiled, either runs its quantize/dequantize pairs in float, slower than fp32."""
        state = model.meta.get(Pt2eGraphModule.META, {}) if isinstance(model, Pt2eGraphModule) else {}
        if not state.get("converted"):
            return "eager"
        return "compiled" if state.get("backend", Backend.X86.value) == Backend.X86.value else "executorch"

    def _quantizer_classes(self) -> tuple[type, type]:
        from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
        from torchao.quantization.pt2e.observer import ObserverBase

        return FakeQuantizeBase, ObserverBase

    def fake_quantizers(self, model: nn.Module) -> list[tuple[str, Any]]:
        fake, _ = self._quantizer_classes()
        return [(name, m) for name, m in model.named_modules() if isinstance(m, fake)]

    def observers(self, model: nn.Module) -> list[tuple[str, Any]]:
        _, observer = self._quantizer_classes()
        return [(name, m) for name, m in model.named_modules() if isinstance(m, observer)]

    def optional_observers(self, model: nn.Module) -> list[str]:
        return []  # every observer of a graph sits on a path the graph runs

    def is_histogram(self, observer: nn.Module) -> bool:
        from torchao.quantization.pt2e.observer import HistogramObserver

        return isinstance(observer, HistogramObserver)

    def set_bn_frozen(self, model: nn.Module, frozen: bool) -> None:
        """Batch-norm nodes of the graph use their running statistics and stop updating them."""
        for module in _pt2e_modules(model):
            module.set_bn_frozen(frozen)

    def int8_layers(self, model: nn.Module) -> dict[str, str]:
        """Every compute node (conv, linear) of a converted graph: ``int8`` when its input and weight
        come through dequantize nodes, else ``float``."""
        layers: dict[str, str] = {}
        for module in _pt2e_modules(model):
            if not module.meta.get(Pt2eGraphModule.META, {}).get("converted"):
                continue
            _, dequantize = _quant_ops()
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target in _COMPUTE:
                    name = _layer_name(node)
                    if name is None:
                        continue
                    inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
                    quantized = len(inputs) == 2 and all(
                        a.op == "call_function" and a.target in dequantize for a in inputs
                    )
                    layers[name] = "int8" if quantized else layers.get(name, "float")
        return layers

    def output_steps(self, model: nn.Module, output: Any = None) -> list[float]:
        quantize, _ = _quant_ops()
        steps = []
        for module in _pt2e_modules(model):
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target in quantize and isinstance(node.args[1], float):
                    steps.append(float(node.args[1]))
        return steps

    def boundaries(self, model: nn.Module) -> dict[str, Any]:
        """The converted graph's quantize and dequantize nodes and the aten ops between, before
        ``torch.compile`` lowers it: Inductor folds the pairs around an int8 conv/linear and the ops
        fused into its output (an activation, a pooling or add that goes straight to quantize) into
        int8 kernels, so those are not counted as float; an op between a dequantize and a float
        consumer stays a pass in float."""
        from lightning_quant.quantization.flows.common import graph_boundaries

        quantize, dequantize = _quant_ops()

        def lowered(node: torch.fx.Node) -> bool:
            if node.target in _COMPUTE:
                return True
            return bool(node.users) and all(u.op == "call_function" and u.target in quantize for u in node.users)

        totals: dict[str, Any] = {}
        for module in _pt2e_modules(model):
            if not module.meta.get(Pt2eGraphModule.META, {}).get("converted"):
                continue
            found = graph_boundaries(
                module.graph,
                lambda node: node.op == "call_function" and node.target in quantize,
                lambda node: node.op == "call_function" and node.target in dequantize,
                lambda node: str(getattr(node.target, "__name__", node.target)).split(".")[0],
                lowered,
            )
            totals["quantize"] = totals.get("quantize", 0) + found["quantize"]
            totals["dequantize"] = totals.get("dequantize", 0) + found["dequantize"]
            float_ops = totals.setdefault("float_ops", {})
            for kind, count in found["float_ops"].items():
                float_ops[kind] = float_ops.get(kind, 0) + count
        return totals

    def layer_outputs(self, model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
        """``(input, output)`` of each named layer: the value entering its compute node, and the value
        at its end (after bias, batch norm and activation, where the next quantization happens)."""
        assert isinstance(model, Pt2eGraphModule)
        wanted: dict[torch.fx.Node, tuple[str, str]] = {}
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in _COMPUTE:
                name = _layer_name(node)
                if name in names and (name, "out") not in wanted.values():
                    source = node.args[0]
                    if isinstance(source, torch.fx.Node):
                        wanted.setdefault(source, (name, "in"))
                    wanted[_layer_end(node)] = (name, "out")
        recorder = _Recorder(model, wanted)
        recorder.run(*_flat_inputs(model, inputs))
        result = {}
        for name in names:
            if (name, "out") in recorder.values:
                result[name] = ((recorder.values.get((name, "in")),), recorder.values[(name, "out")])
        return result


def _linear_for_conv1d(model: nn.Module) -> None:
    """Swap Hugging Face's ``Conv1D`` layers (GPT-2's attention and MLP: ``addmm`` with an
    ``(in, out)`` weight, which no quantizer annotates) for the ``nn.Linear`` they compute, in place,
    under the same names; the weight is stored transposed, the bias is the same parameter."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not type(module).__module__.startswith("transformers."):
            continue
        weight = module.weight
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)


def _flat_inputs(model: torch.fx.GraphModule, inputs: ExampleInputs) -> list[Any]:
    """The graph's placeholder values, in order, from positional and keyword inputs."""
    in_spec = getattr(model, "_in_spec", None)
    if in_spec is None:
        return [*inputs.args, *inputs.kwargs.values()]
    import torch.fx._pytree as fx_pytree

    return list(fx_pytree.tree_flatten_spec((inputs.args, inputs.kwargs), in_spec))


def _pt2e_modules(model: nn.Module) -> Iterator[Pt2eGraphModule]:
    for module in model.modules():
        if isinstance(module, Pt2eGraphModule):
            yield module

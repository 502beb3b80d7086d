"""The pt2e flow's graph: ``torch.export`` capture, and the exported module that follows ``train()``/``eval()``.

An exported graph ignores ``train()``/``eval()`` and torchao's switch rewrites dropout with a
different probability, so prepared and converted models are a :class:`Pt2eGraphModule` whose
``train(mode)`` rewrites the ``training`` arguments of the graph's dropout and batch-norm nodes
(batch norm stays in inference form while its statistics are frozen). Lightning's own calls
then work unchanged, and deep copies keep the mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from lightning_quant.quantization.inputs import ExampleInputs, export_program

_aten = torch.ops.aten
#: nodes whose third argument is ``train``
DROPOUTS = (
    _aten.dropout.default,
    _aten.feature_dropout.default,
    _aten.alpha_dropout.default,
    _aten.feature_alpha_dropout.default,
)


#: layers with weights that quantizers annotate
COMPUTE = (
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.conv_transpose1d.default,
    _aten.conv_transpose2d.input,
    _aten.linear.default,
)

#: lookups whose weight the x86 quantizer stores in int8 rows (weight-only: their input is indices)
LOOKUPS = (_aten.embedding.default,)


class Pt2eExportError(RuntimeError):
    """``torch.export`` could not capture the model; the message names the construct and the remedies."""


def quant_ops() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
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
            if node.target in DROPOUTS and len(node.args) > 2 and node.args[2] != self.training:
                node.args = (*node.args[:2], self.training, *node.args[3:])
                changed = True
            elif node.target is _aten.batch_norm.default and node.args[5] != bn_training:
                node.args = (*node.args[:5], bn_training, *node.args[6:])
                changed = True
            elif node.target is _aten.add_.Tensor and counts_batches(node) and node.args[1] != int(bn_training):
                node.args = (node.args[0], int(bn_training))  # eager BN counts batches only while it updates
                changed = True
        if changed:
            self.recompile()

    def __deepcopy__(self, memo: dict[int, Any]) -> Pt2eGraphModule:
        copied = super().__deepcopy__(memo)
        assert isinstance(copied, Pt2eGraphModule)
        nn.Module.train(copied, self.training)
        return copied


def counts_batches(node: torch.fx.Node) -> bool:
    """The in-place ``num_batches_tracked += 1`` export writes for each batch-norm layer."""
    target = node.args[0]
    return (
        isinstance(target, torch.fx.Node)
        and target.op == "get_attr"
        and str(target.target).endswith("num_batches_tracked")
    )


def as_pt2e_module(graph_module: torch.fx.GraphModule, training: bool) -> Pt2eGraphModule:
    """Give ``graph_module`` the mode switching of :class:`Pt2eGraphModule`, in place."""
    for name in ("train", "eval"):  # torch.export's instance-level refusals
        graph_module.__dict__.pop(name, None)
    if not isinstance(graph_module, Pt2eGraphModule):
        # GraphModule gives each instance its own class (its code lives there): make it one of ours
        graph_module.__class__ = type("GraphModuleImpl", (Pt2eGraphModule,), {})
        graph_module.recompile()
    assert isinstance(graph_module, Pt2eGraphModule)
    return graph_module.train(training)


def pt2e_modules(model: nn.Module) -> Iterator[Pt2eGraphModule]:
    for module in model.modules():
        if isinstance(module, Pt2eGraphModule):
            yield module


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
    # computations whose result nothing uses (a Hugging Face encoder's pooler, when the caller takes the hidden
    # states): a quantizer's pattern ending in one has no output, and torchao's X86InductorQuantizer failed on
    # MiniLM's pooler Linear-Tanh with an IndexError; they cost time in the int8 model too. Mutations stay.
    graph_module.graph.eliminate_dead_code()
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


def flat_inputs(model: torch.fx.GraphModule, inputs: ExampleInputs) -> list[Any]:
    """The graph's placeholder values, in order, from positional and keyword inputs."""
    in_spec = getattr(model, "_in_spec", None)
    if in_spec is None:
        return [*inputs.args, *inputs.kwargs.values()]
    import torch.fx._pytree as fx_pytree

    return list(fx_pytree.tree_flatten_spec((inputs.args, inputs.kwargs), in_spec))


def linear_for_conv1d(model: nn.Module) -> None:
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

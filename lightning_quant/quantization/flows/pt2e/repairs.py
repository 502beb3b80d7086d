"""Repairs of pt2e graphs: what a quantizer or conversion leaves wrong, and the state carried between two captures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from lightning_quant.quantization.flows.pt2e.graph import Pt2eExportError
from lightning_quant.quantization.flows.pt2e.quantizers import quantizer_classes
from lightning_quant.quantization.inputs import ExampleInputs

_aten = torch.ops.aten
_ARITHMETIC = (_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor)


def quantizer_sources(graph: torch.fx.GraphModule) -> dict[str, tuple[str, str, str]]:
    """Each quantizer module of a prepared graph, by the node whose value it quantizes: that node's name, op
    and the module it was captured in."""
    classes = quantizer_classes()
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


def state_names(
    training: torch.fx.GraphModule, prediction: torch.fx.GraphModule, call: ExampleInputs, inference: ExampleInputs
) -> dict[str, str]:
    """``{prediction graph state key: training graph state key}``. Parameters and buffers keep their module
    names in both captures; quantizers are numbered in the order a graph meets them, and the training
    graph may quantize more (around the loss), so each is matched by the node whose value it quantizes.

    Raises:
        Pt2eExportError: a tensor of the prediction graph has no counterpart of the same shape.
    """
    trained = {node: name for name, node in quantizer_sources(training).items()}
    renamed = {name: trained.get(node) for name, node in quantizer_sources(prediction).items()}
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


def restore_integer_constants(graph_module: torch.fx.GraphModule) -> int:
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


def drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Remove the float weights that conversion replaced by int8 constants but left registered, so
    the int8 model's size, state dict and exported files hold only what it computes with."""
    used = {str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"}
    names = [name for name, _ in graph_module.named_parameters()] + [name for name, _ in graph_module.named_buffers()]
    for name in names:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    graph_module.delete_all_unused_submodules()


def _call_site_names(graph_module: torch.fx.GraphModule, apart: bool) -> None:
    """Name each later call of a module by its call site in ``nn_module_stack`` (``apart``), or put the module's own
    name back. The stack's key of a second call is ``"...relu@1"``; its value holds the module's name, ``"relu"``."""
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or not any("@" in key for key in stack):
            continue
        named = {}
        for key, (fqn, cls) in stack.items():
            site = "@" + key.rsplit("@", 1)[1] if "@" in key else ""
            if apart and site and not str(fqn).endswith(site):
                fqn = f"{fqn}{site}"
            elif not apart and site and str(fqn).endswith(site):
                fqn = str(fqn)[: -len(site)]
            named[key] = (fqn, cls)
        node.meta["nn_module_stack"] = named


def prepare_with_call_sites_apart(
    prepare: Callable[[torch.fx.GraphModule, Any], torch.fx.GraphModule],
    graph_module: torch.fx.GraphModule,
    quantizer: Any,
) -> torch.fx.GraphModule:
    """``prepare(graph_module, quantizer)`` with each call of a module called more than once annotated on its own.

    In a graph ``torch.export`` captured (non-strict), torch's ``get_source_partitions`` groups the nodes of a module
    by the module's name, so every call of one module is one partition with one output per call. A module called
    twice is common: torchvision's ResNet ``BasicBlock`` calls its one ``relu`` after the first convolution and
    after the residual add. The X86InductorQuantizer's fused patterns (conv-add-ReLU, linear-ReLU) refuse such a
    partition ("Input partition has more than one output node", pytorch/ao#4478), so ResNet-18 could not be
    quantized for x86 at all. Each later call gets its call site's name while the quantizer annotates; the module's
    own name is put back on every node afterwards (layer names and per-layer precision read it).
    """
    _call_site_names(graph_module, apart=True)
    try:
        prepared = prepare(graph_module, quantizer)
    finally:
        _call_site_names(graph_module, apart=False)
    _call_site_names(prepared, apart=False)
    return prepared

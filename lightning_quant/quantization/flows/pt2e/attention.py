"""Attention's score product in int8 for ``backend="x86"``: the built-in quantizer's part beyond torchao's.

torchao's ``X86InductorQuantizer`` quantizes the inputs of Linear and convolution layers and leaves
``scaled_dot_product_attention`` in float. OpenVINO's int8 of a transformer (NNCF's) quantizes the two inputs of
attention's first matrix product, the query and the transposed key after each is scaled by the square root of
the softmax scale, to int8 with zero point 0, and runs each layer's attention as one int8 kernel. MiniLM's ONNX
file with its attention in float ran 1.03-1.06x slower than NNCF's int8 in OpenVINO on an AMD EPYC with VNNI
(``make bench``); with the product in int8 as below, as fast.

The x86 quantizer (:class:`~lightning_quant.quantization.flows.pt2e.x86.X86Quantizer`) takes one step more on each
side of torchao's annotation:

- before it, :func:`spell_out_attention` writes each ``scaled_dot_product_attention`` node as the ops it computes
  (the scaling of query and key, their product, the mask, softmax, dropout, the product with the values), the
  form torch's math kernel and torch.onnx's exporter use; a boolean mask becomes a bias of 0 or the dtype's
  lowest finite value, as torch.onnx writes it, so a query whose keys are all masked (a left-padded decoder's
  padding) averages the values where torch's kernel returns zeros, and never NaN. A mask that is true
  everywhere, as Hugging Face's models build when called without ``attention_mask`` (``arange(n) >= 0``), is
  left out: it changes nothing and costs a select per score. Nodes with ``is_causal`` or ``enable_gqa`` stay;
- after it, :func:`annotate_scores` annotates the two inputs of each score product it wrote as int8, symmetric per
  tensor, with the setting's observer, unless the quantizer already annotated that product (a layer rule keeps it
  float).

The spelled-out attention runs in float where torch compiles the program (Inductor has no int8 kernel for it),
measured no slower there than the fused kernel for MiniLM (0.88-1.0x its time).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

_aten = torch.ops.aten
_SDPA = _aten.scaled_dot_product_attention.default
_RESHAPES = (_aten.unsqueeze.default, _aten.expand.default, _aten.view.default, _aten.reshape.default)
#: what a spelled-out node keeps of the attention node's meta: where it was captured (layer rules, layer names)
_KEPT_META = ("nn_module_stack", "source_fn_stack", "stack_trace", "torch_fn")
#: the tag of a score product this module wrote, whose inputs it annotates
SCORES = "lightning_quant_attention_scores"


def _lowest_value(node: Any) -> int | None:
    """A lower bound of every element of ``node`` where it is an ``arange`` from a known start, shifted by integer
    constants and reshaped; else ``None``."""
    if isinstance(node, int) and not isinstance(node, bool):
        return node
    if not isinstance(node, torch.fx.Node):
        return None
    if node.target is _aten.arange.default:
        return 0
    if node.target is _aten.arange.start and isinstance(node.args[0], int):
        return node.args[0]
    if node.target in (_aten.add.Tensor, _aten.add.Scalar):
        low, shift = _lowest_value(node.args[0]), _lowest_value(node.args[1])
        return None if low is None or shift is None else low + shift
    if node.target in _RESHAPES:
        return _lowest_value(node.args[0])
    return None


def true_everywhere(mask: Any) -> bool:
    """Whether a boolean mask is true for any input: ``x >= c`` where every element of ``x`` is at least ``c``,
    reshaped (``arange(n) + 0 >= 0``: Hugging Face's mask of a call without ``attention_mask``)."""
    if not isinstance(mask, torch.fx.Node) or mask.op != "call_function":
        return False
    if mask.target in _RESHAPES:
        return true_everywhere(mask.args[0])
    if mask.target is _aten.ge.Scalar:
        low = _lowest_value(mask.args[0])
        return low is not None and isinstance(mask.args[1], (int, float)) and low >= mask.args[1]
    return False


class _Writer:
    """Adds nodes before one attention node, named after it, with its meta and their values under its fake mode."""

    def __init__(self, node: torch.fx.Node, fake: Any) -> None:
        self.node, self.fake = node, fake

    def __call__(self, target: Any, *inputs: Any, part: str) -> torch.fx.Node:
        new = self.node.graph.create_node("call_function", target, inputs, name=f"{self.node.name}_{part}")
        new.meta.update({k: v for k, v in self.node.meta.items() if k in _KEPT_META})
        values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in inputs]
        with self.fake:
            new.meta["val"] = target(*values)
        return new


def _spell_out(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    normalized = node.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
    if normalized is None:
        return False
    args = normalized.kwargs  # every argument by name, defaults included (the op's schema)
    if args["is_causal"] or args["enable_gqa"]:
        return False
    query, key, value, mask = args["query"], args["key"], args["value"], args["attn_mask"]
    queries = query.meta.get("val")
    fake = detect_fake_mode([queries]) if isinstance(queries, torch.Tensor) else None
    if fake is None or not isinstance(queries.shape[-1], int):
        return False  # no values to follow (not a torch.export graph), or a head size known only at run time
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(queries.shape[-1])
    root = math.sqrt(scale)
    add = _Writer(node, fake)
    with node.graph.inserting_before(node):
        keys = add(_aten.transpose.int, key, -2, -1, part="keys_t")
        scores = add(
            _aten.matmul.default,
            add(_aten.mul.Tensor, query, root, part="query_scaled"),
            add(_aten.mul.Tensor, keys, root, part="keys_scaled"),
            part="scores",
        )
        scores.meta[SCORES] = True
        dtype = scores.meta["val"].dtype
        boolean = mask is not None and mask.meta["val"].dtype == torch.bool
        if boolean and true_everywhere(mask):
            mask = None
        elif boolean:
            mask = add(_aten.where.Scalar, mask, 0.0, torch.finfo(dtype).min, part="bias")
            if mask.meta["val"].dtype != dtype:  # where's scalars give the default dtype
                mask = add(_aten.to.dtype, mask, dtype, part="bias_typed")
        if mask is not None:
            scores = add(_aten.add.Tensor, scores, mask, part="masked")
        weights = add(_aten.softmax.int, scores, -1, part="weights")
        if args["dropout_p"] > 0:
            weights = add(_aten.dropout.default, weights, float(args["dropout_p"]), True, part="dropped")
        out = add(_aten.matmul.default, weights, value, part="out")
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    return True


def spell_out_attention(graph_module: torch.fx.GraphModule) -> int:
    """Write each ``scaled_dot_product_attention`` node of ``graph_module`` as the ops it computes (see the module
    docstring), its score product tagged :data:`SCORES`; returns how many were written. New nodes are named after
    the attention node, so two captures of one model (QAT's training and prediction calls) name them alike."""
    graph = graph_module.graph
    written = sum(
        _spell_out(graph_module, n) for n in list(graph.nodes) if n.op == "call_function" and n.target is _SDPA
    )
    if written:
        graph.eliminate_dead_code()  # the computation of a mask that was true everywhere
        graph.lint()
        graph_module.recompile()
    return written


def annotate_scores(graph_module: torch.fx.GraphModule, spec: QuantizationSpec) -> None:
    """Annotate the two inputs of each score product :func:`spell_out_attention` wrote with ``spec`` (int8,
    symmetric per tensor), unless the quantizer already annotated that product (a layer rule keeps it float)."""
    for node in graph_module.graph.nodes:
        if not node.meta.get(SCORES) or Q_ANNOTATION_KEY in node.meta:
            continue
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map=dict.fromkeys(inputs, spec), _annotated=True
        )

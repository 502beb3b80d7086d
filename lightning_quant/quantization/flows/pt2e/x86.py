"""The built-in quantizer of ``backend="x86"``: torchao's ``X86InductorQuantizer`` and two parts beyond it.

- **attention's score product in int8** (:mod:`.attention`): the two inputs of each layer's first attention product,
  as OpenVINO's int8 of a transformer (NNCF's) quantizes them;
- **embeddings' rows in int8**: the weight of each ``nn.Embedding`` is stored as int8, symmetric with one scale per
  row (the lookup returns a row, so a row's scale is all that row's values share), and dequantized where it is
  read. torchao's quantizer leaves lookups float, and half of a small transformer's parameters are its word
  embeddings: all-MiniLM-L6-v2's ONNX file was 1.53x smaller than fp32 with them float, 3.96x with them int8,
  as fast in OpenVINO and as close to fp32 (mean cosine 0.991 both ways; ``make bench``). Per row whatever
  ``per_channel`` says, as the fx flow does: one scale for a whole table of words would be set by its largest
  value. A layer rule that keeps an embedding float (``layers={"embed": "float"}``, or on a module that holds
  it) keeps its weight float.

Where the program is compiled (``torch.compile``, an AOTInductor package), Inductor keeps the int8 table and reads
the rows a call looks up in one fused kernel: MiniLM's AOTInductor package went from 61.8 MB to 24.9 MB. A head
tied to the embeddings keeps its own int8 copy (:func:`_lookups_read_their_own_weight_node`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

from lightning_quant.quantization.flows.pt2e.attention import annotate_scores, spell_out_attention

_EMBEDDING = torch.ops.aten.embedding.default


def _lookups_read_their_own_weight_node(graph_module: torch.fx.GraphModule) -> None:
    """Give each lookup whose weight another node reads too (a head tied to the embeddings) its own ``get_attr``
    node of the same parameter. pt2e quantizes one node's value once for all the readers whose
    specs match, so a tied head and its lookup would read one int8 table, and Inductor packs a weight for its
    int8 linear kernel only when nothing else reads it: the compiled head became a float matmul over the whole
    table, dequantized at every call. Apart, the head's weight is packed for the int8 kernel and the lookup reads
    rows of its own copy (a second int8 table in the files: 2 bytes a parameter where float was 4)."""
    split = False
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not _EMBEDDING:
            continue
        weight = node.args[0]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or len(weight.users) < 2:
            continue
        with graph_module.graph.inserting_before(node):
            own = graph_module.graph.get_attr(str(weight.target))
        own.meta.update(weight.meta)
        node.replace_input_with(weight, own)
        split = True
    if split:
        graph_module.recompile()


class X86Quantizer(X86InductorQuantizer):
    """torchao's ``X86InductorQuantizer`` that also quantizes attention's score product and embeddings' rows to int8
    (module docstring).

    Args:
        observer_or_fake_quant_ctr: the observer (post-training) or fake quantizer (QAT) of the score product's two
            inputs; the dtype (int8), range and per-tensor symmetric scheme are set here.
        embeddings: each ``nn.Embedding`` of the model by module name, with the spec of its weight, or ``None`` where
            a layer rule keeps it float.
    """

    def __init__(self, observer_or_fake_quant_ctr: Any, embeddings: dict[str, QuantizationSpec | None]) -> None:
        super().__init__()
        self.scores_spec = QuantizationSpec(
            dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=False,
            observer_or_fake_quant_ctr=observer_or_fake_quant_ctr,
        )
        # the innermost module first: a module's lookup is matched by its own name, not an enclosing one
        self.embeddings = dict(sorted(embeddings.items(), key=lambda item: -item[0].count(".")))

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().transform_for_annotation(model)
        spell_out_attention(model)
        _lookups_read_their_own_weight_node(model)
        return model

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        super().annotate(model)  # first: a rule that keeps a layer float marks its products annotated
        annotate_scores(model, self.scores_spec)
        self._annotate_embeddings(model)
        return model

    def _annotate_embeddings(self, model: torch.fx.GraphModule) -> None:
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target is not _EMBEDDING or Q_ANNOTATION_KEY in node.meta:
                continue
            weight = node.args[0]
            name = next((n for n in self.embeddings if get_module_name_filter(n)(node)), None)
            spec = self.embeddings.get(name) if name is not None else None
            if spec is None or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
                continue  # kept float by a rule, not an nn.Embedding's lookup, or a weight computed in the graph
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={weight: spec}, _annotated=True)

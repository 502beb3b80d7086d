from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_quant.quantization import flows
from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.pt2e import capture
from lightning_quant.quantization.flows.pt2e.graph import quant_ops
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.outputs import mean_cosine
from tests.helpers import BertEmbedder

pytest.importorskip("torchao")
from lightning_quant.quantization.flows.pt2e.attention import SCORES, spell_out_attention, true_everywhere  # noqa: E402

_aten = torch.ops.aten
_SDPA = _aten.scaled_dot_product_attention.default


class Attention(nn.Module):
    """Two heads of self-attention over ``x`` with the mask a caller passes (``mask``: boolean or additive)."""

    def __init__(self, scale: float | None = None, causal: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.scale, self.causal = scale, causal

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, is_causal=self.causal)


def _count(graph_module: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in graph_module.graph.nodes if n.op == "call_function" and n.target is target)


def _padding(lengths: list[int], size: int) -> torch.Tensor:
    keep = torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]
    return keep[:, None, None, :].expand(-1, 1, size, size)


@pytest.mark.parametrize(
    ("scale", "mask"),
    [
        (None, None),
        (0.3, None),
        (None, _padding([5, 3, 2], 5)),
        (None, torch.randn(3, 1, 5, 5)),
    ],
    ids=["no-mask", "scale", "padding", "additive"],
)
def test_spelled_out_attention_computes_what_the_attention_node_computed(scale, mask):
    torch.manual_seed(0)
    model = Attention(scale).eval()
    x = torch.randn(3, 5, 8)
    call = ExampleInputs((x,), {"mask": mask} if mask is not None else {})
    graph_module = capture(model, call)
    assert spell_out_attention(graph_module) == 1
    assert _count(graph_module, _SDPA) == 0
    scores = [n for n in graph_module.graph.nodes if n.meta.get(SCORES)]
    assert len(scores) == 1 and scores[0].target is _aten.matmul.default
    with torch.no_grad():
        expected = model(x, mask)
        torch.testing.assert_close(graph_module(*call.args, **call.kwargs), expected, rtol=1e-5, atol=1e-5)
        # the dynamic batch axis survives: another batch size through the same graph
        other = torch.randn(6, 5, 8)
        other_mask = None if mask is None else torch.cat([mask, mask])
        torch.testing.assert_close(
            graph_module(other, **({"mask": other_mask} if mask is not None else {})),
            model(other, other_mask),
            rtol=1e-5,
            atol=1e-5,
        )


def test_a_query_whose_keys_are_all_masked_averages_the_values_instead_of_nan():
    """A boolean mask becomes a bias of 0 or the lowest float (as torch.onnx writes it): a query row with every key
    masked gets equal weights on every value, never NaN; every other row is the attention node's."""
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 4, 8)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = False  # the second query of the first sequence sees no key
    graph_module = capture(model, ExampleInputs((x,), {"mask": mask}))
    spell_out_attention(graph_module)
    with torch.no_grad():
        out = graph_module(x, mask=mask)
        expected = model(x, mask)
        _, _, v = model.qkv(x).view(2, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 1], v[0].mean(1), rtol=1e-5, atol=1e-5)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    torch.testing.assert_close(out.transpose(1, 2)[keep], expected.transpose(1, 2)[keep], rtol=1e-5, atol=1e-5)


def test_causal_attention_is_left_as_it_is():
    model = Attention(causal=True).eval()
    graph_module = capture(model, ExampleInputs((torch.randn(2, 4, 8),)))
    assert spell_out_attention(graph_module) == 0
    assert _count(graph_module, _SDPA) == 1


def test_a_mask_true_everywhere_is_recognised_and_others_are_not():
    class Masks(nn.Module):
        def forward(self, x):
            n = x.shape[1]
            positions = torch.arange(n) + 0
            shifted = torch.arange(-1, n)
            return (
                (positions[None, :] >= 0).expand(x.shape[0], -1),  # Hugging Face's mask without attention_mask
                positions >= 1,  # the first position is False
                shifted >= 0,  # starts below 0
                x >= 0,  # depends on the data
            )

    graph_module = capture(Masks(), ExampleInputs((torch.randn(2, 4),)))
    (output,) = [n for n in graph_module.graph.nodes if n.op == "output"]
    assert [true_everywhere(node) for node in output.args[0]] == [True, False, False, False]


def _embedder() -> BertEmbedder:
    torch.manual_seed(0)
    return BertEmbedder().eval()


def _score_inputs(graph_module: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    """The nodes feeding each product of query and key (the products whose second input is a scaled transpose)."""
    products = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is _aten.matmul.default]
    return [list(n.args) for n in products if n.name.endswith("_scores")]


@pytest.mark.parametrize("masked", [False, True], ids=["without-attention-mask", "padding-mask"])
def test_x86_int8_model_computes_attention_scores_from_int8_query_and_key(masked):
    """The built-in x86 quantizer quantizes both inputs of every score product to int8 with zero point 0 (as
    OpenVINO's int8 attention takes them); the int8 model stays close to float, with and without padding."""
    from lightning_quant import Pt2eRecipe, quantize

    model = _embedder()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 9, 7, 12])

    def call(ids):  # a batch as keyword arguments, as a tokenizer's output
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask} if masked else {"input_ids": ids}

    batches = [call(torch.randint(0, 64, (4, 12), generator=g)) for _ in range(4)]
    int8 = quantize(model, batches, Pt2eRecipe("x86"), progress=False)
    quantize_ops, dequantize_ops = quant_ops()
    products = _score_inputs(int8)
    assert len(products) == 2  # one per layer
    for inputs in products:
        for node in inputs:
            assert node.target in dequantize_ops
            _, scale, zero_point, low, high, dtype = node.args[:6]
            assert (zero_point, low, high, dtype) == (0, -128, 127, torch.int8) and scale > 0
    # the mask of a call without attention_mask is true everywhere: nothing selects scores
    if not masked:
        assert _count(int8, _aten.where.Scalar) == 0 and _count(int8, _aten.ge.Scalar) == 0
    held_out = call(torch.randint(0, 64, (4, 12), generator=g))
    with torch.no_grad():
        assert mean_cosine(int8(**held_out), model(**held_out)) > 0.98


def test_a_layer_kept_float_keeps_its_attention_float():
    from lightning_quant import Pt2eRecipe, quantize

    model = _embedder()
    ids = [(torch.randint(0, 64, (4, 12)),) for _ in range(2)]
    int8 = quantize(model, ids, Pt2eRecipe("x86", skip=["bert.encoder.layer.0"]), progress=False)
    _, dequantize_ops = quant_ops()
    first, second = _score_inputs(int8)
    assert not any(node.target in dequantize_ops for node in first)
    assert all(node.target in dequantize_ops for node in second)
    assert flows.int8_layers(int8)["bert.encoder.layer.0.attention.self.query"] == "float"


def test_qat_trains_the_score_product_with_fake_quantization_and_attention_dropout():
    """QAT's training graph keeps attention's dropout (on while training, off in eval) and fake-quantizes the
    query and key of each score product."""
    model = _embedder().train()
    p = model.bert.config.attention_probs_dropout_prob
    assert p > 0
    ids = torch.randint(0, 64, (4, 12))
    prepared = get_flow("pt2e").prepare(model, QuantizationConfig(flow="pt2e"), ExampleInputs((ids,)), qat=True)
    dropouts = [n for n in prepared.graph.nodes if n.name.endswith("_dropped")]
    assert len(dropouts) == 2 and all(n.args[1] == p and n.args[2] is True for n in dropouts)
    for inputs in _score_inputs(prepared):
        for node in inputs:
            assert node.op == "call_module" and "FakeQuantize" in type(prepared.get_submodule(node.target)).__name__
    prepared.eval()
    assert all(n.args[2] is False for n in prepared.graph.nodes if n.name.endswith("_dropped"))
    with torch.no_grad():
        assert torch.equal(prepared(ids), prepared(ids))  # no dropout in eval

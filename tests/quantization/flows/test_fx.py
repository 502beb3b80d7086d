from __future__ import annotations

from math import sqrt

import pytest
import torch
import torch.nn as nn

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.convert import convert_copy, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.fx import FxTracingError
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import ModelOutputLike, ReturnsModelOutput, TinyNet


class AnnotatedNet(nn.Module):
    """Annotations are strings here (``from __future__ import annotations``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_fx_fuses_conv_bn_relu_and_converts_close_to_float():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        reference = model(x)
    prepared = get_flow("fx").prepare(model, QuantizationConfig(), ExampleInputs((x,)), qat=False)
    assert type(prepared.get_submodule("features.0")).__name__ == "ConvReLU2d"
    prepared(x)
    int8 = convert_copy(prepared, "fx", "x86")
    with quantized_engine("x86"), torch.no_grad():
        out = int8(x)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_fx_int8_scripts_with_string_annotations():
    x = torch.randn(8, 4)
    prepared = get_flow("fx").prepare(AnnotatedNet(), QuantizationConfig(), ExampleInputs((x,)), qat=False)
    prepared(x)
    int8 = convert_copy(prepared, "fx", "x86")
    with quantized_engine("x86"):
        scripted = torch.jit.script(int8)
        assert torch.equal(scripted(x), int8(x))


def test_fx_error_on_root_forward_suggests_pt2e_and_eager():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(
        FxTracingError, match=r"FX could not trace the forward of Root itself: .* use flow=\"pt2e\" .*, flow=\"eager\""
    ):
        get_flow("fx").prepare(Root(), QuantizationConfig(), ExampleInputs((torch.ones(1, 2),)), qat=False)


class _DropPath(nn.Module):
    """Stochastic depth as timm and torchvision write it: random in training, identity in eval."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


def test_fx_keeps_train_mode_dependent_modules_out_of_the_trace():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.drop = _DropPath()
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(x + self.drop(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    prepared = get_flow("fx").prepare(Net().train(), QuantizationConfig(), ExampleInputs((x,)), qat=True)
    assert any(n.op == "call_module" and n.target == "drop" for n in prepared.graph.nodes)
    prepared(x)
    int8 = convert_copy(prepared.eval(), "fx", "x86")
    with quantized_engine("x86"):
        assert torch.equal(int8(x), int8(x))  # traced in train mode, the drop would still be random here


class MaskedText(nn.Module):
    """Token ids, an optional attention mask cast in the forward (``mask.unsqueeze(-1).float()``), an
    embedding: a small text classifier as users write one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.lin = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.relu(self.lin(self.emb(input_ids)))
        if attention_mask is not None:
            mask = attention_mask.unsqueeze(-1).float()
            return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return self.head(hidden.mean(1))


def _text_batches(n: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (n, 12))
    mask = (torch.rand(n, 12) > 0.2).long()
    return ids, mask, ids[:, 0] % 3


def test_fx_int8_of_a_text_model_takes_its_integer_mask_and_embedding_as_they_are():
    ids, mask, y = _text_batches()
    model = MaskedText()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(150):
        rows = slice(step % 4 * 64, step % 4 * 64 + 64)
        loss = nn.functional.cross_entropy(model(ids[rows], mask[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    example = ExampleInputs((ids[:64],), {"attention_mask": mask[:64]})
    prepared = get_flow("fx").prepare(model, QuantizationConfig(), example, qat=False)
    observed = [node.args[0].name for node in prepared.graph.nodes if "activation_post_process" in node.name]
    assert "attention_mask" not in observed and "input_ids" not in observed and "unsqueeze" not in observed
    with torch.no_grad():
        for start in range(0, 256, 64):
            prepared(ids[start : start + 64], attention_mask=mask[start : start + 64])
    int8 = convert_copy(prepared, "fx", "x86")
    assert isinstance(int8.get_submodule("emb"), torch.ao.nn.quantized.Embedding)  # weight-only, per row
    with quantized_engine("x86"), torch.no_grad():
        reference, out = model(ids, mask), int8(ids, attention_mask=mask)
    assert (reference.argmax(1) == y).float().mean() > 0.45  # three classes: 0.33 by chance
    assert (out.argmax(1) == reference.argmax(1)).float().mean() > 0.95
    assert (out - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_fx_qat_fake_quantizes_the_embedding_per_row_and_not_the_mask():
    ids, mask, y = _text_batches(64)
    example = ExampleInputs((ids,), {"attention_mask": mask})
    prepared = get_flow("fx").prepare(MaskedText(), QuantizationConfig(), example, qat=True)
    assert prepared.get_submodule("emb").weight_fake_quant.qscheme == torch.per_channel_affine_float_qparams
    weight_range = prepared.get_submodule("lin").weight_fake_quant.activation_post_process
    assert torch.isinf(weight_range.min_val).all() and prepared.training  # preparing observed nothing
    loss = nn.functional.cross_entropy(prepared(ids, attention_mask=mask), y)
    loss.backward()
    assert prepared.get_submodule("emb").weight.grad.abs().sum() > 0


def test_fx_traces_the_branch_a_call_that_leaves_out_an_optional_input_takes():
    ids, mask, _ = _text_batches(8)
    model = MaskedText().eval()
    prepared = get_flow("fx").prepare(model, QuantizationConfig(), ExampleInputs((ids,)), qat=False)
    assert [n.target for n in prepared.graph.nodes if n.op == "placeholder"] == ["input_ids"]
    assert type(model) is MaskedText  # traced as called, then given back its own class
    with torch.no_grad():
        assert torch.allclose(prepared(ids), model(ids))  # (observers only: the float function)
    with pytest.raises(TypeError, match="attention_mask"):  # never silently ignored
        prepared(ids, attention_mask=mask)


def test_fx_gives_back_the_dict_subclass_the_model_returns():
    x = torch.randn(8, 4)
    prepared = get_flow("fx").prepare(ReturnsModelOutput(), QuantizationConfig(), ExampleInputs((x,)), qat=False)
    prepared(x)
    int8 = convert_copy(prepared, "fx", "x86")
    with quantized_engine("x86"), torch.no_grad():
        out = int8(x)
    assert type(out) is ModelOutputLike and out.logits.shape == (8, 2) and not out.logits.is_quantized


def test_fx_raises_torchs_own_error_where_the_model_traced_and_preparing_failed():
    """A QAT mapping that gives the embedding a static weight scheme: torch refuses it after tracing,
    and that is what is raised (not an error that says FX could not trace)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    ids, mask, _ = _text_batches(8)
    config = QuantizationConfig(qconfig_mapping=get_default_qat_qconfig_mapping("x86"))
    with pytest.raises(AssertionError, match="Embedding weights requires a qscheme"):
        get_flow("fx").prepare(MaskedText(), config, ExampleInputs((ids, mask)), qat=True)


class Scaled(nn.Module):
    """A keyword-only number input and ``math.sqrt`` of a shape, imported by name into the model's module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: float = 2.0) -> torch.Tensor:
        return self.fc(x) / sqrt(x.shape[-1]) * scale


def test_fx_takes_number_inputs_and_math_on_shapes_as_the_forward_writes_them():
    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(64, 4)
    prepared = get_flow("fx").prepare(model, QuantizationConfig(), ExampleInputs((x,)), qat=False)
    assert "math_sqrt" in prepared.code  # FX wrapped the model's own sqrt, as it does tracing the forward itself
    observed = [node.args[0].name for node in prepared.graph.nodes if "activation_post_process" in node.name]
    assert "scale" not in observed  # a number: torch's observers refuse it
    prepared(x)
    int8 = convert_copy(prepared, "fx", "x86")
    with quantized_engine("x86"), torch.no_grad():
        reference, out = model(x), int8(x)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


class LossOutput(dict):
    """A ``ModelOutput``-like output: ``loss`` only when labels are given."""


class WithLoss(nn.Module):
    """forward(x, labels=None): logits, and a loss from a loss module with a buffer when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0]))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> LossOutput:
        logits = self.head(torch.relu(self.fc(x)))
        if labels is None:
            return LossOutput(logits=logits)
        return LossOutput(loss=self.loss_fn(logits, labels), logits=logits)


@pytest.mark.parametrize("keep_float", [(), ("head",)])
def test_fx_qat_traced_with_labels_converts_to_the_model_called_without_them(keep_float):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    prepared = get_flow("fx").prepare(WithLoss(), QuantizationConfig(), ExampleInputs((x,), {"labels": y}), qat=True)
    loss = prepared(x, labels=y)["loss"]  # training: the loss is in the graph
    loss.backward()
    assert prepared.get_submodule("fc").weight.grad is not None
    int8 = convert_copy(prepared, "fx", "x86", keep_float)
    assert "loss_fn" not in dict(int8.named_modules())  # not the prediction model's: no state of it kept
    with quantized_engine("x86"), torch.no_grad():
        out = int8(x)
        with pytest.raises(TypeError, match="labels"):
            int8(x, labels=y)
    assert type(out) is LossOutput and set(out) == {"logits"}
    with torch.no_grad():
        reference = get_flow("fx").inference_view(prepared).eval()(x)["logits"]
    assert torch.nn.functional.cosine_similarity(out["logits"].flatten(), reference.flatten(), dim=0) > 0.99


class OtherwiseWithoutLabels(WithLoss):
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> LossOutput:
        logits = self.head(torch.relu(self.fc(x)))
        if labels is None:
            return LossOutput(logits=logits.softmax(-1))
        return LossOutput(loss=self.loss_fn(logits, labels), logits=logits)


def test_fx_refuses_a_trace_with_labels_that_is_not_the_model_called_without_them():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"traced OtherwiseWithoutLabels.forward.*\['labels'\].*does not compute"):
        get_flow("fx").prepare(
            OtherwiseWithoutLabels(), QuantizationConfig(), ExampleInputs((x,), {"labels": y}), qat=True
        )

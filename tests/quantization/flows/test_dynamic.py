import pytest
import torch
import torch.nn as nn

from lightning_quant import quantize
from lightning_quant.quantization.flows.dynamic import disable_transformer_fast_path


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, tokens):
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


def test_dynamic_quantizes_linear_gru_and_keeps_skipped_containers_float():
    model = Tagger().eval()
    int8 = quantize(model, mode="dynamic", skip=["head"])
    assert "dynamic" in type(int8.gru).__module__
    assert all(type(m) is nn.Linear for m in (int8.head[0], int8.head[2]))
    tokens = torch.randint(0, 30, (4, 9))
    with torch.no_grad():
        assert (int8(tokens) - model(tokens)).abs().max() < 0.05
    assert type(model.gru) is nn.GRU  # the float model is untouched


def test_dynamic_float16_and_per_channel():
    model = Tagger().eval()
    fp16 = quantize(model, mode="dynamic", dtype="float16")
    per_channel = quantize(model, mode="dynamic", per_channel=True)
    tokens = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        assert (fp16(tokens) - model(tokens)).abs().max() < 1e-2
        assert per_channel.head[0].weight().qscheme() == torch.per_channel_affine


def test_dynamic_transformer_encoder_runs_in_eval():
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
    ).eval()
    int8 = quantize(encoder, mode="dynamic")
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert (int8(x) - encoder(x)).abs().max() < 0.1
    assert disable_transformer_fast_path(int8) == 2


def test_dynamic_raises_when_nothing_to_quantize():
    with pytest.raises(
        ValueError,
        match=r"nothing to quantize dynamically: Sequential has no \['Linear', 'LSTM', 'GRU'\] "
        r"outside skip \(its module types: \['Conv2d', 'ReLU', 'Sequential'\]\); "
        r"use a static recipe \(FxRecipe, Pt2eRecipe\) for convolutional models",
    ):
        quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), recipe="dynamic")


class _PositionsNet(nn.Module):
    """Looks up position ids sliced from a buffer, as Hugging Face's BERT does: not contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 2)
        self.register_buffer("positions", torch.arange(16).expand(1, -1), persistent=False)

    def forward(self, x):
        ids = self.positions[:, : x.shape[1]].expand(x.shape[0], -1)
        return self.head(self.embed(ids) + x).mean(1)


def test_dynamic_int8_embedding_takes_indices_that_are_not_contiguous(tmp_path):
    from lightning_quant import load_int8, save_int8
    from lightning_quant.quantization.flows import int8_layers

    torch.manual_seed(0)
    model = _PositionsNet().eval()
    int8 = quantize(model, mode="dynamic", module_types=[nn.Embedding, nn.Linear])
    x = torch.randn(3, 5, 8)
    assert not model.positions[:, :5].expand(3, -1).is_contiguous()
    assert int8_layers(int8) == {"embed": "int8", "head": "int8"}
    with torch.no_grad():
        out = int8(x)
        assert torch.nn.functional.cosine_similarity(out.flatten(), model(x).flatten(), dim=0) > 0.999
        assert torch.equal(torch.jit.script(int8)(x), out)  # the int8 embedding stays scriptable
        assert torch.equal(load_int8(_PositionsNet(), save_int8(int8, tmp_path / "positions.pt"))(x), out)

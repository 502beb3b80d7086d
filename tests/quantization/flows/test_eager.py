import logging

import pytest
import torch
import torch.nn as nn
from torch.ao.nn.intrinsic.qat import ConvBnReLU2d as QATConvBnReLU2d

from lightning_quant import quantize
from lightning_quant.quantization import flows
from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.convert import convert_copy, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.eager import FloatIsland, QuantBoundary, find_fusable_groups
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import ModelOutputLike, ReturnsModelOutput, TinyNet, TwoInputNet


def test_find_fusable_groups_in_sequentials_only():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Conv2d(2, 2, 1),
        nn.ReLU(),
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
        nn.Linear(2, 2),
        nn.BatchNorm1d(2),
    )
    assert find_fusable_groups(model) == [["0", "1", "2"], ["3", "4"], ["6", "7"], ["5.0", "5.1"]]
    assert find_fusable_groups(TinyNet()) == [["features.0", "features.1", "features.2"]]


def test_eager_ptq_fuses_adds_stubs_and_converts_close_to_float():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        reference = model(x)
    prepared = get_flow("eager").prepare(model, QuantizationConfig(), ExampleInputs((x,)), qat=False)
    assert isinstance(prepared, QuantBoundary) and list(prepared.quant) == ["x"]
    prepared(x)
    int8 = convert_copy(prepared, "eager", "x86")
    with quantized_engine("x86"), torch.no_grad():
        out = int8(x)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_eager_skip_keeps_module_float_inside_an_island():
    model = TinyNet().eval()
    x = torch.randn(16, 1, 6, 6)
    prepared = get_flow("eager").prepare(model, QuantizationConfig(skip=["head"]), ExampleInputs((x,)), qat=False)
    assert isinstance(prepared.module.head, FloatIsland)
    prepared(x)
    int8 = convert_copy(prepared, "eager", "x86")
    assert type(int8.module.head.module) is nn.Linear
    with quantized_engine("x86"):
        assert int8(x).dtype == torch.float32


def test_eager_explicit_fusion_groups_and_keyword_inputs():
    model = TwoInputNet().train()
    x, e = torch.randn(8, 1, 6, 6), torch.randn(8, 3)
    config = QuantizationConfig(flow="eager", modules_to_fuse=[["features.0", "features.1", "features.2"]])
    prepared = get_flow("eager").prepare(model, config, ExampleInputs((x,), {"extra": e}), qat=True)
    assert type(prepared.module.features[0]) is QATConvBnReLU2d  # fused, then swapped for its QAT version
    assert sorted(prepared.quant) == ["extra", "x"]
    observer = prepared.quant["extra"].activation_post_process.activation_post_process  # the fake quant's observer
    prepared(x, extra=e)
    after_keyword = (float(observer.min_val), float(observer.max_val))
    prepared(x, e + 10)  # by position: the same stub sees it and moves its range up
    assert after_keyword == (pytest.approx(float(e.min())), pytest.approx(float(e.max())))
    assert float(observer.max_val) > after_keyword[1] and float(observer.min_val) > after_keyword[0]


# ---------------------------------------------------------------- eager-ready models, used as written
class _ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation shape: a Sequential of conv, BN, ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class _Block(nn.Module):
    """A block with a FloatFunctional residual it calls only when shapes allow (as torchvision's do)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = _ConvBNReLU(c_in, c_out)
        self.use_res = c_in == c_out
        self.skip_add = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x):
        return self.skip_add.add(x, self.conv(x)) if self.use_res else self.conv(x)


class QuantizableNet(nn.Module):
    """The shape of torchvision's quantizable models: its own stubs, FloatFunctional residuals, fuse_model()."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.features = nn.Sequential(_Block(1, 8), _Block(8, 8), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 4)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.head(torch.flatten(self.features(self.quant(x)), 1)))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        fuse = torch.ao.quantization.fuse_modules_qat if is_qat else torch.ao.quantization.fuse_modules
        for block in self.features[:2]:
            fuse(block.conv, ["0", "1", "2"], inplace=True)


def _calibrated_int8(model: nn.Module, qat: bool, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    prepared = get_flow("eager").prepare(model, QuantizationConfig(flow="eager"), ExampleInputs((x,)), qat=qat)
    prepared.eval()
    with torch.no_grad():
        for _ in range(4):
            prepared(x)
    return prepared, convert_copy(prepared, "eager", "x86")


@pytest.mark.parametrize("fused_by_user", [False, True])
@pytest.mark.parametrize("qat", [False, True])
def test_eager_uses_a_quantizable_model_as_written_fused_or_not(fused_by_user, qat, caplog):
    torch.manual_seed(0)
    model = QuantizableNet().train(qat)
    if fused_by_user:
        model.fuse_model(is_qat=qat)
    x = torch.randn(16, 1, 6, 6)
    prepared, int8 = _calibrated_int8(model, qat, x)
    assert prepared is model  # no second boundary around the model's own stubs
    # fused once, by the user or by the model's own fuse_model (conv/BN/ReLU of each block)
    fused = [type(block.conv[0]).__name__ for block in model.features[:2]]
    assert fused == ["ConvBnReLU2d" if qat else "ConvReLU2d"] * 2
    assert not any(isinstance(m, QuantBoundary) for m in int8.modules())
    with quantized_engine("x86"), torch.no_grad():
        out = int8(x)
        fake_or_observed = prepared(x)
    # block 0 has no residual: its adder never ran, and conversion went ahead (with a warning)
    assert "FloatFunctional observer(s) never saw data" in caplog.text and "features.0.skip_add" in caplog.text
    assert type(int8.features[1].skip_add).__name__ == "QFunctional"
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), fake_or_observed.flatten(), dim=0)
    assert cosine > 0.99


def test_eager_float_island_passes_token_ids_and_the_wrapped_attributes():
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 16)
            self.rnn = nn.GRU(16, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(self.proj(x))[0][:, -1])

    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(10, 4)

        def forward(self, ids, scale):
            return self.table(ids) * scale

    model = Tagger()
    config = QuantizationConfig(flow="eager", skip=["rnn"])
    prepared = get_flow("eager").prepare(model, config, ExampleInputs((torch.randn(2, 5, 4),)), qat=False)
    island = prepared.module.rnn
    assert isinstance(island, FloatIsland) and island.batch_first is True and island.hidden_size == 8
    # integer ids reach a float island as integers, before and after conversion
    wrapped = FloatIsland(WithTable())
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(wrapped(ids, torch.tensor(2.0)), WithTable.forward(wrapped.module, ids, 2.0))


def test_eager_keeps_the_output_type_of_a_model_output():
    x = torch.randn(8, 4)
    _, int8 = _calibrated_int8(ReturnsModelOutput(), False, x)
    with quantized_engine("x86"):
        out = int8(x)
    assert type(out) is ModelOutputLike and out.logits.shape == (8, 2) and not out.logits.is_quantized


def test_eager_refuses_a_model_with_only_integer_inputs_naming_what_works():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(
        ValueError,
        match=r"takes only integer inputs \(token ids\?\): nothing would be quantized. Use flow='fx' .*flow='pt2e'",
    ):
        get_flow("eager").prepare(
            model, QuantizationConfig(flow="eager"), ExampleInputs((torch.ones(2, 3).long(),)), False
        )


def test_eager_empty_fusion_groups_switch_auto_fusion_off():
    prepared = get_flow("eager").prepare(
        TinyNet(),
        QuantizationConfig(flow="eager", modules_to_fuse=[]),
        ExampleInputs((torch.randn(2, 1, 6, 6),)),
        False,
    )
    assert isinstance(prepared.module.features[1], nn.BatchNorm2d)  # not folded into the conv


def test_a_layer_without_an_int8_module_becomes_a_float_island_and_the_model_runs(caplog):
    """A BatchNorm1d after a Linear, not fused (fusion off here; QAT does not fuse the pair), has no
    int8 module: left as it was, the int8 model would hand it an int8 tensor at run time; it is kept
    float and logged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5), model[1].running_var.uniform_(0.5, 2.0)
    with caplog.at_level(logging.INFO, logger="lightning_quant.quantization.flows.eager"):
        config = QuantizationConfig(flow="eager", modules_to_fuse=[])
        int8 = quantize(model, [torch.randn(16, 6) for _ in range(4)], config=config, progress=False)
    assert "kept float, no int8 module for them in eager mode: ['1 (BatchNorm1d)']" in caplog.text
    assert flows.int8_layers(int8) == {"module.0": "int8", "module.1.module": "float", "module.3": "int8"}
    x = torch.randn(5, 6)
    with torch.no_grad(), quantized_engine("x86"):
        assert torch.nn.functional.cosine_similarity(int8(x).flatten(), model(x).flatten(), dim=0) > 0.99

import pytest
import torch
import torch.nn as nn
from torch.ao.nn.intrinsic.qat import ConvBnReLU2d as QATConvBnReLU2d

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.convert import convert_copy, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.eager import FloatIsland, QuantBoundary, find_fusable_groups
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import TinyNet, TwoInputNet


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

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.convert import convert_copy, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.fx import FxTracingError
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import TinyNet


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


def test_fx_error_on_root_forward_suggests_eager():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(FxTracingError, match=r"FX could not trace the forward of Root itself: .* use flow=\"eager\""):
        get_flow("fx").prepare(Root(), QuantizationConfig(), ExampleInputs((torch.ones(1, 2),)), qat=False)

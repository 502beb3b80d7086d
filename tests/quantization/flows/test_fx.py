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

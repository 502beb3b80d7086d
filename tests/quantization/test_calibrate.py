import pytest
import torch
import torch.nn as nn

from lightning_quant import NonFiniteError, quantize
from lightning_quant.quantization.calibrate import calibrate, calibrating
from tests.helpers import TinyNet


def test_calibrate_uses_at_most_num_batches_and_restores_mode():
    model = nn.Linear(3, 3).train()
    used = calibrate(model, [torch.randn(2, 3) for _ in range(5)], 3, progress=False)
    assert used == 3 and model.training


@pytest.mark.parametrize("flow", ["fx", "eager"])
def test_non_finite_layer_output_is_named(flow):
    model = TinyNet().eval()
    with torch.no_grad():
        model.features[0].weight.fill_(float("inf"))
    with pytest.raises(
        NonFiniteError,
        match=r"NaN or Inf reached the observers: first seen in the output of layer "
        r"'features.0' \(ConvReLU2d\) at calibration batch 0",
    ):
        quantize(model, [torch.randn(4, 1, 6, 6)], flow=flow, progress=False)


def test_non_finite_input_is_reported():
    bad = torch.randn(4, 1, 6, 6)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"calibration batch 1 holds NaN or Inf values in the model input"):
        quantize(TinyNet().eval(), [torch.randn(4, 1, 6, 6), bad], progress=False)


def test_calibrating_removes_hooks():
    model = TinyNet()
    with calibrating(model):
        pass
    assert all(not m._forward_hooks for m in model.modules())

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
)

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.fake_quantize import CpuFakeQuantize, CpuFusedFakeQuantize
from lightning_quant.quantization.flows.qconfig import build_qconfig_mapping
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import TinyNet

SCHEMES = {
    "uint8 0..127 (x86, fbgemm)": dict(dtype=torch.quint8, quant_min=0, quant_max=127, qscheme=torch.per_tensor_affine),
    "uint8 0..255 (qnnpack)": dict(dtype=torch.quint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine),
    "int8 symmetric (attention scores)": dict(
        dtype=torch.qint8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric
    ),
}


def _inputs(step: int) -> torch.Tensor:
    """Ranges that move, then values past the frozen range (clamped: zero gradient) and on the grid's halves."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 8, 5, 5, generator=generator) * (1 + step) + 0.3 * step
    if step >= 12:
        x[0, 0] = 1e3
        x[0, 1] = -1e3
    return x


def _assert_same_as(ours: torch.nn.Module, torchs: torch.nn.Module, steps: int = 20) -> int:
    """Runs both on the same inputs, freezing the observers at step 10; returns how many values were clamped."""
    clamped = 0
    for step in range(steps):
        if step == 10:
            ours.disable_observer()
            torchs.disable_observer()
        x = _inputs(step).requires_grad_()
        out = ours(x)
        grad_out = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        reference = torchs(x)
        (reference_grad,) = torch.autograd.grad(reference, x, grad_out)
        assert torch.equal(out, reference), step
        assert torch.equal(grad, reference_grad), step
        clamped += int((reference_grad == 0).sum())
        for key, value in torchs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), (step, key)
    return clamped


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_ao_quantizer_gives_torchs_outputs_gradients_and_ranges_bit_for_bit(scheme):
    kwargs = dict(observer=MovingAverageMinMaxObserver, **SCHEMES[scheme])
    ours, torchs = CpuFusedFakeQuantize(**kwargs), FusedMovingAvgObsFakeQuantize(**kwargs)
    assert set(ours.state_dict()) == set(torchs.state_dict())
    clamped = _assert_same_as(ours, torchs)
    assert clamped > 100  # the frozen range clamped the large values, and the gradients agreed there too
    assert float(ours.scale) > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pt2e_quantizer_gives_torchaos_outputs_gradients_and_ranges_bit_for_bit(scheme):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize as Pt2eFused
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver as Pt2eMovingAverage

    from lightning_quant.quantization.flows.pt2e.fake_quantize import CpuFusedFakeQuantizePt2e

    kwargs = dict(observer=Pt2eMovingAverage, **SCHEMES[scheme])
    assert _assert_same_as(CpuFusedFakeQuantizePt2e(**kwargs), Pt2eFused(**kwargs)) > 100


OTHER_OBSERVER_CASES = [  # (torch's histogram observer is per-tensor affine only)
    (scheme, observer)
    for scheme in SCHEMES
    for observer in ("minmax", "histogram")
    if observer == "minmax" or SCHEMES[scheme]["qscheme"] is torch.per_tensor_affine
]


@pytest.mark.parametrize(("scheme", "observer"), OTHER_OBSERVER_CASES)
def test_the_quantizer_of_the_other_observers_gives_torchs_outputs_gradients_and_ranges_bit_for_bit(scheme, observer):
    classes = {"minmax": MinMaxObserver, "histogram": HistogramObserver}
    kwargs = dict(observer=classes[observer], **SCHEMES[scheme])
    ours, torchs = CpuFakeQuantize(**kwargs), FakeQuantize(**kwargs)
    assert set(ours.state_dict()) == set(torchs.state_dict())
    assert _assert_same_as(ours, torchs) > 100
    assert float(ours.scale) > 0


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_pt2e_quantizer_of_the_other_observers_gives_torchaos_numbers_bit_for_bit(observer):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize as Pt2eFakeQuantize
    from torchao.quantization.pt2e.observer import HistogramObserver as Pt2eHistogram
    from torchao.quantization.pt2e.observer import MinMaxObserver as Pt2eMinMax

    from lightning_quant.quantization.flows.pt2e.fake_quantize import CpuFakeQuantizePt2e

    kwargs = dict(observer={"minmax": Pt2eMinMax, "histogram": Pt2eHistogram}[observer], **SCHEMES[next(iter(SCHEMES))])
    assert _assert_same_as(CpuFakeQuantizePt2e(**kwargs), Pt2eFakeQuantize(**kwargs)) > 100


def _operator_inputs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Size]:
    """The shapes torch's fused operator is called with (the vectorized path hands it two values)."""
    seen: list[torch.Size] = []
    operator = torch.fused_moving_avg_obs_fake_quant

    def recording(x, *args):
        seen.append(x.shape)
        return operator(x, *args)

    monkeypatch.setattr(torch, "fused_moving_avg_obs_fake_quant", recording)
    return seen


def test_the_vectorized_path_runs_for_float32_cpu_activations_and_torchs_operator_for_the_rest(monkeypatch):
    seen = _operator_inputs(monkeypatch)
    x = torch.randn(3, 4, 5)
    ours = CpuFusedFakeQuantize(quant_min=0, quant_max=127)
    ours(x)
    assert seen == [torch.Size([2])]

    seen.clear()
    with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
        ours(x.double())  # another dtype: torch's operator, and its own refusal
    ours.disable_fake_quant()
    ours(x)  # fake quantization off: torch's operator (it returns a copy of the input)
    assert seen == [x.shape, x.shape]

    seen.clear()
    weights = torch.randn(6, 3, 3, 3)
    per_channel = dict(
        observer=MovingAveragePerChannelMinMaxObserver,
        dtype=torch.qint8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
    )
    out = CpuFusedFakeQuantize(**per_channel)(weights)
    assert seen == [weights.shape]
    assert torch.equal(out, FusedMovingAvgObsFakeQuantize(**per_channel)(weights))


def test_fx_qat_trains_and_converts_the_same_model_as_with_torchs_quantizer():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    net = TinyNet()
    config = QuantizationConfig()
    ours = get_flow("fx").prepare(copy.deepcopy(net), config, ExampleInputs((x,)), qat=True)
    activations = [m for m in ours.modules() if isinstance(m, CpuFusedFakeQuantize)]
    assert len(activations) >= 3  # the input, Conv-BN-ReLU's output and the head's output
    mapping = build_qconfig_mapping(config, net, qat=True)
    ours_qconfig = mapping.global_qconfig
    mapping.set_global(
        QConfig(
            activation=FusedMovingAvgObsFakeQuantize.with_args(**ours_qconfig.activation.p.keywords),
            weight=ours_qconfig.weight,
        )
    )
    torchs = get_flow("fx").prepare(
        copy.deepcopy(net), QuantizationConfig(qconfig_mapping=mapping), ExampleInputs((x,)), qat=True
    )
    assert not any(isinstance(m, CpuFusedFakeQuantize) for m in torchs.modules())
    for model in (ours, torchs):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    reference = torchs.state_dict()
    assert reference.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference[key]), key
    ours.eval()
    torchs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), torchs(x))


def test_pt2e_qat_puts_the_vectorized_quantizer_on_activations():
    pytest.importorskip("torchao")
    from lightning_quant.quantization.flows.pt2e.fake_quantize import CpuFusedFakeQuantizePt2e

    x = torch.randn(8, 1, 6, 6)
    prepared = get_flow("pt2e").prepare(TinyNet(), QuantizationConfig(flow="pt2e"), ExampleInputs((x,)), qat=True)
    activations = [m for m in prepared.modules() if isinstance(m, CpuFusedFakeQuantizePt2e)]
    assert len(activations) >= 2
    prepared(x)
    assert all(float(m.scale) != 1.0 for m in activations)  # each observed a range

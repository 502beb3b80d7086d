"""Layer-level analysis agrees with independent computations and finds a broken layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lightning_quant.evaluation.analysis import next_steps, observer_ranges, per_layer_sqnr
from lightning_quant.quantization import ExampleInputs, QuantizationConfig, convert_copy, get_flow
from lightning_quant.quantization.outputs import sqnr_db
from lightning_quant.quantization.search import quantizable_layers
from tests.helpers import FLOWS


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(36, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.act(self.fc1(x.flatten(1))))))


def _prepared_and_int8(model, x, flow="fx", **options):
    config = QuantizationConfig(flow=flow, **options)
    prepared = get_flow(flow).prepare(copy.deepcopy(model).eval(), config, ExampleInputs((x,)), qat=False)
    prepared(x)
    return prepared, convert_copy(prepared, flow, "x86")


@pytest.mark.parametrize("flow", ["eager", *FLOWS])
def test_broken_layer_is_named_worst(flow):
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():  # fc1's unit 0 is dead after ReLU, so fc2's huge weight on it changes nothing in float,
        model.fc1.weight[0] = 0.0  # but a per-tensor int8 scale sized for it rounds every other weight of fc2 to 0
        model.fc1.bias[0] = -1.0
        model.fc2.weight[0, 0] = 1000 * model.fc2.weight.abs().max()
    x = torch.randn(64, 1, 6, 6)
    prepared, int8 = _prepared_and_int8(model, x, flow=flow, per_channel=False, observer="minmax")
    layers = per_layer_sqnr(prepared, int8, [x[:32], x[32:]], "x86")
    assert list(layers) == ["fc1", "fc2", "fc3"]
    worst = max(layers, key=lambda n: layers[n]["loss_db"])
    assert worst == "fc2"
    assert layers["fc2"]["sqnr_db"] < 5 < 25 < layers["fc1"]["sqnr_db"], layers
    assert layers["fc2"]["loss_db"] > 20 > max(layers["fc1"]["loss_db"], layers["fc3"]["loss_db"]), layers


def test_per_layer_output_sqnr_agrees_with_hooks_computed_here():
    torch.manual_seed(1)
    model = MLP().eval()
    x = torch.randn(32, 1, 6, 6)
    prepared, int8 = _prepared_and_int8(model, x)
    outputs = {}
    for tag, net in (("ref", prepared), ("int8", int8)):
        handle = dict(net.named_modules())["fc1"].register_forward_hook(
            lambda m, i, o, tag=tag: outputs.__setitem__(tag, o.dequantize() if o.is_quantized else o)
        )
        net(x)
        handle.remove()
    expected = sqnr_db(outputs["ref"].detach(), outputs["int8"])
    assert per_layer_sqnr(prepared, int8, [x], "x86")["fc1"]["sqnr_db"] == pytest.approx(expected, rel=1e-4)


def test_observer_ranges_are_the_observed_min_and_max():
    x = torch.rand(16, 1, 6, 6) * 3
    prepared, _ = _prepared_and_int8(MLP(), x, observer="minmax")
    ranges = observer_ranges(prepared)
    first = ranges["activation_post_process_0"]
    assert first["observes"] == "output of flatten"  # x.flatten(1): same values as x
    assert first["min"] == pytest.approx(float(x.min())) and first["max"] == pytest.approx(float(x.max()))
    assert first["scale"] == pytest.approx((float(x.max()) - min(0.0, float(x.min()))) / 127, rel=1e-4)
    assert any(r["observes"] == "output of fc1" for r in ranges.values())


def test_quantizable_layers_and_next_steps():
    assert quantizable_layers(MLP()) == ["fc1", "fc2", "fc3"]
    steps = next_steps(per_channel=False, observer="minmax", calibration_batches=8, qat=False)
    assert steps[0].startswith("per_channel=True") and any("histogram" in s for s in steps)
    assert any("calibration_batches=8 -> 128" in s for s in steps) and steps[-1].startswith("quantization-aware")
    assert next_steps(True, "histogram", None, qat=True) == [
        "keep the most sensitive layers in float (max_metric_drop / skip)"
    ]


def test_per_layer_rows_say_each_layers_precision():
    from lightning_quant import quantize

    torch.manual_seed(0)
    model = MLP().eval()
    int8 = quantize(model, mode="dynamic", layers={"fc1": "fp16", "fc3": "float"})
    x = torch.randn(16, 1, 6, 6)
    rows = per_layer_sqnr(model, int8, [x], "x86")
    assert {name: row["precision"] for name, row in rows.items()} == {"fc1": "fp16", "fc2": "int8", "fc3": "float"}
    assert rows["fc3"]["loss_db"] < 0.5 < rows["fc2"]["loss_db"]  # a float layer adds no error of its own

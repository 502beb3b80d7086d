import pytest
import torch
import torch.nn as nn

from lightning_quant import QuantizationConfig, quantize, quantize_within_budget
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.ptq import search_targets
from tests.helpers import FLOWS, Erf, TinyNet, TwoInputNet, boundary_cost


def _calibration(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.zeros(16)) for _ in range(n)]


@pytest.mark.parametrize("flow", ["eager", *FLOWS])
@pytest.mark.parametrize("observer", ["minmax", "histogram", "moving_average"])
def test_quantize_static_is_close_to_float_and_leaves_model_alone(flow, observer):
    torch.manual_seed(0)
    model = TinyNet().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = quantize(model, _calibration(), flow=flow, observer=observer, progress=False)
    x = _calibration(1, seed=5)[0][0]
    with torch.no_grad(), quantized_engine("x86"):
        reference, out = model(x), int8(x)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    assert type(model) is TinyNet and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_quantize_reads_mapping_batches_as_keywords():
    model = TwoInputNet().eval()
    batches = [{"x": torch.randn(8, 1, 6, 6), "extra": torch.randn(8, 3)} for _ in range(4)]
    int8 = quantize(model, batches, progress=False)
    with torch.no_grad(), quantized_engine("x86"):
        assert int8(**batches[0]).shape == (8, 4)


@pytest.mark.parametrize("flow", ["eager", *FLOWS])
def test_quantize_reads_the_first_items_of_tuple_batches_for_a_forward_of_several_inputs(flow):
    torch.manual_seed(0)
    model = TwoInputNet().eval()  # forward(x, extra)
    batches = [(torch.randn(8, 1, 6, 6), torch.randn(8, 3), torch.randint(0, 4, (8,))) for _ in range(4)]
    int8 = quantize(model, batches, flow=flow, progress=False)
    x, extra, _ = batches[0]
    with torch.no_grad(), quantized_engine("x86"):
        reference, out = model(x, extra), int8(x, extra)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    targets = search_targets(batches, "accuracy", inputs=2)
    assert torch.equal(targets, torch.cat([b[2] for b in batches]))  # the item after the inputs


def test_quantize_refuses_batches_that_lack_a_required_input_before_calibrating():
    batches = [(torch.randn(8, 1, 6, 6),) for _ in range(2)]
    with pytest.raises(
        TypeError,
        match=r"^TwoInputNet.forward\(x, extra\) cannot be called with the inputs read off the first calibration "
        r"batch \(Tensor\): missing a required argument: 'extra'\. Pass batch_to_input=",
    ):
        quantize(TwoInputNet().eval(), batches, progress=False)


def test_quantize_batch_to_input():
    model = TinyNet().eval()
    batches = [{"pixels": torch.randn(8, 1, 6, 6)} for _ in range(2)]
    int8 = quantize(model, batches, batch_to_input=lambda b: b["pixels"], progress=False)
    assert int8 is not model


def test_quantize_qnnpack_backend_runs_on_qnnpack():
    int8 = quantize(TinyNet().eval(), _calibration(), backend="qnnpack", progress=False)
    with torch.no_grad(), quantized_engine("qnnpack"):
        assert int8(_calibration(1)[0][0]).shape == (16, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"mode": "static", "calibration_data": None},
            ValueError,
            r'mode="static" needs calibration_data: an iterable of representative batches',
        ),
        ({"calibration_data": iter([])}, ValueError, r"calibration data yielded no batch"),
        (
            {"calibration_data": _calibration(), "calibration_batches": 0},
            ValueError,
            r"calibration_batches must be a positive int, got 0",
        ),
        ({"mode": "int4"}, ValueError, r"mode must be one of \('static', 'dynamic', 'weight_only'\), got 'int4'"),
        (
            {"calibration_data": _calibration(), "batch_to_input": "x"},
            TypeError,
            r"batch_to_input must be a callable or None, got 'x'",
        ),
        ({"calibration_data": _calibration(), "eval_batches": 0}, ValueError, r"eval_batches must be a positive int"),
    ],
)
def test_quantize_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(TinyNet().eval(), progress=False, **kwargs)


def test_quantize_exhausted_iterator_raises():
    data = iter(_calibration(2))
    list(data)
    with pytest.raises(ValueError, match=r"it is empty or an iterator that was already consumed"):
        quantize(TinyNet().eval(), data, progress=False)


def _broken_mlp_and_data():
    from tests.evaluation.test_analysis import MLP

    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[0] = 0.0
        model.fc1.bias[0] = -1.0
        model.fc2.weight[0, 0] = 1000 * model.fc2.weight.abs().max()
    x = torch.randn(128, 1, 6, 6)
    with torch.no_grad():
        logits = model(x)
        model.fc3.bias -= logits.mean(0)  # centre the logits: every class is predicted for some inputs
        model.fc3.weight *= 4 / logits.std()
        y = model(x).argmax(-1)
    assert torch.bincount(y, minlength=4).min() >= 16
    return model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]


def _accuracy(int8, batches):
    from lightning_quant.evaluation.metrics import classification_accuracy

    return classification_accuracy(int8, batches, engine="x86")


def test_skip_search_meets_a_budget_plain_ptq_misses():
    model, batches = _broken_mlp_and_data()
    options = dict(per_channel=False, observer="minmax", progress=False)
    plain = quantize(model, batches, **options)
    assert _accuracy(plain, batches) < 0.9  # float is 1.0 on these labels
    within = quantize(model, batches, max_metric_drop=0.02, **options)
    assert _accuracy(within, batches) >= 0.98
    assert type(within.fc2) is nn.Linear and "quantized" in type(within.fc1).__module__

    config = QuantizationConfig(per_channel=False, observer="minmax")
    int8, search = quantize_within_budget(model, batches, config=config, max_metric_drop=0.02, progress=False)
    assert _accuracy(int8, batches) == _accuracy(within, batches)
    assert search.met and search.skipped[0] == "fc2" and search.full_int8 < 0.9 <= 0.98 <= search.final


def test_skip_search_without_targets_uses_output_cosine():
    model, batches = _broken_mlp_and_data()
    inputs = [x for x, _ in batches]
    int8 = quantize(model, inputs, max_metric_drop=0.01, per_channel=False, observer="minmax", progress=False)
    with torch.no_grad(), quantized_engine("x86"):
        cosine = torch.nn.functional.cosine_similarity(int8(inputs[0]), model(inputs[0]), dim=-1).mean()
    assert cosine >= 0.99


def test_max_metric_drop_raises():
    with pytest.raises(ValueError, match=r"max_metric_drop must be a non-negative number or None, got -1"):
        quantize_within_budget(TinyNet(), [], max_metric_drop=-1)
    with pytest.raises(ValueError, match=r"max_metric_drop must be a non-negative number or None, got nan"):
        quantize(TinyNet(), mode="dynamic", max_metric_drop=float("nan"))
    with pytest.raises(TypeError, match=r"got unexpected keyword arguments \['max_drop'\]"):
        quantize_within_budget(TinyNet(), [], max_metric_drop=0.1, max_drop=0.1)
    with pytest.raises(ValueError, match=r"max_metric_drop needs eval_data \(or calibration_data\)"):
        quantize(TinyNet(), mode="dynamic", max_metric_drop=0.1)


def test_quantize_takes_a_config_object_or_keywords_not_both():
    model = TinyNet().eval()
    config = QuantizationConfig(backend="qnnpack", observer="minmax")
    from_config = quantize(model, _calibration(), config=config, progress=False)
    from_keywords = quantize(model, _calibration(), backend="qnnpack", observer="minmax", progress=False)
    x = _calibration(1, seed=3)[0][0]
    with torch.no_grad(), quantized_engine("qnnpack"):
        assert torch.equal(from_config(x), from_keywords(x))
    with pytest.raises(
        ValueError, match=r"quantize got config= and also \['backend'\]: set them on the QuantizationConfig"
    ):
        quantize(model, _calibration(), config=config, backend="fbgemm", progress=False)
    with pytest.raises(TypeError, match=r"config must be a QuantizationConfig or None, got dict"):
        quantize(model, _calibration(), config={"backend": "x86"}, progress=False)


def test_static_model_whose_only_int8_layers_are_fused_is_not_called_empty():
    int8 = quantize(TinyNet().eval(), _calibration(), skip=["head"], progress=False)
    fused = int8.get_submodule("features.0")
    assert type(fused).__name__ == "ConvReLU2d" and "quantized" in type(fused).__module__
    assert type(int8.head) is nn.Linear


def test_quantize_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        quantize({"weight": torch.zeros(2)}, _calibration(), progress=False)


def _boundary_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), Erf(), nn.Linear(64, 4), Erf(), nn.Linear(4, 4)).eval()


def test_quantize_search_latency_keeps_float_the_layers_that_save_time(monkeypatch):
    """Layer by layer (stood in for here: timings of tiny layers are noise) the two small layers save
    time float; the model with both float is timed (a cost model here) and kept."""
    from lightning_quant.quantization import ptq
    from lightning_quant.quantization.flows import fx, int8_layers

    measured = {}

    def savings(int8, floated, example, repeats=30):
        measured.update(fx.boundary_layers(int8))
        return {"4": 0.5, "2": 0.2, "0": -1.0}

    monkeypatch.setattr(ptq, "latency_of", boundary_cost)
    monkeypatch.setattr(fx, "float_savings", savings)
    calibration = [torch.randn(16, 8) for _ in range(4)]
    int8 = quantize(_boundary_net(), calibration, progress=False, search_latency=True)
    assert measured == {"0": (True, True), "2": (True, True), "4": (True, True)}  # each between erf ops
    assert int8_layers(int8) == {"0": "int8", "2": "float", "4": "float"}
    with torch.no_grad(), quantized_engine("x86"):
        x = torch.randn(5, 8)
        assert torch.nn.functional.cosine_similarity(int8(x).flatten(), _boundary_net()(x).flatten(), dim=0) > 0.99


def test_float_savings_weighs_every_boundary_layer():
    from lightning_quant.quantization.convert import convert_copy
    from lightning_quant.quantization.flows.fx import boundary_layers, float_savings
    from lightning_quant.quantization.inputs import ExampleInputs
    from lightning_quant.quantization.ptq import prepare_and_calibrate

    config = QuantizationConfig()
    x = torch.randn(16, 8)
    prepared = prepare_and_calibrate(_boundary_net(), [x], config, progress=False)
    with quantized_engine("x86"):
        int8 = convert_copy(prepared, "fx", "x86")
        floated = convert_copy(prepared, "fx", "x86", keep_float=list(boundary_layers(int8)))
        savings = float_savings(int8, floated, ExampleInputs((x,)), repeats=5)
    assert sorted(savings) == ["0", "2", "4"] and all(abs(v) < 100 for v in savings.values())


@pytest.mark.parametrize(
    ("options", "got"),
    [({"flow": "eager"}, "mode='static', flow='eager'"), ({"mode": "dynamic"}, "mode='dynamic', flow='fx'")],
)
def test_quantize_search_latency_needs_static_fx(options, got):
    with pytest.raises(ValueError, match=rf"search_latency=True needs mode='static' and flow='fx' .*got {got}"):
        quantize(_boundary_net(), [torch.randn(4, 8)], progress=False, search_latency=True, **options)


def test_float_savings_weighs_a_fused_layer_too():
    """Kept float, a fused Conv-ReLU is torch.ao's float ConvReLU2d (an intrinsic module, not an int8
    one): it is weighed like any other boundary layer."""
    from lightning_quant.quantization.convert import convert_copy
    from lightning_quant.quantization.flows.fx import boundary_layers, float_savings
    from lightning_quant.quantization.inputs import ExampleInputs
    from lightning_quant.quantization.ptq import prepare_and_calibrate

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Erf(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(4, 3, 12, 12)
    prepared = prepare_and_calibrate(net, [x], QuantizationConfig(), progress=False)
    with quantized_engine("x86"):
        int8 = convert_copy(prepared, "fx", "x86")
        floated = convert_copy(prepared, "fx", "x86", keep_float=list(boundary_layers(int8)))
        savings = float_savings(int8, floated, ExampleInputs((x,)), repeats=3)
    assert type(floated.get_submodule("0")).__name__ == "ConvReLU2d" and sorted(savings) == ["0", "3"]

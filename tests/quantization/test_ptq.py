import pytest
import torch
import torch.nn as nn

from lightning_quant import quantize
from lightning_quant.quantization.convert import quantized_engine
from tests.helpers import TinyNet, TwoInputNet


def _calibration(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.zeros(16)) for _ in range(n)]


@pytest.mark.parametrize("flow", ["fx", "eager"])
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


def test_quantize_batch_to_input():
    model = TinyNet().eval()
    batches = [{"pixels": torch.randn(8, 1, 6, 6)} for _ in range(2)]
    int8 = quantize(model, batches, batch_to_input=lambda b: b["pixels"], progress=False)
    assert int8 is not model


def test_quantize_qnnpack_backend_runs_on_qnnpack():
    int8 = quantize(TinyNet().eval(), _calibration(), backend="qnnpack", progress=False)
    with torch.no_grad(), quantized_engine("qnnpack"):
        assert int8(_calibration(1)[0][0]).shape == (16, 4)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"mode": "static", "calibration_data": None}, ValueError,
     r'mode="static" needs calibration_data: an iterable of representative batches'),
    ({"calibration_data": iter([])}, ValueError, r"calibration data yielded no batch"),
    ({"calibration_data": _calibration(), "calibration_batches": 0}, ValueError,
     r"calibration_batches must be a positive int, got 0"),
    ({"mode": "int4"}, ValueError, r"mode must be one of \('static', 'dynamic'\), got 'int4'"),
])
def test_quantize_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(TinyNet().eval(), progress=False, **kwargs)


def test_quantize_exhausted_iterator_raises():
    data = iter(_calibration(2))
    list(data)
    with pytest.raises(ValueError, match=r"it is empty or an iterator that was already consumed"):
        quantize(TinyNet().eval(), data, progress=False)

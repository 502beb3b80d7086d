import pytest
import torch

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.convert import convert_copy, quantized_engine, unobserved
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import TinyNet


def test_convert_copy_leaves_prepared_model_alone():
    x = torch.randn(8, 1, 6, 6)
    prepared = get_flow("fx").prepare(TinyNet(), QuantizationConfig(), ExampleInputs((x,)), qat=True)
    prepared(x)
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    int8 = convert_copy(prepared, "fx", "x86")
    assert prepared.training
    assert all(torch.equal(state[k], v) for k, v in prepared.state_dict().items())
    with quantized_engine("x86"):
        assert int8(x).shape == (8, 4)


def test_convert_raises_when_observers_saw_nothing():
    x = torch.randn(8, 1, 6, 6)
    prepared = get_flow("fx").prepare(TinyNet(), QuantizationConfig(), ExampleInputs((x,)), qat=False)
    assert unobserved(prepared)
    with pytest.raises(RuntimeError, match=r"cannot convert to int8: \d+ observer\(s\) never saw data, e.g. \["):
        convert_copy(prepared, "fx", "x86")


def test_quantized_engine_restores_engine_and_determinism():
    before = torch.backends.quantized.engine
    torch.use_deterministic_algorithms(True)
    try:
        with quantized_engine("qnnpack"):
            assert torch.backends.quantized.engine == "qnnpack"
            assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.quantized.engine == before and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match=r"this torch build has no 'npu' quantized engine"):
        with quantized_engine("npu"):
            pass

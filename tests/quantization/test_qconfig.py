import pytest
import torch
import torch.nn as nn
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, HistogramObserver, MinMaxObserver

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.flows.fake_quantize import CpuFakeQuantize, CpuFusedFakeQuantize
from lightning_quant.quantization.flows.qconfig import build_qconfig, build_qconfig_mapping
from lightning_quant.quantization.layers import resolve_skip
from tests.helpers import TinyNet


@pytest.mark.parametrize(("backend", "quant_max"), [("x86", 127), ("fbgemm", 127), ("qnnpack", 255)])
def test_activation_range_by_backend(backend, quant_max):
    activation = build_qconfig(QuantizationConfig(backend=backend), qat=False).activation()
    assert (activation.quant_min, activation.quant_max, activation.dtype) == (0, quant_max, torch.quint8)


def test_observer_choice_and_per_channel_weights():
    ptq = build_qconfig(QuantizationConfig(observer="histogram"), qat=False)
    assert isinstance(ptq.activation(), HistogramObserver)
    assert ptq.weight().qscheme == torch.per_channel_symmetric
    tensor_weights = build_qconfig(QuantizationConfig(observer="minmax", per_channel=False), qat=False)
    assert isinstance(tensor_weights.activation(), MinMaxObserver)
    assert tensor_weights.weight().qscheme == torch.per_tensor_symmetric


def test_qat_qconfig_uses_fake_quantization():
    qat = build_qconfig(QuantizationConfig(), qat=True)
    assert isinstance(qat.activation(), FusedMovingAvgObsFakeQuantize)
    weight = qat.weight()
    assert weight.qscheme == torch.per_channel_symmetric and (weight.quant_min, weight.quant_max) == (-128, 127)
    assert isinstance(qat.activation(), CpuFusedFakeQuantize)  # vectorized on CPU, torch's numbers
    histogram = build_qconfig(QuantizationConfig(observer="histogram"), qat=True).activation()
    assert isinstance(histogram.activation_post_process, HistogramObserver)
    assert isinstance(histogram, CpuFakeQuantize)


def test_skip_names_and_types_map_to_float():
    model = TinyNet()
    mapping = build_qconfig_mapping(QuantizationConfig(skip=["head", "torch.nn.BatchNorm2d"]), model, qat=False)
    assert mapping.module_name_qconfigs["head"] is None
    assert mapping.object_type_qconfigs[nn.BatchNorm2d] is None
    assert resolve_skip(model, (nn.ReLU, "features.0")) == (("features.0",), (nn.ReLU,))


def test_resolve_skip_raises_for_unknown_entry():
    with pytest.raises(
        ValueError,
        match=r"skip entry 'torch.nn.Nope' is neither a submodule of TinyNet \(submodules "
        r"include \['features', 'features.0'.*\]\) nor an importable nn.Module type",
    ):
        resolve_skip(TinyNet(), ("torch.nn.Nope",))


def test_user_mapping_is_used_as_is():
    from torch.ao.quantization import QConfigMapping

    mapping = QConfigMapping()
    assert (
        build_qconfig_mapping(QuantizationConfig(qconfig_mapping=mapping, skip=["nothing"]), TinyNet(), True) is mapping
    )


@pytest.mark.parametrize("qat", [False, True])
def test_embeddings_are_weight_only_int8_per_row_and_float_for_onnx(qat):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    mapping = build_qconfig_mapping(QuantizationConfig(), model, qat)
    for embedding in (nn.Embedding, nn.EmbeddingBag):
        weight = mapping.object_type_qconfigs[embedding].weight()
        assert weight.qscheme == torch.per_channel_affine_float_qparams and weight.dtype == torch.quint8
    onnx = build_qconfig_mapping(QuantizationConfig(export=["torchscript", "onnx"]), model, qat)
    assert onnx.object_type_qconfigs[nn.Embedding] is None


def test_a_layer_rule_that_names_an_embedding_gives_it_the_int8_an_embedding_has():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    mapping = build_qconfig_mapping(QuantizationConfig(layers={"0": {"per_channel": False}}), model, False)
    assert mapping.module_name_qconfigs["0"].weight().qscheme == torch.per_channel_affine_float_qparams

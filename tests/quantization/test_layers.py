"""Per-layer settings: from a mapping (or YAML) to each layer of the converted model, refused when impossible."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.ao.quantization import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

from lightning_quant import QuantizationConfig, quantize
from lightning_quant.quantization.config import LayerSetting, Precision
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import TinyNet


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.decoder(self.encoder(x)))


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def _activation_observer_of(prepared: nn.Module, node_target: str) -> type:
    """The class of the observer FX put on the output of module ``node_target``."""
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target == node_target:
            (user,) = node.users
            return type(prepared.get_submodule(user.target))
    raise KeyError(node_target)


YAML = """
layers:
  encoder: {observer: minmax}          # a name: the encoder and everything inside it
  torch.nn.Linear: {observer: histogram}  # a type: every other Linear
  encoder.2: {observer: moving_average}  # a nearer name beats the enclosing one
  head: float
"""


@pytest.mark.parametrize("flow", ["fx", "eager"])
def test_layers_from_yaml_reach_the_converted_model_name_beats_type_beats_global(flow):
    layers = OmegaConf.create(YAML).layers
    config = QuantizationConfig(flow=flow, layers=layers, per_channel=False)
    assert dict(config.layers)["head"] == LayerSetting(precision=Precision.FLOAT)
    model = Blocks().eval()
    prepared = get_flow(flow).prepare(copy.deepcopy(model), config, ExampleInputs((_batches()[0],)), qat=False)
    if flow == "fx":
        assert _activation_observer_of(prepared, "encoder.0") is MinMaxObserver
        assert _activation_observer_of(prepared, "encoder.2") is MovingAverageMinMaxObserver
        assert _activation_observer_of(prepared, "decoder.0") is HistogramObserver
    else:
        inner = prepared.module
        assert type(inner.encoder[0].activation_post_process) is MinMaxObserver
        assert type(inner.encoder[2].activation_post_process) is MovingAverageMinMaxObserver
        assert type(inner.decoder[0].activation_post_process) is HistogramObserver
    int8 = quantize(model, _batches(), flow=flow, layers=layers, per_channel=False, progress=False)
    assert type(int8.get_submodule("head" if flow == "fx" else "module.head.module")) is nn.Linear
    assert "quantized" in type(int8.get_submodule("encoder.0" if flow == "fx" else "module.encoder.0")).__module__


def test_dynamic_layers_choose_int8_fp16_or_float_per_layer():
    model = Blocks().eval()
    layers = {"encoder": "fp16", "head": "float", "decoder.0": {"dtype": "qint8", "per_channel": True}}
    int8 = quantize(model, mode="dynamic", layers=layers, per_channel=False)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    dtypes = {name: m._packed_params.dtype for name, m in int8.named_modules() if isinstance(m, dynamic)}
    assert dtypes == {"encoder.0": torch.float16, "encoder.2": torch.float16, "decoder.0": torch.qint8}
    assert type(int8.head) is nn.Linear
    assert int8.decoder[0].weight().qscheme() == torch.per_channel_affine
    x = _batches(1)[0]
    with torch.no_grad(), quantized_engine("x86"):
        assert torch.nn.functional.cosine_similarity(int8(x), model(x)).min() > 0.99


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"layers": {"head": "int2"}},
            ValueError,
            r"layers\['head'\] must be one of \('int8', 'fp16', 'int4', 'float'\)",
        ),
        ({"layers": {"head": {"bits": 4}}}, ValueError, r"layers\['head'\] has options \['bits'\]; a layer may set"),
        ({"layers": ["head"]}, TypeError, r"layers must be a mapping from a module name"),
        ({"layers": {"head": "float"}, "skip": ["head"]}, ValueError, r"\['head'\] are in both skip and layers"),
    ],
)
def test_layer_settings_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationConfig(**kwargs)


@pytest.mark.parametrize(
    ("mode", "layers", "match"),
    [
        (
            "static",
            {"head": {"dtype": "quint16"}},
            r"asks for 'quint16' activations, which neither fbgemm/x86 nor "
            r"qnnpack executes; the activation dtypes that run are \['quint8'\]",
        ),
        (
            "static",
            {"head": "fp16"},
            r"asks for 'fp16', which flow='fx' cannot run \(fp16 is a dynamic-mode "
            r"precision.*its precisions are \['int8', 'float'\]",
        ),
        ("static", {"head": "int4"}, r"asks for 'int4', which flow='fx' cannot run \(int4 needs torchao"),
        ("dynamic", {"head": "int4"}, r"dynamic mode cannot run.*its precisions are \['int8', 'fp16', 'float'\]"),
        ("dynamic", {"head": {"observer": "minmax"}}, r"sets an observer, but dynamic mode quantizes activations"),
        ("static", {"neck": "float"}, r"layers/skip entry 'neck' is neither a submodule of Blocks"),
    ],
)
def test_impossible_precisions_are_refused_before_any_work(mode, layers, match):
    batches = _batches()
    with pytest.raises(ValueError, match=match):
        quantize(Blocks().eval(), batches if mode == "static" else None, mode=mode, layers=layers, progress=False)


def test_impossible_precision_is_refused_before_training():
    from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining
    from tests.helpers import BoringClassifier, quiet_trainer

    for callback in (
        QuantizationAwareTraining(layers={"head": "fp16"}),
        PostTrainingQuantization(layers={"features.0": {"dtype": "quint16"}}),
        PostTrainingQuantization(mode="dynamic", layers={"head": "int4"}),
    ):
        trainer = quiet_trainer(callbacks=[callback])
        with pytest.raises(ValueError, match=r"layers\['(head|features.0)'\] asks for"):
            trainer.fit(BoringClassifier(net=TinyNet()))
        assert trainer.global_step == 0


def _with_a_broken_layer() -> nn.Module:
    torch.manual_seed(0)
    model = Blocks().eval()
    with torch.no_grad():
        model.decoder[0].weight[0, 0] = 200.0  # one huge weight: per-tensor int8 rounds the rest of that layer away
    return model


def test_dynamic_search_raises_a_sensitive_layer_to_fp16_and_its_mapping_reproduces_the_model():
    from lightning_quant import quantize_within_budget

    model, batches = _with_a_broken_layer(), _batches(2)
    options = dict(mode="dynamic", per_channel=False, eval_data=batches)
    int8, search = quantize_within_budget(
        model, max_metric_drop=0.002, search_precisions=["int8", "fp16", "float"], **options
    )
    assert search.met and search.full_int8 < 0.998 <= search.final
    assert search.history[0][0] == {"decoder.0": "fp16"}  # the broken layer is the most sensitive: first up
    assert set(search.layers.values()) == {"fp16"} and search.skipped == []  # fp16 sufficed: nothing went float
    again = quantize(model, layers=search.layers, **options)  # the mapping, pasted back, is the same model
    x = batches[0]
    with torch.no_grad(), quantized_engine("x86"):
        assert torch.equal(again(x), int8(x))


def test_dynamic_search_under_a_size_budget_fits_it():
    from lightning_quant import quantize_within_budget
    from lightning_quant.evaluation import state_dict_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    batches = _batches(2)
    all_int8 = state_dict_bytes(quantize(model, mode="dynamic"))
    budget = (all_int8 + state_dict_bytes(model)) // 2
    int8, search = quantize_within_budget(
        model, mode="dynamic", max_size_bytes=budget, search_precisions=["int8", "fp16", "float"], eval_data=batches
    )
    assert search.met and state_dict_bytes(int8) == search.final_bytes <= budget < state_dict_bytes(model)
    assert set(search.layers.values()) <= {"fp16", "float"} and search.layers


def test_search_score_can_be_cosine_even_when_batches_carry_targets():
    from lightning_quant import quantize_within_budget

    model = _with_a_broken_layer()
    batches = [(x, model(x).argmax(-1)) for x in _batches(2)]
    _, by_cosine = quantize_within_budget(
        model, mode="dynamic", max_metric_drop=0.002, eval_data=batches, search_score="cosine"
    )
    _, by_accuracy = quantize_within_budget(model, mode="dynamic", max_metric_drop=0.002, eval_data=batches)
    assert by_cosine.reference == 1.0 and by_cosine.full_int8 < 0.998  # cosine of outputs
    assert by_accuracy.reference == 1.0 and 0.5 < by_accuracy.full_int8 < 1.0  # top-1 against the targets
    assert by_cosine.full_int8 != by_accuracy.full_int8
    with pytest.raises(ValueError, match=r"search_score must be one of \('auto', 'accuracy', 'cosine'\), got 'mse'"):
        quantize_within_budget(model, mode="dynamic", max_metric_drop=0.1, eval_data=batches, search_score="mse")

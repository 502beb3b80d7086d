"""The torchao flow: plans, QAT fake quantization against its conversion, weights files, refusals."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lightning_quant import QuantizationConfig, load_int8, quantize, quantize_within_budget, save_int8
from lightning_quant.export import export_int8
from lightning_quant.quantization import flows
from lightning_quant.quantization.config import Backend, ExportTarget
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.outputs import mean_cosine
from tests.helpers import requires_executorch, requires_torchao

pytestmark = requires_torchao


class TokenNet(nn.Module):
    """Embedding, two Linear layers and attention: what a small text model holds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(torch.relu(self.fc1(h.mean(1))))


def _model() -> TokenNet:
    torch.manual_seed(0)
    return TokenNet().eval()


def _tokens(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (n, 6), generator=torch.Generator().manual_seed(seed))


def _config(**kwargs) -> QuantizationConfig:
    return QuantizationConfig(flow="torchao", export=None, **kwargs)


# ---------------------------------------------------------------- the plan
def test_plan_gives_each_layer_its_scheme_and_leaves_attention_float():
    model = _model()
    config = _config(scheme="int8_dyn_int4_weight", group_size=32, layers={"emb": "int8", "fc2": "int8"})
    int8 = get_flow("torchao").convert(
        get_flow("torchao").prepare(copy.deepcopy(model), config, ExampleInputs(), False)
    )
    # the global scheme on fc1, int8 weights on the head and the embedding (named), attention's
    # out_proj (read as a plain tensor by multi_head_attention_forward) float
    assert flows.int8_layers(int8) == {"emb": "int8", "attn.out_proj": "float", "fc1": "int4", "fc2": "int8"}
    assert mean_cosine(model(_tokens()), int8(_tokens())) > 0.99


def test_plan_refuses_a_group_size_that_does_not_divide_an_int4_layer_naming_it():
    with pytest.raises(
        ValueError,
        match=r"group_size=48 does not divide the input size of the int4 layers \['fc1 \(64\)', 'fc2 \(128\)'\]",
    ):
        quantize(_model(), mode="dynamic", flow="torchao", scheme="int8_dyn_int4_weight", group_size=48)
    # the same layers at int8 need no group
    quantize(
        _model(),
        mode="dynamic",
        flow="torchao",
        scheme="int8_dyn_int4_weight",
        group_size=48,
        layers={"fc1": "int8", "fc2": "int8"},
    )


def test_plan_refuses_a_model_without_linear_layers():
    with pytest.raises(
        ValueError, match=r"nothing to quantize with flow='torchao': Sequential has no nn.Linear outside skip"
    ):
        quantize(nn.Sequential(nn.Conv2d(1, 4, 3)), mode="dynamic", flow="torchao")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"scheme": "int8_dyn_int4_weight"},
            ValueError,
            r"\['scheme'\] are options of torchao's weight schemes \(flow='torchao'\), but flow='fx'",
        ),
        ({"group_size": 64}, ValueError, r"\['group_size'\] are options of torchao's weight schemes"),
        ({"flow": "torchao", "group_size": 0}, ValueError, r"group_size must be a positive int .* got 0"),
        (
            {"flow": "torchao", "scheme": "int2"},
            ValueError,
            r"scheme must be one of \('int8_weight_only', 'int4_weight_only', 'int8_dyn_int8_weight', "
            r"'int8_dyn_int4_weight'\), got 'int2'",
        ),
        ({"flow": "torchao", "per_channel": False}, ValueError, r"per_channel=False has no scheme there"),
        ({"flow": "torchao", "backend": "qnnpack"}, ValueError, r"flow='torchao' has no backend 'qnnpack'"),
        ({"flow": "torchao", "export": "torchscript"}, ValueError, r"flow='torchao' cannot export 'torchscript'"),
        (
            {"flow": "torchao", "layers": {"fc1": "fp16"}},
            ValueError,
            r"layers\['fc1'\] asks for 'fp16', which flow='torchao' cannot run; "
            r"its precisions are \['int8', 'int4', 'float'\]",
        ),
        (
            {"flow": "torchao", "layers": {"fc1": {"observer": "minmax"}}},
            ValueError,
            r"layers\['fc1'\] sets \['observer'\]: torchao's schemes fix them",
        ),
        (
            {"flow": "torchao", "qconfig_mapping": object()},
            ValueError,
            r'qconfig_mapping is a torch.ao setting of flow="fx"/"eager"; with flow="torchao"',
        ),
    ],
)
def test_config_refuses_what_torchao_cannot_do(kwargs, error, match):
    with pytest.raises(error, match=match):
        config = QuantizationConfig(**kwargs)
        get_flow(config.flow).check(config)


@requires_executorch
def test_executorch_export_refuses_weight_only_schemes():
    config = QuantizationConfig(flow="torchao", backend="xnnpack", scheme="int8_weight_only")
    with pytest.raises(
        ValueError, match=r"export 'executorch' needs a dynamic scheme .* got scheme='int8_weight_only'"
    ):
        get_flow("torchao").check(config)


@requires_executorch
def test_executorch_export_of_quantized_embeddings_is_refused_naming_them():
    config = QuantizationConfig(
        flow="torchao", backend="xnnpack", scheme="int8_dyn_int4_weight", layers={"emb": "int8"}, export="executorch"
    )
    with pytest.raises(ValueError, match=r"export 'executorch' with quantized embeddings \['emb'\]: XNNPACK runs"):
        get_flow("torchao").check_model(_model(), config)


def test_missing_torchao_raises_with_the_install_line(monkeypatch):
    import lightning_quant.utils.checks as checks

    real = checks.importlib.util.find_spec
    monkeypatch.setattr(
        checks.importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-quant\[torchao\]'"):
        QuantizationConfig(flow="torchao")


# ---------------------------------------------------------------- QAT: fake quantization vs conversion
@pytest.mark.parametrize("backend", ["x86", pytest.param("xnnpack", marks=requires_executorch)])
@pytest.mark.parametrize(
    "scheme", ["int8_weight_only", "int4_weight_only", "int8_dyn_int8_weight", "int8_dyn_int4_weight"]
)
def test_qat_converts_to_what_it_trained_with(scheme, backend):
    flow = get_flow("torchao")
    model = _model()
    prepared = flow.prepare(copy.deepcopy(model), _config(scheme=scheme, backend=backend), ExampleInputs(), True)
    names = [name for name, _ in flows.fake_quantizers(prepared)]
    assert "fc1.weight_fake_quantizer" in names and ("fc1.activation_fake_quantizer" in names) == ("dyn" in scheme)
    x = _tokens()
    with torch.no_grad():
        fake = prepared(x)
        for _, quantizer in flows.fake_quantizers(prepared):
            quantizer.enable_fake_quant(False)
        torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=0)  # switched off: the float model
        for _, quantizer in flows.fake_quantizers(prepared):
            quantizer.enable_fake_quant(True)
        int8 = flow.convert(copy.deepcopy(prepared).eval())(x)
    # x86's int8 kernels round symmetric-per-row weights and per-token activations as the fake
    # quantizers do, up to float summation order; xnnpack keeps the very tensors QAT computed with
    torch.testing.assert_close(int8, fake, rtol=0, atol=2e-3 * float(fake.abs().max()))


# ---------------------------------------------------------------- post-training modes and the search
@pytest.mark.parametrize(
    ("mode", "scheme", "precision", "min_cosine"),
    [
        ("weight_only", None, "int8", 0.9999),
        ("weight_only", "int4_weight_only", "int4", 0.99),
        ("dynamic", None, "int8", 0.999),
        ("dynamic", "int8_dyn_int4_weight", "int4", 0.99),
    ],
)
def test_quantize_modes_and_their_default_schemes(mode, scheme, precision, min_cosine):
    model = _model()
    int8 = quantize(model, mode=mode, flow="torchao", scheme=scheme)
    assert flows.int8_layers(int8)["fc1"] == precision
    assert not any(p.requires_grad for p in int8.parameters())
    x = _tokens(32, seed=3)
    assert mean_cosine(model(x), int8(x)) > min_cosine
    assert isinstance(model.fc1.weight, nn.Parameter) and type(model.fc1.weight.data) is torch.Tensor  # untouched


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"flow": "torchao"},
            r"mode='static' \(int8 activations with ranges calibrated ahead of time\) runs on "
            r"flow='fx'/'eager'/'pt2e': set flow='fx'; flow='torchao' runs mode='weight_only'/'dynamic'",
        ),
        (
            {"mode": "weight_only"},
            r"mode='weight_only' \(int8/int4 weights, float activations\) runs on flow='torchao': set flow='torchao'",
        ),
        (
            {"flow": "torchao", "mode": "weight_only", "scheme": "int8_dyn_int8_weight"},
            r"scheme='int8_dyn_int8_weight' is not a weight_only scheme; "
            r"mode='weight_only' takes \['int8_weight_only', 'int4_weight_only'\]",
        ),
        (
            {"flow": "torchao", "mode": "dynamic", "dtype": "float16"},
            r"\['dtype'\] are options of torch.ao's dynamic mode \(flow='fx'/'eager'\); flow='torchao'",
        ),
    ],
)
def test_quantize_refuses_mode_and_flow_that_do_not_agree(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(_model(), [_tokens()], **kwargs)


def test_search_steps_sensitive_layers_up_from_int4_until_within_budget():
    model = _model()
    batches = [_tokens(16, seed=s) for s in range(2)]
    full = quantize(model, mode="dynamic", flow="torchao", scheme="int8_dyn_int4_weight")
    full_cosine = mean_cosine(torch.cat([model(b) for b in batches]), torch.cat([full(b) for b in batches]))
    target = 1 - (1 - full_cosine) / 4  # a quarter of int4's loss
    int8, search = quantize_within_budget(
        model,
        mode="dynamic",
        flow="torchao",
        scheme="int8_dyn_int4_weight",
        eval_data=batches,
        max_metric_drop=1 - target,
        search_precisions=("int4", "int8", "float"),
    )
    assert search.met and search.final >= target > full_cosine
    assert set(search.layers.values()) <= {"int4", "int8", "float"} and search.layers
    assert {name: p for name, p in flows.int8_layers(int8).items() if name in search.layers} == {
        name: p for name, p in search.layers.items() if p != "float"
    } | {name: "float" for name, p in search.layers.items() if p == "float" and name != "emb"}


# ---------------------------------------------------------------- weights files
def test_save_int8_refuses_a_model_without_torchao_weights(tmp_path):
    with pytest.raises(ValueError, match=r"save_int8 writes int8 models; Linear has no int8 layer"):
        save_int8(nn.Linear(4, 4), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_load_int8_refuses_weights_of_another_model(tmp_path):
    int8 = quantize(_model(), mode="weight_only", flow="torchao")
    path = save_int8(int8, tmp_path / "net.pt")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict"):
        load_int8(nn.Sequential(nn.Linear(64, 128)), path)


@pytest.mark.parametrize(
    ("backend", "targets", "scheme"),
    [
        ("x86", ("state_dict", "safetensors", "pt2"), "int8_dyn_int8_weight"),
        ("x86", ("state_dict", "pt2"), "int8_weight_only"),
        pytest.param("xnnpack", ("state_dict", "executorch"), "int8_dyn_int4_weight", marks=requires_executorch),
    ],
)
def test_exports_reload_and_agree(backend, targets, scheme, tmp_path):
    config = QuantizationConfig(flow="torchao", backend=backend, scheme=scheme, export=targets)
    flow = get_flow("torchao")
    int8 = flow.convert(flow.prepare(_model(), config, ExampleInputs(), qat=False))
    records = export_int8(lambda engine: int8, config.export, tmp_path, ExampleInputs((_tokens(4),)), Backend(backend))
    assert sorted(records) == sorted(targets)
    for target, record in records.items():
        assert record.path.exists() and record.path.stat().st_size > 0
        if target in ("state_dict", "safetensors"):
            assert record.max_abs_diff == 0.0  # loaded into the float structure: bit-identical
        else:
            assert record.max_abs_diff <= 0.05, (target, record.max_abs_diff)


def test_state_dict_export_names_the_flow_it_needs(tmp_path):
    from lightning_quant.export import _SERIALIZERS

    with pytest.raises(
        ValueError, match=r"export 'state_dict' writes models whose weights are their own files \(flow='torchao'\)"
    ):
        _SERIALIZERS[ExportTarget.STATE_DICT](nn.Linear(2, 2), ExampleInputs((torch.randn(1, 2),)), Backend.X86)


# ---------------------------------------------------------------- a Hugging Face transformer
def test_a_hugging_face_bert_trains_with_fake_quantization_and_keeps_its_model_output():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 60, (4, 7))
    mask = torch.ones_like(ids)
    flow = get_flow("torchao")
    prepared = flow.prepare(
        model, _config(group_size=16), ExampleInputs((), {"input_ids": ids, "attention_mask": mask}), True
    )
    out = prepared(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()  # a ModelOutput, as before: Lightning code written for the float model runs unchanged
    assert prepared.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    int8 = flow.convert(copy.deepcopy(prepared).eval())
    layers = flows.int8_layers(int8)
    assert layers["bert.encoder.layer.0.attention.self.query"] == "int4" and layers["classifier"] == "int4"
    with torch.no_grad():
        torch.testing.assert_close(
            int8(input_ids=ids, attention_mask=mask).logits,
            prepared.eval()(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=1e-2,
        )


def test_weights_files_and_pt2_reload_bit_identical_in_a_fresh_process(tmp_path):
    """save_int8 (torch.save and safetensors) into a fresh float model, and the .pt2 export through
    load_pt2, each in a new interpreter, each giving the in-process int8 model's outputs exactly."""
    int8 = quantize(_model(), mode="dynamic", flow="torchao", scheme="int8_dyn_int4_weight", layers={"emb": "int8"})
    pt = save_int8(int8, tmp_path / "net_int8.pt")
    st = save_int8(int8, tmp_path / "net_int8.safetensors")
    records = export_int8(lambda engine: int8, (ExportTarget.PT2,), tmp_path, ExampleInputs((_tokens(4),)), Backend.X86)
    x = _tokens(5, seed=9)
    torch.save({"x": x, "y": int8(x)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_quant import load_int8, load_pt2
        from lightning_quant.quantization import flows
        from tests.quantization.flows.test_torchao import TokenNet
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for path in ({str(pt)!r}, {str(st)!r}):
            model = load_int8(TokenNet(), path)
            assert torch.equal(model(expected["x"]), expected["y"]), path
            layers = flows.int8_layers(model)
            assert layers == {{"emb": "int8", "attn.out_proj": "float", "fc1": "int4", "fc2": "int4"}}, layers
        program = load_pt2({str(records["pt2"].path)!r})
        assert torch.equal(program(expected["x"]), expected["y"]), "pt2"
        """
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- torchao's post-training algorithms
class OutlierNet(nn.Module):
    """Two Linear layers fed activations with a few outlier channels: what AWQ and SmoothQuant are for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 32)
        self.gain = nn.Parameter(torch.ones(128), requires_grad=False)
        self.gain.data[:4] = 30.0  # four channels 30x the rest, as in LLM activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x * self.gain)))


def _relative_error(model: nn.Module, int8: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = model(x)
        return float((int8(x) - reference).abs().mean() / reference.abs().mean())


@pytest.mark.parametrize(("algorithm", "scheme"), [("awq", "int8_dyn_int8_weight"), ("smoothquant", None)])
def test_an_algorithm_runs_on_the_calibration_batches_and_beats_round_to_nearest(algorithm, scheme):
    from lightning_quant import TorchaoRecipe

    model = OutlierNet().eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(16, 128, generator=g) for _ in range(4)]
    x = torch.randn(64, 128, generator=g)
    rtn = quantize(model, recipe=TorchaoRecipe("int8_dyn_int8_weight"))
    tuned = quantize(model, calibration, recipe=TorchaoRecipe(scheme, algorithm=algorithm), progress=False)
    weight = tuned.fc1.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.act_pre_scale is not None  # the algorithm's scales
    assert _relative_error(model, tuned, x) < 0.7 * _relative_error(model, rtn, x)  # measured: about half
    assert _relative_error(model, tuned, x) < 0.02
    with pytest.raises(ValueError, match=f"algorithm='{algorithm}' needs calibration_data"):
        quantize(model, recipe=TorchaoRecipe(scheme, algorithm=algorithm))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algorithm": "gptq"}, r"algorithm='gptq' does not run here: torchao 0.18's GPTQ rounds on CUDA only"),
        (
            {"config": "int4_weight_only", "algorithm": "awq"},
            r"algorithm='awq' with scheme='int4_weight_only' does not exist here: .* run on CUDA only.* The pairs "
            r"that run: awq: \['int8_weight_only', 'int8_dyn_int8_weight'\]; smoothquant: \['int8_dyn_int8_weight'\]",
        ),
        (
            {"config": "int8_weight_only", "algorithm": "smoothquant"},
            r"algorithm='smoothquant' with scheme='int8_weight_only' does not exist here: .* needs a scheme with "
            "int8 activations",
        ),
        ({"algorithm": "awq", "backend": "xnnpack"}, r"backend='xnnpack' converts to intx tensors, which take none"),
        ({"algorithm": "rtn"}, r"algorithm must be one of \('awq', 'smoothquant', 'gptq'\), got 'rtn'"),
        (
            {"algorithm": "awq", "layers": {"fc1": "int4"}},
            r"layers\['fc1'\] asks for 'int4' weights, which algorithm='awq' cannot give",
        ),
    ],
)
def test_an_algorithm_and_scheme_pair_that_does_not_exist_is_refused_with_the_reason(options, message):
    from lightning_quant import TorchaoRecipe

    with pytest.raises(ValueError, match=message):
        recipe = TorchaoRecipe(**options)
        quantize(OutlierNet(), [torch.randn(4, 128)], recipe=recipe)


def test_an_algorithm_is_refused_by_qat_and_off_the_torchao_flow():
    from lightning_quant import QuantizationAwareTraining, TorchaoRecipe

    with pytest.raises(ValueError, match=r"algorithm='awq' is a post-training algorithm .* PostTrainingQuantization"):
        QuantizationAwareTraining(TorchaoRecipe(algorithm="awq"))
    with pytest.raises(ValueError, match=r"algorithm='smoothquant' is torchao's \(flow='torchao'\), but flow='fx'"):
        QuantizationConfig(flow="fx", algorithm="smoothquant")

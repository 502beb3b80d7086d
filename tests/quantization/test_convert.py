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


def test_qat_fusion_survives_lightnings_sync_batchnorm_conversion_and_converts():
    """Trainer(sync_batchnorm=True) swaps SyncBatchNorm in after QAT prepared the model (torch runs
    SyncBatchNorm training on GPUs only, so this checks the structure, the freeze and the conversion)."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
    from torch.ao.nn.intrinsic.qat import ConvBnReLU2d

    from lightning_quant.quantization.schedule import fake_quantizers, set_bn_frozen
    from tests.helpers import TinyNet

    torch.manual_seed(0)
    x = torch.randn(16, 1, 6, 6)
    prepared = get_flow("fx").prepare(TinyNet().train(), QuantizationConfig(), ExampleInputs((x,)), qat=True)
    prepared(x)
    before = len(fake_quantizers(prepared))
    synced = TorchSyncBatchNorm().apply(prepared)  # what Lightning does in DDPStrategy.setup
    fused = [m for m in synced.modules() if isinstance(m, ConvBnReLU2d)]
    assert len(fused) == 1 and type(fused[0].bn) is torch.nn.SyncBatchNorm
    assert len(fake_quantizers(synced)) == before
    set_bn_frozen(synced, True)
    assert fused[0].freeze_bn and not fused[0].bn.training
    synced(x)  # training step with frozen statistics: no synchronisation needed
    with torch.no_grad():
        fake = synced.eval()(x)
        with quantized_engine("x86"):
            int8 = convert_copy(synced, "fx", "x86")(x)
    assert (int8 - fake).abs().max() < 0.1 * fake.abs().max()


def test_compiled_runner_lifts_deterministic_mode_inside_each_call_and_restores_it():
    """Under deterministic mode Inductor's code ran 200x slower here; serving is timed without it."""
    from lightning_quant.quantization.convert import compiled_runner
    from lightning_quant.quantization.inputs import ExampleInputs

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.are_deterministic_algorithms_enabled()))
    torch.use_deterministic_algorithms(True, warn_only=True)
    x = torch.randn(2, 4)
    run = compiled_runner(model)
    out = run(ExampleInputs((x,)))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    torch.testing.assert_close(out, model(x))
    assert seen and not any(seen[:1])  # the compiled call ran (and was traced) with the mode lifted


def test_compiled_runner_keeps_a_graph_per_batch_size_and_raises_past_its_limit(monkeypatch):
    """Past dynamo's recompile limit torch runs the model eagerly without a word; a compiled runner keeps a graph
    for each of many batch sizes (past dynamo's default of 8) and raises past its own limit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lightning_quant.quantization import convert
    from lightning_quant.quantization.inputs import ExampleInputs

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    run = convert.compiled_runner(model)
    torch._dynamo.reset()
    counters.clear()
    for bs in range(1, 11):  # ten graphs: more than dynamo's default limit
        x = torch.randn(bs, 4)
        torch.testing.assert_close(run(ExampleInputs((x,))), model(x))
    assert counters["stats"]["unique_graphs"] == 10  # each batch size ran compiled, none eagerly
    torch._dynamo.reset()
    monkeypatch.setattr(convert, "RECOMPILE_LIMIT", 2)
    with torch._dynamo.config.patch(recompile_limit=2):  # the config's own patch: its names are not attributes
        run = convert.compiled_runner(model)
        run(ExampleInputs((torch.randn(1, 4),)))
        run(ExampleInputs((torch.randn(2, 4),)))
        with pytest.raises(Exception, match="recompile"):
            run(ExampleInputs((torch.randn(3, 4),)))
    torch._dynamo.reset()


def test_compiled_runner_freezes_a_graph_dynamo_compiles_for_another_thread_count():
    """dynamo recompiles when the thread count changes; that graph must get Inductor's int8 kernels too (with
    freezing set only while compiling a new batch size, the perf CNN's pt2e program ran at fp32 speed on 2 threads
    after a 1-thread run)."""
    pytest.importorskip("torchao")
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lightning_quant.quantization.convert import compiled_runner

    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    config = QuantizationConfig(flow="pt2e", backend="x86")
    prepared = get_flow("pt2e").prepare(TinyNet().eval(), config, ExampleInputs((x,)), qat=False)
    prepared(x)
    int8 = convert_copy(prepared, "pt2e", config.engine)
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    counters.clear()
    run = compiled_runner(int8)
    try:
        lowered = []
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.testing.assert_close(run(ExampleInputs((x,))), int8(x), atol=0.05, rtol=0)
            lowered.append(counters["inductor"]["qconv_unary_lower_count"])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert lowered[0] >= 1 and lowered[1] > lowered[0]  # both graphs run Inductor's int8 convolution


@pytest.mark.parametrize("flow", ["fx", "eager"])
def test_int8_weights_are_the_weights_qat_trained_with(flow):
    """Conversion quantizes each weight with the scale its fake quantizer last used: torch's own
    convert asks the observer again, whose per-channel symmetric scale differs by up to 0.4%."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 6, 6)
    prepared = get_flow(flow).prepare(TinyNet(), QuantizationConfig(flow=flow), ExampleInputs((x,)), qat=True)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for step in range(3):
        loss = prepared(torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(step))).square().mean()
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    prepared.eval()
    quantizers = {name: m for name, m in prepared.named_modules() if name.endswith("weight_fake_quant")}
    observer_scales = {name: m.calculate_qparams()[0] for name, m in quantizers.items()}
    assert any(not torch.allclose(m.scale, observer_scales[name]) for name, m in quantizers.items())
    int8 = convert_copy(prepared, flow, "x86")
    int8_layers = dict(int8.named_modules())
    checked = 0
    for name, fake_quantizer in quantizers.items():
        layer = name.removesuffix(".weight_fake_quant")
        owner = dict(prepared.named_modules())[layer]
        weight = owner.weight
        if hasattr(owner, "bn"):  # a fused Conv-BN folds the BatchNorm into the weight it fake-quantizes
            weight = weight * (owner.bn.weight / torch.sqrt(owner.bn.running_var + owner.bn.eps)).reshape(-1, 1, 1, 1)
        scale = fake_quantizer.scale.reshape(-1, *[1] * (weight.dim() - 1))
        expected = torch.clamp(torch.round(weight.detach() / scale), -128, 127)
        int8_weight = int8_layers[layer].weight()
        assert torch.allclose(int8_weight.q_per_channel_scales().float(), fake_quantizer.scale)
        assert (int8_weight.int_repr().float() != expected).float().mean() < 0.01, "rounding ties only"
        checked += 1
    assert checked == 2


def test_single_signed_weight_rows_keep_a_symmetric_zero_point():
    """torch's fused fake quantizer gives an all-positive weight row an affine zero point (-128);
    int8 kernels for symmetric weights ignore it, so that row converts with the observer's pair."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([0.5, 0.2, 0.3])  # single-signed row
    x = torch.randn(16, 3)
    prepared = get_flow("fx").prepare(model, QuantizationConfig(), ExampleInputs((x,)), qat=True)
    prepared(x)
    prepared.eval()
    fake_quantizer = prepared.get_submodule("0").weight_fake_quant
    assert fake_quantizer.zero_point[0] != 0 and torch.all(fake_quantizer.zero_point[1:] == 0)
    int8 = convert_copy(prepared, "fx", "x86")
    weight = int8.get_submodule("0").weight()
    assert torch.all(weight.q_per_channel_zero_points() == 0)
    observer_scale, _ = fake_quantizer.activation_post_process.calculate_qparams()
    assert torch.allclose(weight.q_per_channel_scales()[0].float(), observer_scale[0])
    assert torch.allclose(weight.q_per_channel_scales()[1:].float(), fake_quantizer.scale[1:])
    with quantized_engine("x86"), torch.no_grad():
        assert torch.nn.functional.cosine_similarity(int8(x).flatten(), prepared(x).flatten(), dim=0) > 0.999


def test_convert_copy_keeps_named_layers_float_on_fx_and_refuses_other_flows():
    x = torch.randn(8, 1, 6, 6)
    prepared = get_flow("fx").prepare(TinyNet(), QuantizationConfig(), ExampleInputs((x,)), qat=True)
    prepared(x)
    int8 = convert_copy(prepared, "fx", "x86", keep_float=["head"])
    assert type(int8.head) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"cannot keep \['tail'\] float: not layers of the prepared model"):
        convert_copy(prepared, "fx", "x86", keep_float=["tail"])
    eager = get_flow("eager").prepare(TinyNet(), QuantizationConfig(flow="eager"), ExampleInputs((x,)), qat=True)
    eager(x)
    with pytest.raises(
        ValueError, match=r"keep_float=\['head'\] needs flow='fx' .* got flow='eager': prepare with layers="
    ):
        convert_copy(eager, "eager", "x86", keep_float=["head"])

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

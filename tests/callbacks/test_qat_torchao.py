"""QuantizationAwareTraining(flow="torchao") in a real Trainer: the shared behaviours of every flow
(schedule, evaluation, convert-and-fit-again, checkpoints, resume, distillation, the report, PTQ),
on a Linear model torchao's schemes quantize."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quant import (
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationReport,
    load_int8,
)
from lightning_quant.quantization.flows import int8_layers
from lightning_quant.quantization.schedule import is_prepared
from tests.helpers import (
    BoringClassifier,
    TinyMLP,
    assert_same_state,
    fake_quant_flags,
    quiet_trainer,
    random_images,
    requires_torchao,
)

pytestmark = requires_torchao


def _model() -> BoringClassifier:
    return BoringClassifier(net=TinyMLP(), lr=0.05)


def _qat(**kwargs) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(**{"flow": "torchao", "group_size": 4, "export": None, **kwargs})


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a, b, suffix):
    return any(not torch.equal(a[k], b[k]) for k in a if k.endswith(suffix))


class _Spy(Callback):
    def __init__(self) -> None:
        self.start, self.end, self.flags, self.float_match = {}, {}, {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.start[epoch] = _state(pl_module.net)
        self.flags[epoch] = fake_quant_flags(pl_module.net)
        # whether the net computes what its float twin (same weights, no fake quantization) computes
        device = next(pl_module.net.parameters()).device
        float_twin = TinyMLP().to(device)
        float_twin.load_state_dict({k: v for k, v in pl_module.net.state_dict().items() if "fake_quant" not in k})
        x = random_images(8, seed=5).tensors[0].to(device)
        with torch.no_grad():
            pl_module.net.eval(), float_twin.eval()
            self.float_match[epoch] = torch.equal(pl_module.net(x), float_twin(x))
            pl_module.net.train()

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = _state(pl_module.net)


def test_torchao_qat_schedule_points_hold():
    spy = _Spy()
    quiet_trainer(callbacks=[_qat(quant_start_epoch=1, freeze_bn_epoch=2), spy], max_epochs=3).fit(_model())
    # warm-up in float, then fake quantization on (ranges come from each tensor: "observing" throughout)
    assert spy.flags == {0: {(False, False)}, 1: {(True, True)}, 2: {(True, True)}}
    assert spy.float_match == {0: True, 1: False, 2: False}
    assert _changed(spy.start[1], spy.end[1], "running_mean")
    assert not _changed(spy.start[2], spy.end[2], "running_mean")  # BN frozen from epoch 2
    assert _changed(spy.start[2], spy.end[2], "fc1.weight")  # weights still train


def test_torchao_qat_refuses_freeze_observers_epoch():
    with pytest.raises(ValueError, match=r"freeze_observers_epoch=2, but flow='torchao' has no observers to freeze"):
        _qat(freeze_observers_epoch=2)


def test_torchao_qat_evaluation_changes_nothing_and_restores_the_switches():
    callback = _qat()
    model = _model()
    trainer = quiet_trainer(callbacks=[callback], num_sanity_val_steps=2, max_epochs=1)
    trainer.fit(model)
    before, flags = _state(model.net), fake_quant_flags(model.net)
    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    trainer.predict(model)
    assert_same_state(before, _state(model.net))
    assert fake_quant_flags(model.net) == flags == {(True, True)}


def test_torchao_qat_converts_a_copy_and_fit_can_run_again(tmp_path):
    callback = _qat(export=("state_dict", "safetensors"), export_dir=tmp_path)
    model = _model()
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    qat_net = model.net
    assert is_prepared(qat_net) and callback.quantized_model is not qat_net
    assert int8_layers(callback.quantized_model) == {"fc1": "int4", "head": "int4"}
    x = random_images(16, seed=7).tensors[0]
    with torch.no_grad():
        fake = qat_net.eval()(x)
        int8 = callback.quantized_model(x)
    torch.testing.assert_close(int8, fake, rtol=0, atol=2e-3 * float(fake.abs().max()))
    # both files reload bit-identical into a fresh float net
    for target in ("state_dict", "safetensors"):
        assert callback.export_records[target].max_abs_diff == 0.0
        loaded = load_int8(TinyMLP(), callback.export_paths[target])
        assert torch.equal(loaded(x), int8)
    first = callback.quantized_model
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    assert model.net is qat_net and callback.quantized_model is not first


def test_torchao_qat_test_from_checkpoint_of_a_fresh_model(tmp_path):
    seed_everything(0)
    model = _model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(callbacks=[_qat(), checkpoint], enable_checkpointing=True, max_epochs=2).fit(model)
    fresh = _model()
    quiet_trainer(callbacks=[_qat()]).test(fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert_same_state(_state(model.net), _state(fresh.net))


def test_torchao_qat_checkpoint_of_another_scheme_is_refused_naming_it(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(callbacks=[_qat(), checkpoint], enable_checkpointing=True).fit(_model())
    trainer = quiet_trainer(callbacks=[_qat(scheme="int8_dyn_int8_weight")])
    with pytest.raises(ValueError, match=r"trained with .*'scheme': None.*these differ: \['scheme'\]"):
        trainer.test(_model(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)


class _CrashAt(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("range_learning", [False, True])
def test_torchao_qat_crash_then_resume_matches_an_uninterrupted_run(range_learning, tmp_path):
    from lightning_quant import QATSchedule, TorchaoRecipe

    def callback():
        if range_learning:  # the learned scales and their pending flag come back from the checkpoint
            recipe = TorchaoRecipe("int8_dyn_int4_weight", group_size=4, range_learning=True)
            return QuantizationAwareTraining(recipe, QATSchedule(quant_start_epoch=1, freeze_bn_epoch=2), export=None)
        return _qat(quant_start_epoch=1, freeze_bn_epoch=2)

    seed_everything(0)
    reference = _model()
    quiet_trainer(callbacks=[callback()], max_epochs=3).fit(reference)
    seed_everything(0)
    crashed = _model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_trainer(callbacks=[callback(), checkpoint, _CrashAt()], enable_checkpointing=True, max_epochs=3).fit(
            crashed
        )
    resumed = _model()
    quiet_trainer(callbacks=[callback()], max_epochs=3).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    for key, value in reference.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_torchao_qat_with_distillation_and_the_report(tmp_path):
    seed_everything(0)
    report = QuantizationReport(report_dir=tmp_path / "report", batch_sizes=(1,))
    callbacks = [_qat(), KnowledgeDistillation(alpha=0.5), report]
    model = _model()
    quiet_trainer(callbacks=callbacks, max_epochs=2).fit(model)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    layers = {row["name"]: row for row in written["layers"]}
    assert set(layers) >= {"fc1", "head"}
    assert all(10 < row["sqnr_db"] < 80 for row in layers.values() if row["name"] in ("fc1", "head"))
    assert 0.0 <= written["metric"]["int8"] <= 1.0


@pytest.mark.parametrize(("mode", "precision"), [("weight_only", "int8"), ("dynamic", "int8")])
def test_torchao_ptq_callback_quantizes_after_validation(mode, precision, tmp_path):
    seed_everything(0)
    model = _model()
    quiet_trainer(max_epochs=2).fit(model)
    callback = PostTrainingQuantization(mode=mode, flow="torchao", export_dir=tmp_path)
    quiet_trainer(callbacks=[callback]).validate(model, verbose=False)
    assert int8_layers(callback.quantized_model) == {"fc1": precision, "head": precision}
    assert callback.export_records["state_dict"].max_abs_diff == 0.0
    x = random_images(16, seed=7).tensors[0]
    model.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(callback.quantized_model(x), model.net(x), rtol=0, atol=0.05)


# ---------------------------------------------------------------------- torchao's own config objects
def _int4_weights():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(4))


def _float_outputs(model: BoringClassifier, x: torch.Tensor) -> torch.Tensor:
    from lightning_quant import quantization_disabled

    with torch.no_grad(), quantization_disabled(model.net):
        return model.net.eval()(x)


def test_a_torchao_config_object_passes_straight_through_qat(tmp_path):
    from torchao.quantization.qat import QATConfig

    seed_everything(0)
    for recipe in (_int4_weights(), QATConfig(_int4_weights(), step="prepare")):
        callback = QuantizationAwareTraining(recipe=recipe, export=["state_dict"], export_dir=tmp_path)
        assert (callback.config.flow.value, callback.config.scheme.value, callback.config.group_size) == (
            "torchao",
            "int4_weight_only",
            4,
        )
        model = _model()
        quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
        assert int8_layers(callback.quantized_model) == {"fc1": "int4", "head": "int4"}
        weight = callback.quantized_model.fc1.weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.block_size == (1, 4)  # as configured
        x = random_images(16, seed=7).tensors[0]
        from lightning_quant.quantization.outputs import mean_cosine

        with torch.no_grad():
            int4 = callback.quantized_model(x)
        assert mean_cosine(int4, _float_outputs(model, x)) > 0.98
        reloaded = load_int8(TinyMLP(), callback.export_paths["state_dict"])
        with torch.no_grad():
            assert torch.equal(reloaded(x), int4)


def test_a_torchao_config_object_passes_straight_through_ptq():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    from lightning_quant import quantize
    from lightning_quant.quantization.outputs import mean_cosine

    recipe = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(4))
    callback = PostTrainingQuantization(recipe=recipe, export=None, progress=False)
    assert callback.mode.value == "dynamic"  # the config's activations decide the mode
    model = _model()
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    x = random_images(16, seed=7).tensors[0]
    with torch.no_grad():
        assert int8_layers(callback.quantized_model) == {"fc1": "int4", "head": "int4"}
        assert mean_cosine(callback.quantized_model(x), _float_outputs(model, x)) > 0.98
        net = TinyMLP().eval()
        direct = quantize(net, recipe=_int4_weights())
        assert int8_layers(direct) == {"fc1": "int4", "head": "int4"}
        assert mean_cosine(direct(x), net(x)) > 0.98


def test_a_torchao_config_this_flow_cannot_run_is_refused_at_construction():
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.qat import QATConfig

    with pytest.raises(ValueError, match=r"recipe=Int4WeightOnlyConfig\(...\) is not one of the torchao configs this"):
        PostTrainingQuantization(recipe=Int4WeightOnlyConfig())
    with pytest.raises(ValueError, match=r"recipe=QATConfig\(...\) without a base_config"):
        QuantizationAwareTraining(
            recipe=QATConfig(activation_config=None, weight_config=_fake_weight(), step="prepare")
        )
    with pytest.raises(
        ValueError, match=r"runs on flow='torchao': leave flow out \(or flow='torchao'\), got flow='pt2e'"
    ):
        QuantizationAwareTraining(recipe=_int4_weights(), flow="pt2e")
    with pytest.raises(ValueError, match=r"layers=\['fc1'\] may only keep layers 'float'"):
        QuantizationAwareTraining(recipe=_int4_weights(), layers={"fc1": "int8"})
    with pytest.raises(ValueError, match=r"got recipe=IntxWeightOnlyConfig\(...\) and \['scheme'\]"):
        QuantizationAwareTraining(recipe=_int4_weights(), scheme="int8_weight_only")
    with pytest.raises(ValueError, match=r"recipe=Int8WeightOnlyConfig\(...\) has no QAT in torchao's QATConfig"):
        QuantizationAwareTraining(recipe=Int8WeightOnlyConfig())


def _fake_weight():
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int4, group_size=4)


# ---------------------------------------------------------------- learned ranges (torchao's range_learning)
def _learned(**schedule) -> QuantizationAwareTraining:
    from lightning_quant import TorchaoRecipe

    return QuantizationAwareTraining(
        TorchaoRecipe("int8_dyn_int4_weight", group_size=4, range_learning=True), schedule or None, export=None
    )


class _RangeSpy(Callback):
    """At the step fake quantization starts: fc1's weight before the step, and its quantizer's scale after the
    forward (before the optimizer moves it)."""

    def __init__(self, start: int) -> None:
        self.start, self.seen = start, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start:
            self.seen["weight"] = pl_module.net.fc1.weight.detach().clone()

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.start:
            self.seen["scale"] = pl_module.net.fc1.weight_fake_quantizer.scale.detach().clone()


def test_range_learning_trains_the_scales_and_converts_with_them():
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    seed_everything(0)
    model = _model()
    qat = _learned(quant_start_step=3)
    spy = _RangeSpy(3)
    trainer = quiet_trainer(callbacks=[qat, spy], max_epochs=3)
    trainer.fit(model)
    quantizer = model.net.fc1.weight_fake_quantizer
    assert isinstance(quantizer.scale, nn.Parameter) and quantizer.scale.requires_grad
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(quantizer.scale) in optimized  # there before configure_optimizers: the user's optimizer trains it
    # set from the weights as they were when fake quantization started (step 3), then moved by the optimizer
    fresh = IntxFakeQuantizer(
        type(quantizer.config)(dtype=quantizer.config.dtype, granularity=quantizer.config.granularity)
    )
    fresh(spy.seen["weight"])
    torch.testing.assert_close(spy.seen["scale"], fresh.scale, rtol=0, atol=1e-7)
    assert (quantizer.scale.detach() - spy.seen["scale"]).abs().max() > 1e-3
    # the int8 model holds the learned scales, and gives the fake-quantized model's outputs
    int8_weight = qat.quantized_model.fc1.weight
    torch.testing.assert_close(int8_weight.scale.float().reshape(-1), quantizer.scale.detach().reshape(-1))
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(qat.quantized_model(x), model.net.eval()(x), rtol=0, atol=1e-4)
    assert "fc1.weight_fake_quantizer.scale" in model.net.state_dict()  # checkpoints and resume carry them


def test_learned_scales_stay_positive_under_a_learning_rate_that_would_push_them_past_zero():
    seed_everything(0)
    model = BoringClassifier(net=TinyMLP(), lr=2.0)  # SGD steps far larger than the scales (about 0.02)
    qat = _learned()
    quiet_trainer(callbacks=[qat], max_epochs=2).fit(model)
    scales = [m.weight_fake_quantizer.scale.detach() for m in (model.net.fc1, model.net.head)]
    assert all(float(s.min()) > 0 for s in scales)
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():  # the converted model holds the same (positive) scales the fake-quantized model trained
        torch.testing.assert_close(qat.quantized_model(x), model.net.eval()(x), rtol=0, atol=1e-4)


def test_range_learning_with_no_layer_that_takes_learned_ranges_is_refused_before_training():
    from lightning_quant import TorchaoRecipe

    qat = QuantizationAwareTraining(TorchaoRecipe("int8_dyn_int8_weight", range_learning=True), export=None)
    model = _model()
    before = _state(model.net)
    with pytest.raises(ValueError, match=r"range_learning=True, but no layer can take learned ranges"):
        quiet_trainer(callbacks=[qat], max_epochs=1).fit(model)
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items() if k in before)


def test_range_learning_is_refused_after_training_and_off_torchao():
    from lightning_quant import FxRecipe, TorchaoRecipe
    from lightning_quant.quantization.config import QuantizationConfig

    with pytest.raises(ValueError, match=r"range_learning=True trains each weight's scales with the optimizer"):
        PostTrainingQuantization(TorchaoRecipe("int8_dyn_int4_weight", range_learning=True))
    with pytest.raises(ValueError, match=r"range_learning=True is torchao's QAT \(flow='torchao'\), but flow='fx'"):
        QuantizationConfig(flow="fx", range_learning=True)
    with pytest.raises(TypeError, match=r"range_learning must be True or False, got 'yes'"):
        QuantizationConfig(flow="torchao", range_learning="yes")
    assert not hasattr(FxRecipe(), "range_learning")
    from torchao.quantization import IntxWeightOnlyConfig

    with pytest.raises(ValueError, match=r"range_learning=True with recipe=IntxWeightOnlyConfig\(...\): a torchao"):
        QuantizationConfig(flow="torchao", recipe=IntxWeightOnlyConfig(), range_learning=True)

"""QuantizationAwareTraining in a real Trainer: preparation, schedule, evaluation, resume, export."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import FxTracingError, QuantizationAwareTraining
from lightning_quant.quantization.flows import int8_layers
from lightning_quant.quantization.flows.eager import FloatIsland
from lightning_quant.quantization.schedule import fake_quantizers, is_prepared
from tests.helpers import (
    FLOWS,
    BoringClassifier,
    TinyNet,
    TwoInputClassifier,
    TwoInputNet,
    assert_same_state,
    bn_frozen_flags,
    fake_quant_flags,
    quant_state,
    quiet_trainer,
    random_images,
    refused_before_training,
    requires_torchao,
)


# ---------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"backend": "arm"},
            ValueError,
            r"backend must be one of \('x86', 'fbgemm', 'qnnpack', 'xnnpack'\), got 'arm'",
        ),
        ({"flow": "graph"}, ValueError, r"flow must be one of \('fx', 'eager', 'pt2e', 'torchao'\), got 'graph'"),
        (
            {"observer": "ema"},
            ValueError,
            r"observer must be one of \('moving_average', 'minmax', 'histogram'\), got 'ema'",
        ),
        ({"quant_start_epoch": -1}, ValueError, r"quant_start_epoch must be a non-negative int, got -1"),
        ({"freeze_bn_epoch": 1.5}, ValueError, r"freeze_bn_epoch must be a non-negative int or None, got 1.5"),
        (
            {"quant_start_epoch": 2, "freeze_observers_epoch": 2},
            ValueError,
            r"freeze_observers_epoch must be after quant_start_epoch so observers see at least one epoch of data, "
            r"got freeze_observers_epoch=2 and quant_start_epoch=2",
        ),
        ({"convert_on_fit_end": "yes"}, TypeError, r"convert_on_fit_end must be True or False, got 'yes'"),
        ({"batch_to_input": 3}, TypeError, r"batch_to_input must be a callable or None, got 3"),
        (
            {"flow": "eager", "keep_diverging_float": True},
            ValueError,
            r"keep_diverging_float=True needs flow='fx' \(its conversion can leave layers float after training\), "
            r"got flow='eager': leave it out",
        ),
        ({"keep_diverging_float": 1}, TypeError, r"keep_diverging_float must be True or False, got 1"),
        (
            {"export": "tflite"},
            ValueError,
            r"each export target must be one of \('torchscript', 'mobile', 'onnx', 'pt2', 'executorch', "
            r"'state_dict', 'safetensors', 'hf', 'aoti'\), got 'tflite'",
        ),
    ],
)
def test_qat_raises_on_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationAwareTraining(**kwargs)


def test_qat_raises_when_max_steps_ends_before_quantization_starts():
    # 64 samples in batches of 16: 4 optimizer steps per epoch; epoch 1 starts at step 4
    refused_before_training(
        BoringClassifier(),
        ValueError,
        match=r"max_steps=4 ends the fit in epoch 0 \(4 optimizer steps per epoch\), before quant_start_epoch=1: the "
        r"model would never be quantized; raise max_steps above 4 or lower quant_start_epoch",
        callbacks=[QuantizationAwareTraining(quant_start_epoch=1)],
        max_epochs=5,
        max_steps=4,
    )
    quiet_trainer(
        callbacks=[QuantizationAwareTraining(quant_start_epoch=1, export=None)], max_epochs=5, max_steps=5
    ).fit(BoringClassifier())


def test_qat_raises_on_an_export_dir_that_is_a_file_before_training(tmp_path):
    blocker = tmp_path / "quantized"
    blocker.write_text("x")
    refused_before_training(
        BoringClassifier(),
        ValueError,
        match=r"export_dir='.*quantized' is a file, not a folder: choose a folder",
        callbacks=[QuantizationAwareTraining(export_dir=blocker)],
    )


def test_qat_eager_fusion_group_naming_a_missing_module_raises_before_training():
    qat = QuantizationAwareTraining(flow="eager", modules_to_fuse=[["features.0", "features.9"]])
    refused_before_training(
        BoringClassifier(),
        ValueError,
        match=r"modules_to_fuse group \['features.0', 'features.9'\] names \['features.9'\], which TinyNet does "
        r"not have; its modules include \['features', 'features.0'",
        callbacks=[qat],
    )


def test_qat_raises_when_quantization_would_never_start():
    refused_before_training(
        BoringClassifier(),
        ValueError,
        match=r"quant_start_epoch=2 is not before max_epochs=2: the model would never be "
        r"quantized; lower quant_start_epoch or raise max_epochs",
        callbacks=[QuantizationAwareTraining(quant_start_epoch=2)],
        max_epochs=2,
    )


def test_qat_raises_when_module_is_ambiguous():
    model = BoringClassifier()
    model.extra = nn.Linear(2, 2)
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining()])
    with pytest.raises(
        ValueError,
        match=r"module=None needs exactly one child module with parameters in "
        r"BoringClassifier to quantize, found \['net', 'extra'\]: set module=",
    ):
        trainer.fit(model)


def test_qat_raises_when_module_path_is_wrong():
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(module="backbone")])
    with pytest.raises(
        ValueError, match=r"module='backbone' is not a submodule of BoringClassifier; submodules: \['net'"
    ):
        trainer.fit(BoringClassifier())


def test_qat_raises_on_unknown_skip_entry_before_training():
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(skip=["nohead"])])
    model = BoringClassifier()
    with pytest.raises(ValueError, match=r"skip entry 'nohead' is neither a submodule of TinyNet"):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_qat_raises_on_unsupported_strategy():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining()])
    trainer._accelerator_connector.strategy = FSDPStrategy()  # what Trainer(strategy="fsdp") would set on GPUs
    callback = trainer.callbacks[0]
    trainer.strategy._lightning_module = None
    with pytest.raises(
        ValueError,
        match=r"supports single-device and DDP strategies, got FSDPStrategy: use strategy=\"ddp\" .* or, for QAT of "
        r"a torchao model too large for one process, ModelParallelStrategy\(data_parallel_size=N, "
        r"tensor_parallel_size=1\) with fully_shard",
    ):
        callback.setup(trainer, BoringClassifier(), "fit")


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
            return self.linear(x)
        return x


class _GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.gate = _Untraceable()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.gate(self.features(x)))


def test_qat_fx_tracing_error_names_the_module_and_remedies():
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining()])
    with pytest.raises(
        FxTracingError,
        match=r"FX could not trace submodule 'gate' \(_Untraceable\): .*"
        r"use flow=\"pt2e\" \(torch.export captures what FX cannot\), keep it in float with skip=\['gate'\], or "
        r"use flow=\"eager\"",
    ):
        trainer.fit(BoringClassifier(net=_GatedNet()))


def test_qat_skip_makes_untraceable_module_work_and_stay_float():
    callback = QuantizationAwareTraining(skip=["gate"], export=None)
    model = BoringClassifier(net=_GatedNet())
    quiet_trainer(callbacks=[callback]).fit(model)
    int8 = callback.quantized_model
    assert type(int8.gate.linear) is nn.Linear  # kept float
    assert "Quantized" in type(int8.head).__module__ or "quantized" in type(int8.head).__module__


# ---------------------------------------------------------------- preparation
class _OptimizerSpy(Callback):
    def on_train_start(self, trainer, pl_module):
        self.optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.model_params = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.prepared = is_prepared(pl_module.net)


def test_qat_prepares_before_the_optimizer_is_built():
    spy = _OptimizerSpy()
    quiet_trainer(callbacks=[QuantizationAwareTraining(export=None), spy], limit_train_batches=1).fit(
        BoringClassifier()
    )
    assert spy.prepared
    assert spy.optimizer_params == spy.model_params


def test_qat_swaps_modules_and_keeps_forward_unwrapped():
    model = BoringClassifier()
    quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)], limit_train_batches=1).fit(model)
    assert isinstance(model.net, torch.fx.GraphModule)
    assert "forward" not in vars(model.net)  # no closure on the instance
    assert "forward" not in vars(model)


def test_qat_silences_known_torch_warnings_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[QuantizationAwareTraining()], limit_train_batches=2).fit(BoringClassifier())
        warnings.warn("a user's own warning", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("torch.ao.quantization is deprecated" in m for m in messages)
    assert not any("reduce_range will be deprecated" in m for m in messages)
    assert "a user's own warning" in messages
    assert warnings.filters is not None and not any(
        f[0] == "ignore" and f[1] is not None and "torch\\.ao" in f[1].pattern for f in warnings.filters
    )


def test_qat_the_steps_call_wins_over_example_input_array():
    model = BoringClassifier()
    model.example_input_array = torch.zeros(2, 1, 6, 6)
    callback = QuantizationAwareTraining(export=None)
    quiet_trainer(callbacks=[callback], limit_train_batches=1).fit(model)
    first_x = next(iter(model.train_dataloader()))[0]
    assert torch.equal(callback.example_inputs.args[0], first_x)


class ManualClassifier(BoringClassifier):
    """Manual optimisation: the step asks for its optimizer before it calls the net, which it cannot do
    outside the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])  # no optimizer outside the loop
        x, y = batch
        loss = F.cross_entropy(self.net(x * 2.0), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_qat_example_input_array_is_used_when_the_step_cannot_run_outside_the_loop():
    model = ManualClassifier()
    model.example_input_array = torch.zeros(2, 1, 6, 6)
    callback = QuantizationAwareTraining(export=None)
    with pytest.warns(UserWarning, match=r"could not read how ManualClassifier.training_step calls the quantized"):
        quiet_trainer(callbacks=[callback], limit_train_batches=2).fit(model)
    # the first step in the loop is the real call: the same kinds of input, so the declared one is kept
    assert torch.equal(callback.example_inputs.args[0], model.example_input_array)


def test_qat_example_inputs_come_from_first_batch():
    model = BoringClassifier()
    callback = QuantizationAwareTraining(export=None)
    quiet_trainer(callbacks=[callback], limit_train_batches=1).fit(model)
    first_x = next(iter(model.train_dataloader()))[0]
    assert torch.equal(callback.example_inputs.args[0], first_x)


# ---------------------------------------------------------------- schedule
class _ScheduleSpy(Callback):
    def __init__(self) -> None:
        self.start, self.end, self.flags, self.freeze_bn = {}, {}, {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.start[epoch] = quant_state(pl_module.net)
        self.flags[epoch] = fake_quant_flags(pl_module.net)
        self.freeze_bn[epoch] = bn_frozen_flags(pl_module.net)

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = quant_state(pl_module.net)


def _changed(a, b, suffix):
    return any(not torch.equal(a[k], b[k]) for k in a if k.endswith(suffix))


@pytest.mark.parametrize("flow", FLOWS)
def test_qat_schedule_points_hold(flow):
    spy = _ScheduleSpy()
    callback = QuantizationAwareTraining(
        flow=flow, quant_start_epoch=1, freeze_bn_epoch=2, freeze_observers_epoch=3, export=None
    )
    quiet_trainer(callbacks=[callback, spy], max_epochs=4).fit(BoringClassifier())

    assert spy.flags == {0: {(False, False)}, 1: {(True, True)}, 2: {(True, True)}, 3: {(True, False)}}
    # warm-up: observers off, so no range is learnt; BN statistics do update
    assert all(torch.isinf(v).all() for k, v in spy.end[0].items() if k.endswith("min_val"))
    assert _changed(spy.start[0], spy.end[0], "running_mean")
    # quantizing: ranges move
    assert _changed(spy.start[1], spy.end[1], "scale")
    # BN frozen from epoch 2 on: running statistics constant
    assert spy.freeze_bn[1] == {False} and spy.freeze_bn[2] == {True} and spy.freeze_bn[3] == {True}
    for epoch in (2, 3):
        assert not _changed(spy.start[epoch], spy.end[epoch], "running_mean")
        assert not _changed(spy.start[epoch], spy.end[epoch], "running_var")
    # observers frozen from epoch 3 on: scales and zero points constant
    assert _changed(spy.start[2], spy.end[2], "scale")
    assert not _changed(spy.start[3], spy.end[3], "scale")
    assert not _changed(spy.start[3], spy.end[3], "zero_point")


def test_qat_plain_batchnorm_stays_frozen_after_validation():
    """Eager flow without fusion groups for a Linear->BN1d net leaves BN unfused: a float island
    (it has no int8 module), frozen like any BatchNorm."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.Flatten()
            self.fc = nn.Linear(36, 8)
            self.bn = nn.BatchNorm1d(8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.bn(self.fc(self.flat(x))))

    spy = _ScheduleSpy()
    callback = QuantizationAwareTraining(flow="eager", freeze_bn_epoch=1, export=None)
    model = BoringClassifier(net=Net())
    quiet_trainer(callbacks=[callback, spy], max_epochs=2, val_check_interval=2).fit(model)
    island = model.net.module.bn
    assert isinstance(island, FloatIsland)
    bn = island.module
    assert not bn.training
    assert not _changed(spy.start[1], spy.end[1], "running_mean")


# ---------------------------------------------------------------- evaluation never observes
@pytest.mark.parametrize("flow", FLOWS)
def test_qat_validate_test_predict_and_sanity_check_do_not_move_ranges(flow):
    class SanitySpy(Callback):
        def on_train_start(self, trainer, pl_module):
            self.min_vals = [
                float(m.activation_post_process.min_val)
                for m in fake_quantizers(pl_module.net)
                if m.activation_post_process.min_val.dim() == 0
            ]

    sanity = SanitySpy()
    callback = QuantizationAwareTraining(flow=flow, export=None)
    model = BoringClassifier()
    trainer = quiet_trainer(callbacks=[callback, sanity], num_sanity_val_steps=2, max_epochs=1)
    trainer.fit(model)
    assert sanity.min_vals and all(v == float("inf") for v in sanity.min_vals)  # nothing observed in the sanity check

    before = quant_state(model.net)
    flags = fake_quant_flags(model.net)
    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    trainer.predict(model)
    assert_same_state(before, quant_state(model.net))
    assert fake_quant_flags(model.net) == flags == {(True, True)}  # observers restored afterwards


# ---------------------------------------------------------------- convert keeps the QAT model
@pytest.mark.parametrize("flow", FLOWS)
def test_qat_convert_leaves_qat_model_trainable_and_fit_can_run_again(flow, tmp_path):
    callback = QuantizationAwareTraining(flow=flow, export=None)
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    qat_net = model.net
    assert is_prepared(qat_net) and qat_net.training
    first_int8 = callback.quantized_model
    assert first_int8 is not qat_net
    assert all(p.device.type == "cpu" for p in qat_net.parameters())

    weights_before = {k: v.clone() for k, v in qat_net.state_dict().items()}
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)  # same callback, same model: prepared once
    assert model.net is qat_net
    assert any(not torch.equal(weights_before[k], v) for k, v in qat_net.state_dict().items())
    assert callback.quantized_model is not first_int8


@pytest.mark.parametrize("flow", FLOWS)
def test_qat_test_from_checkpoint_of_fresh_model(flow, tmp_path):
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = BoringClassifier()
    quiet_trainer(
        callbacks=[QuantizationAwareTraining(flow=flow, export=None), checkpoint],
        enable_checkpointing=True,
        max_epochs=2,
    ).fit(model)
    fresh = BoringClassifier()
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(flow=flow, export=None)])
    trainer.test(fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert_same_state(quant_state(model.net), quant_state(fresh.net))
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, fresh.net.state_dict()[key]), key


# ---------------------------------------------------------------- the int8 model follows its fake-quant model
@pytest.mark.parametrize("flow", ["eager", *FLOWS])
def test_qat_int8_model_follows_its_fake_quant_model(flow):
    seed_everything(0)
    callback = QuantizationAwareTraining(flow=flow, export=None)
    model = BoringClassifier()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*agrees with the fake-quant model.*")
        quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    assert callback.fidelity is not None and callback.fidelity.ok
    assert callback.fidelity.cosine > 0.999 and callback.fidelity.layers == {}


def _coarse_head_conversion(monkeypatch):
    """Make conversion compute ``head`` differently from its fake quantization (as torch's kernels do
    for some ops), by rounding its int8 weights to a coarse grid, unless ``head`` is kept float."""
    from lightning_quant.callbacks import qat as qat_module

    convert = qat_module.convert_copy

    def coarse_head(prepared, flow, engine, keep_float=()):
        int8 = convert(prepared, flow, engine, keep_float)
        if "head" not in keep_float:
            weight = int8.head.weight().dequantize()
            coarse = torch.quantize_per_tensor(weight.sign() * weight.abs().mean(), 0.01, 0, torch.qint8)
            int8.head.set_weight_bias(coarse, int8.head.bias())
        return int8

    monkeypatch.setattr(qat_module, "convert_copy", coarse_head)


PARTS = r"agrees with the fake-quant model it was converted from only to cosine 0\.\d+ \(floor 0\.98\) on 2 batch\(es\)"


def test_qat_keeps_the_layer_where_int8_parts_from_fake_quant_float_and_says_so(monkeypatch, tmp_path):
    _coarse_head_conversion(monkeypatch)
    seed_everything(0)
    callback = QuantizationAwareTraining(export="torchscript", export_dir=tmp_path)
    match = (
        PARTS + r".*Where they part: head \(\+\d+\.\d dB\)\. kept \['head'\] float in the int8 model "
        r"\(keep_diverging_float\): cosine on batches that did not choose them 0\.\d+ -> (0\.99\d+|1\.0000)"
    )
    with pytest.warns(UserWarning, match=match):
        quiet_trainer(callbacks=[callback], max_epochs=1).fit(BoringClassifier())
    assert callback.fidelity is not None and callback.fidelity.ok and callback.fidelity.cosine > 0.999
    assert type(callback.quantized_model.head) is nn.Linear
    assert int8_layers(callback.quantized_model)["head"] == "float"
    scripted = torch.jit.load(str(callback.export_paths["torchscript"]))
    assert scripted.head.weight.dtype == torch.float32  # the file has it float too (an int8 Linear packs its weight)
    x = random_images(8, seed=5).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), callback.quantized_model(x), rtol=0, atol=1e-6)


def test_qat_with_keep_diverging_float_off_warns_naming_the_layer(monkeypatch):
    _coarse_head_conversion(monkeypatch)
    seed_everything(0)
    callback = QuantizationAwareTraining(export=None, keep_diverging_float=False)
    match = PARTS + r".*Where they part: head \(\+\d+\.\d dB\)\. to keep layers float, train again with layers="
    with pytest.warns(UserWarning, match=match):
        quiet_trainer(callbacks=[callback], max_epochs=1).fit(BoringClassifier())
    assert callback.fidelity is not None and not callback.fidelity.ok
    assert list(callback.fidelity.layers) == ["head"]
    assert int8_layers(callback.quantized_model)["head"] == "int8"


# ---------------------------------------------------------------- crash, then resume
class _CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class _PhaseSpy(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.first = getattr(self, "first", None) or (
            trainer.current_epoch,
            fake_quant_flags(pl_module.net),
            bn_frozen_flags(pl_module.net),
        )


def _schedule_callback(flow="fx"):
    return QuantizationAwareTraining(
        flow=flow, quant_start_epoch=1, freeze_bn_epoch=2, freeze_observers_epoch=3, export=None
    )


@pytest.mark.parametrize("flow", FLOWS)
def test_qat_crash_then_resume_matches_uninterrupted_run(flow, tmp_path):
    seed_everything(0)
    reference = BoringClassifier()
    quiet_trainer(callbacks=[_schedule_callback(flow)], max_epochs=4).fit(reference)

    seed_everything(0)
    crashed = BoringClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_trainer(
            callbacks=[_schedule_callback(flow), checkpoint, _CrashAt(3)], enable_checkpointing=True, max_epochs=4
        ).fit(crashed)

    resumed = BoringClassifier()
    spy = _PhaseSpy()
    callback = _schedule_callback(flow)
    quiet_trainer(callbacks=[callback, spy], max_epochs=4).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    # it resumed in epoch 3 with the schedule of epoch 3: observers frozen, BN frozen
    assert spy.first == (3, {(True, False)}, {True})
    for key, value in reference.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------- several inputs, keywords, both flows
@pytest.mark.parametrize("flow", ["eager", *FLOWS])
def test_qat_keyword_and_multi_input_model(flow, tmp_path):
    seed_everything(0)  # a 2-epoch model's int8 error varies with the seed: one, measured
    callback = QuantizationAwareTraining(
        flow=flow, export_dir=tmp_path, batch_to_input=lambda batch: {"x": batch[0][0], "extra": batch[0][1]}
    )
    model = TwoInputClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    (x, extra), _ = next(iter(model.val_dataloader()))
    with torch.no_grad():
        from lightning_quant.quantization.schedule import quantization_disabled

        with quantization_disabled(model.net):
            float_out = model.net.eval()(x, extra=extra)
    from lightning_quant.quantization.convert import quantized_engine

    with quantized_engine("x86"), torch.no_grad():
        int8_out = callback.quantized_model(x, extra=extra)
    assert int8_out.shape == (8, 4)
    assert (int8_out - float_out).abs().max() < 0.25 * float_out.abs().max()
    (record,) = callback.export_records.values()  # the flow's server file: torchscript or pt2
    assert record.path.exists() and record.max_abs_diff < 0.02 * float_out.abs().max()


# ---------------------------------------------------------------- outside fit, checkpoints, failures
def _val_loss(trainer, model):
    return trainer.validate(model, verbose=False)[0]["val_loss"]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_qat_outside_fit_leaves_a_float_model_float(stage):
    seed_everything(0)
    model = BoringClassifier()
    quiet_trainer(max_epochs=3).fit(model)  # a trained float model
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        expected = model(x)
    qat = QuantizationAwareTraining(export=None)
    trainer = quiet_trainer(callbacks=[qat])
    if stage == "predict":
        trainer.predict(model)
    else:
        getattr(trainer, stage)(model, verbose=False)
    assert not is_prepared(model.net) and type(model.net) is TinyNet
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert _val_loss(quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)]), model) == pytest.approx(
        _val_loss(quiet_trainer(), model)
    )


@pytest.mark.parametrize("flow", FLOWS)
def test_qat_checkpoint_validates_as_the_trained_qat_model(flow, tmp_path):
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = BoringClassifier()
    trainer = quiet_trainer(
        callbacks=[QuantizationAwareTraining(flow=flow, export=None), checkpoint],
        enable_checkpointing=True,
        max_epochs=2,
    )
    trainer.fit(model)
    trained = trainer.validate(model, verbose=False)[0]["val_loss"]
    fresh = BoringClassifier()
    qat = QuantizationAwareTraining(flow=flow, export=None)
    again = quiet_trainer(callbacks=[qat]).validate(fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert is_prepared(fresh.net) and again[0]["val_loss"] == pytest.approx(trained)
    qat.convert_and_export(quiet_trainer(), fresh)  # the QAT checkpoint to int8 without training
    assert int8_layers(qat.quantized_model)["head"] == "int8"


def test_qat_checkpoint_with_other_settings_names_them(tmp_path):
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(
        callbacks=[QuantizationAwareTraining(export=None, per_channel=False), checkpoint],
        enable_checkpointing=True,
        limit_train_batches=2,
    ).fit(BoringClassifier())
    with pytest.raises(
        ValueError,
        match=r"the checkpoint holds a QAT model of 'net' trained with \{'backend': 'x86', 'flow': 'fx', "
        r"'module': 'net', 'observer': 'moving_average', 'per_channel': False\}, but this QuantizationAwareTraining "
        r"is \{'backend': 'x86', 'flow': 'eager'.*create the callback with the checkpoint's settings to load it",
    ):
        quiet_trainer(callbacks=[QuantizationAwareTraining(export=None, flow="eager")]).validate(
            BoringClassifier(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False
        )


class _PoisonBatch(Callback):
    """Turns the inputs of one training batch into NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            batch[0].fill_(float("nan"))


def test_qat_nan_in_a_training_batch_is_named(tmp_path):
    with pytest.raises(Exception) as caught:
        quiet_trainer(callbacks=[_PoisonBatch(), QuantizationAwareTraining(export=None)], max_epochs=1).fit(
            BoringClassifier(batch_size=8)
        )
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    # batch 2's NaN inputs make the loss and then the weights NaN; fake quantization fails on batch 3
    assert (
        "lightning-quant: NaN or Inf reached fake quantization at training batch 3 of epoch 0, first in layer "
        "'features.0' (ConvBnReLU2d); the loss was first non-finite at training batch 2 of epoch 0" in notes
    ), f"{caught.value!r} {notes}"


# ---------------------------------------------------------------- the model's real call
class KeywordNet(nn.Module):
    """Called as ``net(img=x, extra=e)``; the batches hold only ``(x, y)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.side = nn.Linear(3, 8)
        self.head = nn.Linear(16, 4)

    def forward(self, img, extra):
        return self.head(torch.cat([torch.flatten(self.features(img), 1), self.side(extra)], dim=1))


class KeywordClassifier(BoringClassifier):
    def __init__(self) -> None:
        super().__init__(net=KeywordNet())

    def forward(self, x):
        extra = torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3))], dim=1)
        return self.net(img=x, extra=extra)


def test_qat_uses_the_real_call_for_exports_when_the_batch_shows_less(tmp_path):
    seed_everything(0)
    model = KeywordClassifier()
    qat = QuantizationAwareTraining(export=("torchscript", "onnx"), export_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is called with.*")  # read from the step: nothing to correct
        quiet_trainer(callbacks=[qat], max_epochs=2).fit(model)
    assert sorted(qat.example_inputs.kwargs) == ["extra", "img"]
    assert sorted(qat.export_paths) == ["onnx", "torchscript"] and all(
        r.max_abs_diff == 0 for r in [qat.export_records["torchscript"]]
    )


def test_qat_eager_quantizes_every_float_input_of_the_steps_call(tmp_path):
    seed_everything(0)
    model = KeywordClassifier()
    qat = QuantizationAwareTraining(flow="eager", export_dir=tmp_path)
    quiet_trainer(callbacks=[qat], max_epochs=2).fit(model)
    assert sorted(model.net.quant) == ["extra", "img"]  # one stub per float input of the real call
    x = random_images(16, seed=5).tensors[0]
    extra = torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3))], dim=1)
    loaded = torch.jit.load(qat.export_paths["torchscript"])
    with torch.no_grad():
        assert torch.equal(loaded(x, extra), qat.quantized_model(img=x, extra=extra))


class DoubleClassifier(BoringClassifier):
    def train_dataloader(self):
        x, y = random_images(self.n).tensors
        return DataLoader(TensorDataset(x.double(), y), batch_size=self.batch_size)


def test_qat_refuses_float64_inputs_at_setup():
    refused_before_training(
        DoubleClassifier(),
        ValueError,
        match=r"DoubleClassifier.training_step gives input 0 as float64: int8 quantization observes float32",
        callbacks=[QuantizationAwareTraining(export=None)],
    )


def test_qat_reused_on_a_second_model_takes_that_models_inputs():
    qat = QuantizationAwareTraining(export=None)
    quiet_trainer(callbacks=[qat], limit_train_batches=1).fit(BoringClassifier())
    assert qat.example_inputs.args[0].shape == (16, 1, 6, 6)
    quiet_trainer(callbacks=[qat], limit_train_batches=1).fit(TwoInputClassifier())
    example = qat.example_inputs
    assert [tuple(a.shape) for a in (*example.args, *example.kwargs.values())] == [(8, 1, 6, 6), (8, 3)]


class DictBatchClassifier(BoringClassifier):
    """Batches are dicts with a ``labels`` key the net does not take."""

    def __init__(self) -> None:
        super().__init__(net=TwoInputNet())

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["x"], extra=batch["extra"]), batch["labels"])

    def train_dataloader(self):
        x, y = random_images(32).tensors
        rows = [{"x": a, "extra": torch.randn(3), "labels": b} for a, b in zip(x, y)]
        return DataLoader(rows, batch_size=8)


def test_qat_reads_a_dict_batch_as_the_step_does():
    qat = QuantizationAwareTraining(export=None)
    quiet_trainer(callbacks=[qat], limit_train_batches=2, limit_val_batches=0).fit(DictBatchClassifier())
    # as training_step calls it: x by position, extra by keyword; the batch's labels are not an input
    assert len(qat.example_inputs.args) == 1 and sorted(qat.example_inputs.kwargs) == ["extra"]


def test_qat_refuses_a_dict_batch_with_keys_the_forward_does_not_take_when_it_must_guess():
    class Guessed(DictBatchClassifier):
        def training_step(self, batch, batch_idx):
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])  # not outside the loop: guessed
            return super().training_step(batch, batch_idx)

    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)])
    with (
        pytest.warns(UserWarning, match="could not read how Guessed.training_step"),
        pytest.raises(
            ValueError,
            match=r"the first fit batch is a mapping whose keys \['labels'\] are not arguments of "
            r"TwoInputNet.forward\(x, extra\), so they cannot be passed to it: drop them from the batch, or pass "
            r"batch_to_input=",
        ),
    ):
        trainer.fit(Guessed())
    qat = QuantizationAwareTraining(export=None, batch_to_input=lambda b: {"x": b["x"], "extra": b["extra"]})
    quiet_trainer(callbacks=[qat], limit_train_batches=2, limit_val_batches=0).fit(DictBatchClassifier())
    # as training_step calls it: x by position, extra by keyword
    assert len(qat.example_inputs.args) == 1 and sorted(qat.example_inputs.kwargs) == ["extra"]


def test_qat_checkpoint_with_another_backend_is_refused_even_when_its_keys_fit(tmp_path):
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(
        callbacks=[QuantizationAwareTraining(export=None, backend="qnnpack"), checkpoint],
        enable_checkpointing=True,
        limit_train_batches=2,
    ).fit(BoringClassifier())
    # x86 and qnnpack prepare the same modules (same keys) but learn ranges for other activation ranges
    with pytest.raises(
        ValueError, match=r"trained with \{'backend': 'qnnpack'.*these differ: \['backend', 'per_channel'\]"
    ):
        quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)]).validate(
            BoringClassifier(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False
        )


# ---------------------------------------------------------------------- notes that say what is true
def test_weights_that_are_not_finite_before_training_are_named_before_the_first_step():
    model = BoringClassifier()
    with torch.no_grad():
        next(model.net.parameters())[0].fill_(float("inf"))
    name = next(n for n, _ in model.net.named_parameters())
    refused_before_training(
        model,
        ValueError,
        rf"1 weight tensors of 'net' hold NaN or Inf before the first training step, as initialised or loaded \(no "
        rf"batch has run yet\): \['{name}'\]",
        callbacks=[QuantizationAwareTraining(export=None)],
    )


def test_a_float_checkpoint_resumed_into_qat_says_how_to_start_qat_from_it(tmp_path):
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(BoringClassifier())
    trainer.save_checkpoint(tmp_path / "float.ckpt")
    qat = quiet_trainer(max_epochs=2, callbacks=[QuantizationAwareTraining(export=None)])
    with pytest.raises(
        ValueError,
        match=r"ckpt_path='.*float.ckpt' holds a float 'net' \(saved without QuantizationAwareTraining\).*To start "
        r"QAT from these weights, load them and fit anew: model = BoringClassifier.load_from_checkpoint\(path\)",
    ):
        qat.fit(BoringClassifier(), ckpt_path=tmp_path / "float.ckpt")
    assert qat.global_step == 0
    # the way the message gives works
    model = BoringClassifier.load_from_checkpoint(tmp_path / "float.ckpt")
    callback = QuantizationAwareTraining(export=None)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model)
    assert callback.quantized_model is not None and int8_layers(callback.quantized_model)


# ---------------------------------------------------------------------- a schedule in optimizer steps
class _StepSpy(Callback):
    """The fake quantization and observer switches each training batch ran with, by optimizer step."""

    def __init__(self) -> None:
        self.flags: dict[int, set] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.flags[trainer.global_step] = fake_quant_flags(pl_module.net)


class _CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _step_callback(flow: str = "fx") -> QuantizationAwareTraining:
    from lightning_quant import QATSchedule

    return QuantizationAwareTraining(
        flow=flow,
        export=None,
        schedule=QATSchedule(quant_start_step=2, freeze_observers_step=5, freeze_bn_step=6)
        if flow != "torchao"
        else {"quant_start_step": 2},
    )


def test_a_step_schedule_switches_at_its_steps_inside_one_epoch():
    spy = _StepSpy()
    quiet_trainer(callbacks=[_step_callback(), spy], max_epochs=2).fit(BoringClassifier())  # 4 steps per epoch
    assert spy.flags == {
        0: {(False, False)},
        1: {(False, False)},
        2: {(True, True)},
        3: {(True, True)},
        4: {(True, True)},
        5: {(True, False)},
        6: {(True, False)},
        7: {(True, False)},
    }


@pytest.mark.parametrize("flow", [*FLOWS, pytest.param("torchao", marks=requires_torchao)])
def test_a_step_started_qat_resumed_mid_epoch_ends_as_the_uninterrupted_run(flow, tmp_path):
    from tests.helpers import ResumableClassifier

    seed_everything(0)
    reference = ResumableClassifier()  # its data resumes where it was, so the runs see the same batches
    quiet_trainer(callbacks=[_step_callback(flow)], max_epochs=2).fit(reference)

    seed_everything(0)
    crashed = ResumableClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_trainer(
            callbacks=[_step_callback(flow), checkpoint, _CrashAtStep(4)], enable_checkpointing=True, max_epochs=2
        ).fit(crashed)  # the last checkpoint is at step 3, after 3 of epoch 0's 4 batches: the middle of an epoch

    resumed = ResumableClassifier()
    spy = _StepSpy()
    quiet_trainer(callbacks=[_step_callback(flow), spy], max_epochs=2).fit(
        resumed, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert min(spy.flags) == 3 and spy.flags[3] == {(True, True)}  # resumed at step 3, quantizing, observing
    assert spy.flags[5] == ({(True, False)} if flow != "torchao" else {(True, True)})  # torchao: no observers
    for key, value in reference.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_schedule_object_and_epoch_arguments_are_refused_together():
    from lightning_quant import QATSchedule

    with pytest.raises(ValueError, match=r"schedule= and \['quant_start_epoch'\] both say when QAT starts"):
        QuantizationAwareTraining(quant_start_epoch=1, schedule=QATSchedule(quant_start_step=5))
    with pytest.raises(ValueError, match=r"schedule has fields \['start_step'\]; a QATSchedule has"):
        QuantizationAwareTraining(schedule={"start_step": 5})
    with pytest.raises(TypeError, match=r"schedule must be a QATSchedule, a mapping of its fields or None, got int"):
        QuantizationAwareTraining(schedule=5)


def test_a_step_schedule_that_the_fit_never_reaches_is_refused():
    from lightning_quant import QATSchedule

    refused_before_training(
        BoringClassifier(),
        ValueError,
        r"quant_start_step=8 is not before the fit's last optimizer step \(max_epochs=2 x 4 optimizer steps per "
        r"epoch = 8 steps\)",
        callbacks=[QuantizationAwareTraining(export=None, schedule=QATSchedule(quant_start_step=8))],
        max_epochs=2,
    )
    refused_before_training(
        BoringClassifier(),
        ValueError,
        r"quant_start_step=5 is not before the fit's last optimizer step \(max_steps=5 = 5 steps\)",
        callbacks=[QuantizationAwareTraining(export=None, schedule={"quant_start_step": 5})],
        max_steps=5,
        max_epochs=-1,
    )

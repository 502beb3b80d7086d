"""What the quantization callbacks share: config= or keywords, the listener protocol, the publish step."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from lightning_quant import (
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationCallback,
    QuantizationConfig,
    QuantizationListener,
    QuantizationReport,
)
from lightning_quant.quantization.convert import quantized_engine
from tests.helpers import BoringClassifier, files_under, quiet_trainer, random_images


@pytest.mark.parametrize("callback_class", [QuantizationAwareTraining, PostTrainingQuantization])
def test_config_object_gives_the_same_model_as_keywords(callback_class):
    config = QuantizationConfig(backend="qnnpack", observer="minmax", per_channel=True, export=None)
    outputs = []
    for callback in (
        callback_class(config=config),
        callback_class(backend="qnnpack", observer="minmax", per_channel=True, export=None),
    ):
        assert callback.config == config
        seed_everything(0)
        quiet_trainer(callbacks=[callback], limit_train_batches=2).fit(BoringClassifier())
        with torch.no_grad(), quantized_engine("qnnpack"):
            outputs.append(
                callback.quantized_model(torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1)))
            )
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("callback_class", [QuantizationAwareTraining, PostTrainingQuantization])
def test_config_object_and_a_keyword_it_holds_raises(callback_class):
    config = QuantizationConfig(backend="qnnpack")
    with pytest.raises(
        ValueError,
        match=rf"{callback_class.__name__} got config= and also \['observer', 'skip'\]: set them on the "
        r"QuantizationConfig \(dataclasses.replace\(config, ...\)\), or pass keyword arguments without config=",
    ):
        callback_class(config=config, observer="minmax", skip=["head"])
    with pytest.raises(TypeError, match=r"config must be a QuantizationConfig or None, got str"):
        callback_class(config="x86")
    # options that are not the config's stay keywords beside it
    assert callback_class(config=config, export_dir=None).config is config


class Recorder(QuantizationListener, Callback):
    """A user's listener: records the moments it hears of."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, object]] = []

    def on_before_quantization_prepare(self, trainer, pl_module):
        self.heard.append(("prepare", type(pl_module.net).__name__))

    def on_quantized(self, trainer, pl_module, callback):
        self.heard.append(("quantized", callback))


class Structural(Callback):
    """Not a subclass: defines both methods, so it is a listener by shape."""

    def __init__(self) -> None:
        self.calls = 0

    def on_before_quantization_prepare(self, trainer, pl_module):
        self.calls += 1

    def on_quantized(self, trainer, pl_module, callback):
        self.calls += 10


def test_listeners_hear_both_moments_in_any_order(tmp_path):
    recorder, structural = Recorder(), Structural()
    qat = QuantizationAwareTraining(export=("torchscript",), export_dir=tmp_path)
    quiet_trainer(callbacks=[recorder, qat, structural], limit_train_batches=2).fit(BoringClassifier())
    assert recorder.heard == [("prepare", "TinyNet"), ("quantized", qat)]
    assert structural.calls == 11
    assert isinstance(qat, QuantizationCallback) and not isinstance(qat, QuantizationListener)
    assert all(isinstance(c, QuantizationListener) for c in (KnowledgeDistillation(), QuantizationReport()))


def test_ptq_announces_without_a_prepare_moment():
    recorder = Recorder()
    ptq = PostTrainingQuantization(export=None, calibration_batches=2, progress=False)
    quiet_trainer(callbacks=[ptq, recorder], limit_train_batches=2).fit(BoringClassifier())
    assert recorder.heard == [("quantized", ptq)]


@pytest.mark.parametrize("callback_class", [QuantizationAwareTraining, PostTrainingQuantization])
def test_int8_model_runs_after_a_deterministic_trainer_and_has_no_gradients(callback_class):
    callback = callback_class(export=None, skip=["head"])
    with pytest.warns(UserWarning, match=r"switched torch.use_deterministic_algorithms to warn_only=True"):
        quiet_trainer(callbacks=[callback], deterministic=True, limit_train_batches=2).fit(BoringClassifier())
    assert torch.are_deterministic_algorithms_enabled()  # still on, for every kernel that has a deterministic version
    int8 = callback.quantized_model
    assert type(int8.head) is torch.nn.Linear  # the skipped layer stayed float...
    assert [n for n, p in int8.named_parameters() if p.requires_grad] == []  # ...and asks for no gradient
    with torch.no_grad():
        assert int8(torch.randn(3, 1, 6, 6)).shape == (3, 4)


# ---------------------------------------------------------------- what can only fail after training
def _failing_torchscript(monkeypatch, fail_from_call: int) -> None:
    from lightning_quant import export
    from lightning_quant.callbacks import base
    from lightning_quant.quantization.config import ExportTarget

    real, count = export._SERIALIZERS[ExportTarget.TORCHSCRIPT], {"n": 0}

    def serializer(model, example, backend):
        count["n"] += 1
        if count["n"] >= fail_from_call:
            raise RuntimeError("strides() called on an undefined Tensor")
        return real(model, example, backend)

    monkeypatch.setitem(export._SERIALIZERS, ExportTarget.TORCHSCRIPT, serializer)
    monkeypatch.setattr(base, "_REHEARSED", set())  # rehearse even what passed earlier in this process


def test_an_export_target_that_cannot_hold_the_model_is_refused_before_training(monkeypatch, tmp_path):
    from lightning_quant.export import ExportFailedError

    _failing_torchscript(monkeypatch, fail_from_call=1)
    model = BoringClassifier()
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(export_dir=tmp_path)], max_epochs=1)
    with pytest.raises(
        ExportFailedError,
        match=r"QuantizationAwareTraining: before any training or calibration, on the untrained model: export "
        r"'torchscript' failed: RuntimeError: strides\(\) called on an undefined Tensor. Drop 'torchscript' "
        r"from export=",
    ):
        trainer.fit(model)
    assert trainer.global_step == 0 and files_under(tmp_path) == []


def test_an_export_that_fails_after_training_keeps_the_int8_model_and_the_checkpoint(monkeypatch, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_quant.export import ExportFailedError

    _failing_torchscript(monkeypatch, fail_from_call=2)  # the rehearsal passes, the export at the end fails
    qat = QuantizationAwareTraining(export_dir=tmp_path / "quantized")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints")
    trainer = quiet_trainer(callbacks=[qat, checkpoint], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(
        ExportFailedError,
        match=r"export 'torchscript' failed: .*callback.quantized_model holds the int8 model, the trained model and "
        r"its checkpoints are kept, and no file of the export set was written",
    ):
        trainer.fit(BoringClassifier())
    assert trainer.global_step == 4 and qat.quantized_model is not None
    x = random_images(8, seed=5).tensors[0]
    with quantized_engine(qat.config.engine):
        assert qat.quantized_model(x).shape == (8, 4)
    assert [p.suffix for p in (tmp_path / "checkpoints").iterdir()] == [".ckpt"]
    assert not (tmp_path / "quantized").exists() or files_under(tmp_path / "quantized") == []


def test_a_rehearsal_that_passed_is_not_repeated_for_the_same_structure_settings_and_call(monkeypatch):
    from lightning_quant.callbacks import base

    monkeypatch.setattr(base, "_REHEARSED", set())
    calls = []
    real = base.QuantizationCallback._rehearsal_key

    def key(self, float_module, example):
        calls.append(type(float_module).__name__)
        return real(self, float_module, example)

    monkeypatch.setattr(base.QuantizationCallback, "_rehearsal_key", key)
    quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)]).fit(BoringClassifier())
    assert len(base._REHEARSED) == 1
    quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)]).fit(BoringClassifier())
    assert len(base._REHEARSED) == 1 and calls == ["TinyNet", "TinyNet"]  # asked, found, not rehearsed
    quiet_trainer(callbacks=[QuantizationAwareTraining(export=None, observer="minmax")]).fit(BoringClassifier())
    assert len(base._REHEARSED) == 2  # other settings: rehearsed


# ---------------------------------------------------------------------- callbacks that cannot collide
def test_qat_and_ptq_on_one_submodule_are_refused_before_training(tmp_path):
    from tests.helpers import refused_before_training

    for callbacks, message in (
        (
            [QuantizationAwareTraining(export_dir=tmp_path / "a"), PostTrainingQuantization(export_dir=tmp_path / "b")],
            r"QuantizationAwareTraining and PostTrainingQuantization on one Trainer both quantize 'net' with other "
            r"settings: the second would convert what the first prepared",
        ),
        (
            [QuantizationAwareTraining(backend="x86"), QuantizationAwareTraining(backend="qnnpack", per_channel=False)],
            r"QuantizationAwareTraining and QuantizationAwareTraining on one Trainer both quantize 'net' with other "
            r"settings.*run one fit per setting",
        ),
    ):
        refused_before_training(BoringClassifier(), ValueError, message, callbacks=callbacks, default_root_dir=tmp_path)
    assert files_under(tmp_path) == []
    # two with the same settings share a checkpoint state key: Lightning refuses them as the Trainer is made
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `QuantizationAwareTraining`"):
        quiet_trainer(callbacks=[QuantizationAwareTraining(), QuantizationAwareTraining()])


class TwoHeads(BoringClassifier):
    """Two submodules with parameters, quantized by two callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.other = torch.nn.Linear(4, 4)


def test_two_callbacks_on_separate_submodules_must_write_to_separate_folders(tmp_path):
    from tests.helpers import refused_before_training

    refused_before_training(
        TwoHeads(),
        ValueError,
        r"QuantizationAwareTraining and PostTrainingQuantization on one Trainer both write their files to "
        r"'.*quantized': give one of them an export_dir=... of its own",
        callbacks=[QuantizationAwareTraining(module="net"), PostTrainingQuantization(module="other", mode="dynamic")],
        default_root_dir=tmp_path,
    )


# ---------------------------------------------------------------------- folders that cannot receive files
@pytest.mark.parametrize(
    ("export_dir", "message"),
    [
        ("out\0put", r"export_dir='out\\x00put' contains a NUL byte"),
        ("/proc/lightning_quant_test", r"export_dir='/proc/lightning_quant_test' cannot receive files: .*errno"),
        ("/sys/lightning_quant_test", r"export_dir='/sys/lightning_quant_test' cannot receive files"),
        ("x" * 300, r"export_dir='x{300}' cannot receive files: File name too long"),
    ],
)
def test_an_export_dir_that_cannot_work_is_refused_before_training(tmp_path, export_dir, message):
    from tests.helpers import refused_before_training

    refused_before_training(
        BoringClassifier(),
        ValueError,
        message,
        callbacks=[QuantizationAwareTraining(export_dir=export_dir)],
        default_root_dir=tmp_path,
    )


def test_a_report_dir_that_cannot_work_is_refused_before_training(tmp_path):
    from tests.helpers import refused_before_training

    (tmp_path / "blocker").write_text("a file")
    refused_before_training(
        BoringClassifier(),
        ValueError,
        r"report_dir='.*blocker/report' lies under the file",
        callbacks=[
            QuantizationAwareTraining(export=None),
            QuantizationReport(report_dir=tmp_path / "blocker" / "report"),
        ],
        default_root_dir=tmp_path,
    )

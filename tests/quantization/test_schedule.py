import pytest
import torch
import torch.nn as nn

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.schedule import (
    Phase,
    QATSchedule,
    is_prepared,
    observers_paused,
    quantization_disabled,
    set_bn_frozen,
)
from tests.helpers import TinyNet, fake_quant_flags


def _prepared():
    x = torch.randn(4, 1, 6, 6)
    return get_flow("fx").prepare(TinyNet(), QuantizationConfig(), ExampleInputs((x,)), qat=True), x


def test_phase_by_epoch():
    schedule = QATSchedule(quant_start_epoch=1, freeze_observers_epoch=3, freeze_bn_epoch=2)
    assert [schedule.phase(e) for e in range(4)] == [
        Phase(False, False, False),
        Phase(True, True, False),
        Phase(True, True, True),
        Phase(True, False, True),
    ]
    assert QATSchedule().phase(10) == Phase(True, True, False)


def test_schedule_raises():
    with pytest.raises(ValueError, match=r"freeze_observers_epoch must be after quant_start_epoch"):
        QATSchedule(quant_start_epoch=3, freeze_observers_epoch=1)
    with pytest.raises(ValueError, match=r"freeze_bn_epoch must be a non-negative int or None, got -2"):
        QATSchedule(freeze_bn_epoch=-2)


def test_phase_by_optimizer_step():
    schedule = QATSchedule(quant_start_step=3, freeze_observers_step=6, freeze_bn_step=5)
    assert schedule.unit == "step" and QATSchedule().unit == "epoch"
    assert [schedule.phase(epoch=0, step=s) for s in (0, 2, 3, 5, 6, 100)] == [
        Phase(False, False, False),
        Phase(False, False, False),
        Phase(True, True, False),
        Phase(True, True, True),
        Phase(True, False, True),
        Phase(True, False, True),
    ]
    assert schedule.phase(epoch=9, step=0) == Phase(False, False, False)  # epochs do not count in steps


def test_a_step_schedule_refuses_epochs_and_early_freezes():
    with pytest.raises(
        ValueError,
        match=r"a schedule counts in epochs or in optimizer steps, not both: got \['quant_start_epoch'\] and "
        r"\['freeze_bn_step'\]; give \['quant_start_step'\] in steps instead",
    ):
        QATSchedule(quant_start_epoch=1, freeze_bn_step=10)
    with pytest.raises(ValueError, match=r"freeze_observers_step must be after quant_start_step .* one step of data"):
        QATSchedule(quant_start_step=10, freeze_observers_step=10)
    with pytest.raises(ValueError, match=r"quant_start_step must be a non-negative int or None, got 1.5"):
        QATSchedule(quant_start_step=1.5)


def test_apply_is_idempotent_and_reversible():
    model, _ = _prepared()
    schedule = QATSchedule(quant_start_epoch=1, freeze_observers_epoch=2, freeze_bn_epoch=2)
    schedule.apply(model, 2)
    schedule.apply(model, 2)
    assert fake_quant_flags(model) == {(True, False)}
    assert {m.freeze_bn for m in model.modules() if hasattr(m, "freeze_bn")} == {True}
    schedule.apply(model, 0)
    assert fake_quant_flags(model) == {(False, False)}
    assert {m.freeze_bn for m in model.modules() if hasattr(m, "freeze_bn")} == {False}


def test_observers_paused_and_quantization_disabled_restore_state():
    model, x = _prepared()
    model(x)
    with observers_paused(model):
        assert fake_quant_flags(model) == {(True, False)}
    assert fake_quant_flags(model) == {(True, True)}
    model.eval()
    quantized = model(x)
    with quantization_disabled(model):
        assert fake_quant_flags(model) == {(False, False)}
        plain = model(x)
    assert fake_quant_flags(model) == {(True, True)}
    assert not torch.equal(plain, quantized)


def test_plain_batchnorm_is_frozen_by_eval_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    set_bn_frozen(model, True)
    assert not model[1].training and model[0].training


def test_is_prepared():
    model, _ = _prepared()
    assert is_prepared(model) and not is_prepared(TinyNet())

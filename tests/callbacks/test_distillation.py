"""KnowledgeDistillation: exactness at alpha=0, a frozen teacher, gradients, resume, QAT in either order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quant import KnowledgeDistillation, QuantizationAwareTraining
from lightning_quant.distillation import distillation_loss
from lightning_quant.quantization.schedule import is_prepared
from tests.callbacks.test_qat import _CrashAt
from tests.helpers import BoringClassifier, TinyNet, quiet_trainer


def _trained_teacher() -> nn.Module:
    seed_everything(1)
    model = BoringClassifier()
    quiet_trainer(max_epochs=3).fit(model)
    return model.net


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"teacher": 3}, TypeError, r"teacher must be an nn.Module, a checkpoint path or None, got int"),
        ({"temperature": 0}, ValueError, r"temperature must be a positive finite number, got 0"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be a positive finite number, got nan"),
        ({"temperature": float("inf")}, ValueError, r"temperature must be a positive finite number, got inf"),
        ({"alpha": float("nan")}, ValueError, r"alpha must be a number in \[0, 1\], got nan"),
        ({"alpha": -0.1}, ValueError, r"alpha must be a number in \[0, 1\], got -0.1"),
        ({"alpha": 1.5}, ValueError, r"alpha must be a number in \[0, 1\], got 1.5"),
        ({"alpha": True}, ValueError, r"alpha must be a number in \[0, 1\], got True"),
        ({"loss": "ce"}, ValueError, r"loss must be one of \('kl', 'mse'\), got 'ce'"),
        ({"module": ""}, ValueError, r"module must be a dotted attribute path such as 'net' or None, got ''"),
    ],
)
def test_kd_raises_on_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**kwargs)


def test_kd_refuses_manual_optimisation():
    class Manual(BoringClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    trainer = quiet_trainer(callbacks=[KnowledgeDistillation()])
    with pytest.raises(
        ValueError,
        match=r"KnowledgeDistillation adds its term to the loss of automatic optimisation, "
        r"but Manual.automatic_optimization is False: compute "
        r"callback.distillation_loss\(student_logits, teacher_logits\)",
    ):
        trainer.fit(Manual())


def test_kd_refuses_a_teacher_inside_the_module():
    model = BoringClassifier()
    with pytest.raises(ValueError, match=r"the teacher shares parameters with the LightningModule"):
        quiet_trainer(callbacks=[KnowledgeDistillation(teacher=model.net)]).fit(model)


def test_kd_raises_when_the_student_is_not_run():
    class Bypass(BoringClassifier):
        def __init__(self):
            super().__init__()
            self.other = nn.Linear(36, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.other(x.flatten(1)), y)

    with pytest.raises(RuntimeError, match=r"KnowledgeDistillation saw no training forward of 'net' in this step"):
        quiet_trainer(callbacks=[KnowledgeDistillation(module="net")], limit_train_batches=1).fit(Bypass())


def _fit(callbacks, seed=0, **trainer_kwargs):
    seed_everything(seed)
    model = BoringClassifier()
    quiet_trainer(callbacks=callbacks, max_epochs=2, **trainer_kwargs).fit(model)
    return model


def test_kd_alpha_zero_is_bit_identical_to_no_callback():
    plain = _fit([])
    distilled = _fit([KnowledgeDistillation(teacher=_trained_teacher(), alpha=0.0)])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, distilled.state_dict()[key]), key


def test_kd_teacher_gets_no_gradient_and_never_changes():
    teacher = _trained_teacher()
    before = copy.deepcopy(teacher.state_dict())
    callback = KnowledgeDistillation(teacher=teacher, alpha=0.9)
    model = _fit([callback])
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert all(m is not teacher for m in model.modules())


class _GradSpy(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = [p.grad.detach().cpu().clone() for p in pl_module.net.parameters()]


class _LossSpy(Callback):
    """Placed after KnowledgeDistillation: sees the loss Lightning is about to back-propagate."""

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses = getattr(self, "losses", []) + [float(loss)]


def test_kd_term_changes_the_student_gradients_by_the_formula():
    teacher = _trained_teacher()
    spies = {}
    for alpha in (0.0, 0.5):
        spies[alpha] = _GradSpy()
        seed_everything(0)
        model = BoringClassifier()
        quiet_trainer(
            callbacks=[KnowledgeDistillation(teacher=copy.deepcopy(teacher), alpha=alpha), spies[alpha]],
            limit_train_batches=1,
        ).fit(model)
    assert any(not torch.allclose(a, b) for a, b in zip(spies[0.0].grads, spies[0.5].grads))

    # the gradient equals that of (1 - a) * CE + a * T^2 * KL computed by hand
    seed_everything(0)
    model = BoringClassifier()
    x, y = next(iter(model.train_dataloader()))
    logits = model.net(x)
    with torch.no_grad():
        teacher_logits = teacher.eval()(x)
    total = 0.5 * nn.functional.cross_entropy(logits, y) + 0.5 * distillation_loss(logits, teacher_logits, "kl", 4.0)
    expected = torch.autograd.grad(total, list(model.net.parameters()))
    for got, want in zip(spies[0.5].grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kd_with_gradient_accumulation_scales_the_term_like_the_loss():
    spy = _LossSpy()
    callback = KnowledgeDistillation(teacher=_trained_teacher(), alpha=0.25)
    seed_everything(0)
    model = BoringClassifier()

    class Logged(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows = getattr(self, "rows", []) + [
                (float(m["kd/task_loss"]), float(m["kd/kd_loss"]), float(m["kd/total_loss"]))
            ]

    logged = Logged()
    quiet_trainer(callbacks=[callback, spy, logged], accumulate_grad_batches=2, limit_train_batches=4).fit(model)
    assert len(spy.losses) == 4
    for loss, (task, kd, total) in zip(spy.losses, logged.rows):
        assert total == pytest.approx(0.75 * task + 0.25 * kd, rel=1e-5)
        assert loss == pytest.approx(total / 2, rel=1e-5)


@pytest.mark.parametrize("qat_first", [True, False])
def test_kd_with_qat_in_either_order_uses_the_float_model_as_teacher(qat_first):
    seed_everything(0)
    model = BoringClassifier()
    float_weights = copy.deepcopy(model.net.state_dict())
    kd = KnowledgeDistillation(alpha=0.5)
    qat = QuantizationAwareTraining(export=None)
    quiet_trainer(callbacks=[qat, kd] if qat_first else [kd, qat], max_epochs=2).fit(model)
    assert is_prepared(model.net) and not is_prepared(kd.teacher)
    assert isinstance(kd.teacher, TinyNet)
    assert all(torch.equal(float_weights[k], v) for k, v in kd.teacher.state_dict().items())
    assert "quantized" in type(qat.quantized_model.head).__module__  # converted to int8 at the end of fit


def test_kd_teacher_from_checkpoint(tmp_path):
    seed_everything(1)
    trained = BoringClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(callbacks=[checkpoint], enable_checkpointing=True, max_epochs=2).fit(trained)
    callback = KnowledgeDistillation(teacher=str(tmp_path / "last.ckpt"), alpha=0.5)
    _fit([callback])
    for key, value in trained.net.state_dict().items():
        assert torch.equal(callback.teacher.state_dict()[key], value)


def test_kd_teacher_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"teacher checkpoint '/nowhere.ckpt': no such file"):
        _fit([KnowledgeDistillation(teacher="/nowhere.ckpt")])
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"has no float weights for 'net' \(missing e.g."):
        _fit([KnowledgeDistillation(teacher=str(tmp_path / "bad.ckpt"))])


def test_kd_crash_then_resume_matches_uninterrupted_run(tmp_path):
    teacher = _trained_teacher()

    def callbacks():
        return [
            QuantizationAwareTraining(quant_start_epoch=1, freeze_bn_epoch=2, export=None),
            KnowledgeDistillation(teacher=copy.deepcopy(teacher), alpha=0.5),
        ]

    seed_everything(0)
    reference = BoringClassifier()
    quiet_trainer(callbacks=callbacks(), max_epochs=3).fit(reference)

    seed_everything(0)
    crashed = BoringClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_trainer(callbacks=[*callbacks(), checkpoint, _CrashAt(2)], enable_checkpointing=True, max_epochs=3).fit(
            crashed
        )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not any("teacher" in key for key in saved["state_dict"])
    kd_state = next(v for k, v in saved["callbacks"].items() if k.startswith("KnowledgeDistillation"))
    assert kd_state == {"version": 1, "temperature": 4.0, "alpha": 0.5, "loss": "kl"}

    resumed = BoringClassifier()
    quiet_trainer(callbacks=callbacks(), max_epochs=3).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    for key, value in reference.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_kd_mse_loss_and_logits_of_model_outputs():
    from lightning_quant.distillation import logits_of

    s, t = torch.randn(4, 3), torch.randn(4, 3)
    assert float(distillation_loss(s, t, "mse")) == pytest.approx(float(((s - t) ** 2).mean()))
    assert float(distillation_loss(t, t, "kl")) == pytest.approx(0.0, abs=1e-6)

    class Output:
        logits = s

    assert logits_of(Output()) is s and logits_of((s, t)) is s
    with pytest.raises(TypeError, match=r"cannot find logits in a dict"):
        logits_of({"a": 1})

"""Knowledge distillation from a float teacher, beside QuantizationAwareTraining or on its own."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationListener
from lightning_quant.distillation import (
    DistillationLoss,
    distillation_loss,
    load_teacher_weights,
    logits_of,
)
from lightning_quant.quantization.target import resolve_target
from lightning_quant.utils.checks import parse_enum


class KnowledgeDistillation(QuantizationListener, Callback):
    """Add a distillation term from a frozen teacher to the loss Lightning optimises.

    Total loss = ``(1 - alpha) * task_loss + alpha * T^2 * KL(student/T || teacher/T)`` (``loss="kl"``)
    or ``(1 - alpha) * task_loss + alpha * MSE(student, teacher)`` (``loss="mse"``).

    How, without touching ``training_step``: a forward hook on the student submodule captures
    its input and output in each training batch and runs the teacher on the same input (so
    any batch format works). In ``on_before_backward`` the loss tensor Lightning is about to
    back-propagate is rewritten in place to the total above, scaled exactly as Lightning
    scaled the task loss (gradient accumulation, AMP), so one backward pass trains on the
    total. ``training_step``'s return value, and the ``loss`` in the progress bar, stay the
    task loss; ``kd/task_loss``, ``kd/kd_loss`` and ``kd/total_loss`` are logged every step.
    If the student runs several times in a step, the term is the mean over those calls.
    Manual optimisation is refused in ``setup``: there, add :meth:`distillation_loss` yourself.

    The teacher is kept on this callback, not on the LightningModule: in eval mode, without
    gradients, on the student's device during fit (and back on its own device after), never in
    the optimizer, never in a checkpoint, never wrapped by DDP. ``teacher=None`` takes a frozen
    copy of the student's float module as the model stands when fit starts, before
    ``QuantizationAwareTraining`` prepares it (in either order in the callbacks list) and before
    a checkpoint is restored: build the model the same way when resuming and the teacher is
    rebuilt the same.

    Args:
        teacher: an ``nn.Module`` (frozen in place), a Lightning checkpoint path whose weights
            for ``module`` fill a copy of the student's float architecture (read with
            ``weights_only=True``), or ``None`` for self-distillation.
        temperature: softmax temperature ``T`` of the KL term (default 4.0).
        alpha: weight of the distillation term, in [0, 1] (default 0.5). ``alpha=0`` trains
            exactly as without the callback.
        loss: ``"kl"`` (default) or ``"mse"`` on logits.
        module: dotted path of the student submodule whose outputs are the logits; ``None``
            picks the only child with parameters.

    Raises:
        ValueError: an argument outside its allowed values.
        TypeError: an argument of the wrong type.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_quant import QuantizationAwareTraining
        >>> trainer = Trainer(callbacks=[QuantizationAwareTraining(), KnowledgeDistillation(alpha=0.7)], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        teacher: nn.Module | str | Path | None = None,
        temperature: float = 4.0,
        alpha: float = 0.5,
        loss: str = "kl",
        module: str | None = None,
    ) -> None:
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise TypeError(f"teacher must be an nn.Module, a checkpoint path or None, got {type(teacher).__name__}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.loss = parse_enum(DistillationLoss, loss, "loss")
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(f"module must be a dotted attribute path such as 'net' or None, got {module!r}")
        self.temperature, self.alpha, self.module = float(temperature), float(alpha), module
        self._teacher_arg = teacher
        self.teacher: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self._float_student: nn.Module | None = None
        self._student_path: str | None = None
        self._handle: Any = None
        self._capturing = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._teacher_home: torch.device | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, loss=self.loss.value)

    # ------------------------------------------------------------------ hooks: when
    @override
    def on_before_quantization_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called by ``QuantizationAwareTraining`` just before it prepares the model."""
        self._capture_float_student(pl_module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation adds its term to the loss of automatic optimisation, but "
                f"{type(pl_module).__name__}.automatic_optimization is False: compute "
                "callback.distillation_loss(student_logits, teacher_logits) in your training_step instead"
            )
        self._capture_float_student(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build_teacher(pl_module)
        assert self._student_path is not None  # found in setup
        self._handle = pl_module.get_submodule(self._student_path).register_forward_hook(
            self._capture, with_kwargs=True
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pairs.clear()
        self._capturing = True

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._capturing:
            self._add_distillation_term(trainer, pl_module, loss)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._capturing = False
        self._pairs.clear()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()
        self._send_teacher_home()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hook()
        self._send_teacher_home()

    @override
    def state_dict(self) -> dict[str, Any]:
        # the teacher is not saved: a resumed run rebuilds it the same way
        return {
            "version": self.STATE_VERSION,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "loss": self.loss.value,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # nothing to restore: the arguments of this run hold

    # ------------------------------------------------------------------ helpers: what
    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """This callback's distillation term (before the ``alpha`` weighting)."""
        return distillation_loss(student_logits, teacher_logits, self.loss, self.temperature)

    def _capture_float_student(self, pl_module: pl.LightningModule) -> None:
        if self._float_student is not None or self.teacher is not None:
            if self._student_path is None:
                self._student_path = resolve_target(pl_module, self.module)[0]
            return
        self._student_path, student = resolve_target(pl_module, self.module)
        self._float_student = copy.deepcopy(student)

    def _build_teacher(self, pl_module: pl.LightningModule) -> None:
        if self.teacher is None:
            float_student, path = self._float_student, self._student_path
            assert float_student is not None and path is not None  # copied in setup
            if isinstance(self._teacher_arg, (str, Path)):
                self.teacher = load_teacher_weights(float_student, self._teacher_arg, path)
            else:
                self.teacher = float_student
            self._float_student = None
            source = (
                f"checkpoint {self._teacher_arg}"
                if self._teacher_arg
                else f"a frozen float copy of {self._student_path!r}"
            )
            rank_zero_info(f"[KD] teacher: {source}")
        teacher = self.teacher
        student_params = {id(p) for p in pl_module.parameters()}
        if any(id(p) in student_params for p in teacher.parameters()):
            raise ValueError(
                "the teacher shares parameters with the LightningModule, so the optimizer would train it: "
                "pass a separate module (copy.deepcopy) or teacher=None"
            )
        # the teacher goes back where it came from after fit, as Lightning moves the LightningModule
        self._teacher_home = next(teacher.parameters(), torch.empty(0)).device
        teacher.eval().requires_grad_(False).to(pl_module.device)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self._capturing and module.training and torch.is_grad_enabled()) or self.teacher is None:
            return
        with torch.no_grad():
            teacher_out = self.teacher(*args, **kwargs)
        self._pairs.append((logits_of(output), logits_of(teacher_out)))

    def _add_distillation_term(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self._pairs:
            raise RuntimeError(
                f"KnowledgeDistillation saw no training forward of {self._student_path!r} in this step: the loss "
                "must come from that submodule's output (set module= to the submodule that makes the logits)"
            )
        kd = torch.stack([self.distillation_loss(s, t) for s, t in self._pairs]).mean()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = (scaler.get_scale() if scaler is not None else 1.0) / trainer.accumulate_grad_batches
        task = loss.detach() / scale
        if self.alpha > 0:  # alpha=0 leaves the loss untouched: training is exactly as without the callback
            loss.mul_(1.0 - self.alpha).add_(kd * (self.alpha * scale))
        total = (1.0 - self.alpha) * task + self.alpha * kd.detach()
        pl_module.log_dict(
            {"kd/task_loss": task, "kd/kd_loss": kd.detach(), "kd/total_loss": total}, on_step=True, on_epoch=False
        )
        self._pairs.clear()

    def _send_teacher_home(self) -> None:
        if self.teacher is not None and self._teacher_home is not None:
            self.teacher.to(self._teacher_home)

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._capturing = False
        self._pairs.clear()

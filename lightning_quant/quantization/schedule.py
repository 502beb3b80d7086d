"""Turn fake quantization, observers and BatchNorm statistics on and off.

The QAT schedule is three indices, each "the epoch (or optimizer step) from whose start the change
holds", in epochs or in optimizer steps (``quant_start_step``, ``freeze_observers_step``,
``freeze_bn_step``: ``trainer.global_step``), one unit per run:

- ``quant_start_epoch``: before it, fake quantization and observers are off and the model
  trains in float (warm-up); from it, both are on;
- ``freeze_observers_epoch``: from it, observers stop updating, so scales and zero points
  stay fixed while weights keep training (``None``: never);
- ``freeze_bn_epoch``: from it, BatchNorm running statistics stop updating and BN uses them
  in training too (``None``: never).

The state follows from the epoch (or step) number alone, so applying it is idempotent and a
resumed run lands in the same phase as the run it resumes, in the middle of an epoch too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lightning_quant.quantization import flows
from lightning_quant.utils.checks import check_epoch


def fake_quantizers(module: nn.Module) -> list[Any]:
    """The fake-quantize modules of a prepared model, whichever flow prepared it."""
    return [m for _, m in flows.fake_quantizers(module)]


def observers(module: nn.Module) -> list[Any]:
    return [m for _, m in flows.observers(module)]


def is_prepared(module: nn.Module) -> bool:
    """Whether ``module`` already carries observers or fake quantization (prepared by a flow)."""
    return flows.is_prepared(module)


def set_fake_quant(module: nn.Module, enabled: bool) -> None:
    for fq in fake_quantizers(module):
        fq.enable_fake_quant(enabled)


def project_learned_ranges(module: nn.Module) -> None:
    """After an optimizer step: fake quantizers whose ranges are parameters put them back where they are valid
    (those that have a ``project`` method: torchao's with ``range_learning``)."""
    for fq in fake_quantizers(module):
        project = getattr(fq, "project", None)
        if project is not None:
            project()


def set_observers(module: nn.Module, enabled: bool) -> None:
    for fq in fake_quantizers(module):
        fq.enable_observer(enabled)


def observer_states(module: nn.Module) -> dict[str, bool]:
    """Which fake-quantize modules currently observe, by name."""
    return {name: bool(m.observer_enabled[0]) for name, m in flows.fake_quantizers(module)}


def restore_observer_states(module: nn.Module, states: dict[str, bool]) -> None:
    for name, m in flows.fake_quantizers(module):
        if name in states:
            m.enable_observer(states[name])


def set_bn_frozen(module: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) the BatchNorm statistics of a prepared model, as its flow does it
    (fused QAT modules' flag and plain BN layers in eval mode for torch.ao, which Lightning undoes
    when it switches the model back to training, so call this again then; the graph's batch-norm
    nodes for pt2e)."""
    flows.set_bn_frozen(module, frozen)


@contextlib.contextmanager
def observers_paused(module: nn.Module) -> Iterator[None]:
    """Stop every observer for the block, then restore each one's previous state."""
    states = observer_states(module)
    set_observers(module, False)
    try:
        yield
    finally:
        restore_observer_states(module, states)


@contextlib.contextmanager
def quantization_disabled(module: nn.Module) -> Iterator[None]:
    """Run a prepared model in plain float for the block (fake quantization and observers off)."""
    quantizers = flows.fake_quantizers(module)
    states = [(m, bool(m.fake_quant_enabled[0]), bool(m.observer_enabled[0])) for _, m in quantizers]
    set_fake_quant(module, False)
    set_observers(module, False)
    try:
        yield
    finally:
        for m, fake_quant, observing in states:
            m.enable_fake_quant(fake_quant)
            m.enable_observer(observing)


@dataclass(frozen=True)
class Phase:
    """What the schedule asks for in one epoch."""

    fake_quant: bool
    observers: bool
    bn_frozen: bool


@dataclass(frozen=True)
class QATSchedule:
    """When QAT starts and when observers and BatchNorm statistics freeze (see the module docstring).

    Give the epoch fields, or the step fields (a fine-tune of one epoch starts fake quantization after
    N optimizer steps, as Axolotl's ``fake_quant_after_n_steps``); not both.

    Args:
        quant_start_epoch: first epoch with fake quantization and observers (default 0).
        freeze_observers_epoch: first epoch with frozen scales and zero points (``None``: never).
        freeze_bn_epoch: first epoch with frozen BatchNorm statistics (``None``: never).
        quant_start_step: first optimizer step (``trainer.global_step``) with fake quantization.
        freeze_observers_step: first optimizer step with frozen observers (``None``: never).
        freeze_bn_step: first optimizer step with frozen BatchNorm statistics (``None``: never).

    Raises:
        ValueError: an index is negative or not an int; epoch and step fields are mixed; or a freeze comes
            before the start (observers frozen before they ever ran would leave every scale at its initial value).

    Example::

        >>> QATSchedule(quant_start_step=100, freeze_observers_step=400).phase(epoch=0, step=250).fake_quant
        True
    """

    quant_start_epoch: int = 0
    freeze_observers_epoch: int | None = None
    freeze_bn_epoch: int | None = None
    quant_start_step: int | None = None
    freeze_observers_step: int | None = None
    freeze_bn_step: int | None = None

    def __post_init__(self) -> None:
        check_epoch(self.quant_start_epoch, "quant_start_epoch", allow_none=False)
        for name in (
            "freeze_observers_epoch",
            "freeze_bn_epoch",
            "quant_start_step",
            "freeze_observers_step",
            "freeze_bn_step",
        ):
            check_epoch(getattr(self, name), name, allow_none=True)
        steps = [name for name in STEP_FIELDS if getattr(self, name) is not None]
        epochs = [name for name in EPOCH_FIELDS if getattr(self, name) not in (None, 0)]
        if steps and epochs:
            raise ValueError(
                f"a schedule counts in epochs or in optimizer steps, not both: got {epochs} and {steps}; give "
                f"{[n.replace('_epoch', '_step') for n in epochs]} in steps instead, or the steps in epochs"
            )
        unit = "step" if steps else "epoch"
        start, freeze = self.start, self.freeze_observers
        if freeze is not None and freeze <= start:
            raise ValueError(
                f"freeze_observers_{unit} must be after quant_start_{unit} so observers see at least one "
                f"{unit} of data, got freeze_observers_{unit}={freeze} and quant_start_{unit}={start}"
            )

    @property
    def unit(self) -> str:
        """``"step"`` when any step field is set, else ``"epoch"``."""
        return "step" if any(getattr(self, name) is not None for name in STEP_FIELDS) else "epoch"

    @property
    def start(self) -> int:
        """The first epoch or step (per :attr:`unit`) with fake quantization."""
        if self.unit == "step":
            return self.quant_start_step or 0
        return self.quant_start_epoch

    @property
    def freeze_observers(self) -> int | None:
        return self.freeze_observers_step if self.unit == "step" else self.freeze_observers_epoch

    @property
    def freeze_bn(self) -> int | None:
        return self.freeze_bn_step if self.unit == "step" else self.freeze_bn_epoch

    def phase(self, epoch: int, step: int = 0) -> Phase:
        """What the schedule asks for in ``epoch`` at optimizer step ``step`` (``trainer.global_step``)."""
        at = step if self.unit == "step" else epoch
        quantizing = at >= self.start
        observing = quantizing and (self.freeze_observers is None or at < self.freeze_observers)
        bn_frozen = self.freeze_bn is not None and at >= self.freeze_bn
        return Phase(fake_quant=quantizing, observers=observing, bn_frozen=bn_frozen)

    def apply(self, module: nn.Module, epoch: int, step: int = 0) -> Phase:
        """Put ``module`` in the state the schedule asks for in ``epoch`` at optimizer step ``step``."""
        phase = self.phase(epoch, step)
        set_fake_quant(module, phase.fake_quant)
        set_observers(module, phase.observers)
        set_bn_frozen(module, phase.bn_frozen)
        return phase


EPOCH_FIELDS = ("quant_start_epoch", "freeze_observers_epoch", "freeze_bn_epoch")
STEP_FIELDS = ("quant_start_step", "freeze_observers_step", "freeze_bn_step")

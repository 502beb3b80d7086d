"""Turn fake quantization, observers and BatchNorm statistics on and off.

The QAT schedule is three epoch indices, each "the epoch from whose start the change holds":

- ``quant_start_epoch``: before it, fake quantization and observers are off and the model
  trains in float (warm-up); from it, both are on;
- ``freeze_observers_epoch``: from it, observers stop updating, so scales and zero points
  stay fixed while weights keep training (``None``: never);
- ``freeze_bn_epoch``: from it, BatchNorm running statistics stop updating and BN uses them
  in training too (``None``: never).

The state follows from the epoch number alone, so applying it is idempotent and a resumed
run lands in the same phase as the run it resumes.
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

    Raises:
        ValueError: an epoch is negative or not an int, or a freeze comes before ``quant_start_epoch``
            (observers frozen before they ever ran would leave every scale at its initial value).
    """

    quant_start_epoch: int = 0
    freeze_observers_epoch: int | None = None
    freeze_bn_epoch: int | None = None

    def __post_init__(self) -> None:
        check_epoch(self.quant_start_epoch, "quant_start_epoch", allow_none=False)
        check_epoch(self.freeze_observers_epoch, "freeze_observers_epoch", allow_none=True)
        check_epoch(self.freeze_bn_epoch, "freeze_bn_epoch", allow_none=True)
        if self.freeze_observers_epoch is not None and self.freeze_observers_epoch <= self.quant_start_epoch:
            raise ValueError(
                "freeze_observers_epoch must be after quant_start_epoch so observers see at least one "
                f"epoch of data, got freeze_observers_epoch={self.freeze_observers_epoch} and "
                f"quant_start_epoch={self.quant_start_epoch}"
            )

    def phase(self, epoch: int) -> Phase:
        quantizing = epoch >= self.quant_start_epoch
        observing = quantizing and (self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch)
        bn_frozen = self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch
        return Phase(fake_quant=quantizing, observers=observing, bn_frozen=bn_frozen)

    def apply(self, module: nn.Module, epoch: int) -> Phase:
        """Put ``module`` in the state the schedule asks for in ``epoch``."""
        phase = self.phase(epoch)
        set_fake_quant(module, phase.fake_quant)
        set_observers(module, phase.observers)
        set_bn_frozen(module, phase.bn_frozen)
        return phase

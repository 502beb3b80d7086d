"""How a LightningModule really calls the submodule being quantized, read from its own steps.

A batch is not the model's input: a step may read a dict batch by key, normalise, cast uint8 images,
add keyword inputs of its own, or call a Hugging Face model with ``**batch`` and its labels. So the
callbacks do not guess the call from the batch. :class:`StepCalls` runs the LightningModule's own
step (``training_step``, ``validation_step``, ``test_step``) on a batch, with a forward pre-hook on
the submodule that records its arguments and stops the step right there: the submodule itself does
not run, nothing is logged, no gradient is taken, and the random state is restored afterwards, so
training is exactly what it would be without the callback.

What the step hands the submodule is used for preparing, calibrating, checking, the report and every
export. It also says where a tuple batch's target is: the item after the last one the step hands the
submodule as it is for a prediction (``(input_ids, attention_mask, labels)`` with
``model(input_ids, attention_mask=mask)``: the third), the second where it hands none as they are.

Guessing from the batch (:func:`~lightning_quant.quantization.inputs.default_batch_to_input`) is the last
resort, for a step that cannot run outside the loop (one that calls ``self.optimizers()`` before the model,
say); the user hears of it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_quant.quantization.inputs import (
    ExampleInputs,
    batch_inputs,
    batch_targets,
    forward_signature,
    inference_inputs,
    required_inputs,
)

log = logging.getLogger(__name__)

#: the step that reads each kind of data
STEPS = {
    "fit": "training_step",
    "train": "training_step",
    "validate": "validation_step",
    "val": "validation_step",
    "test": "test_step",
    "predict": "predict_step",
}


class _Called(BaseException):
    """Raised by the pre-hook to leave the step at the submodule's call (a BaseException, so a step's
    own ``except Exception`` does not catch it)."""

    def __init__(self, inputs: ExampleInputs) -> None:
        super().__init__()
        self.inputs = inputs


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _quiet_step(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode, no gradients, the random state kept, ``self.log`` a no-op; all restored on exit."""
    modes = [(module, module.training) for module in pl_module.modules()]  # frozen BatchNorm stays frozen
    pl_module.eval()
    pl_module.__dict__["log"], pl_module.__dict__["log_dict"] = _no_log, _no_log
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)
        for module, training in modes:
            module.training = training


def step_name(pl_module: pl.LightningModule, stage: str) -> str:
    """The step that reads ``stage``'s data (``"fit"``/``"train"``, ``"validate"``/``"val"``, ``"test"``),
    falling back to ``training_step`` where the LightningModule does not define that one."""
    name = STEPS.get(stage, "training_step")
    return name if name == "training_step" or is_overridden(name, pl_module) else "training_step"


class StepCalls:
    """Read the submodule's call off the LightningModule's own step, one batch at a time.

    Args:
        pl_module: the LightningModule.
        target: a function giving the submodule whose call is read (looked up at each call: QAT
            replaces the submodule when it prepares it).
        step: ``"training_step"``, ``"validation_step"``, ``"test_step"`` or ``"predict_step"``.
        batch_to_input: the user's own reading of a batch, used instead of the step when given.

    Calling it with a batch gives the submodule's inputs (:class:`ExampleInputs`, on the device the
    step put them on).
    """

    def __init__(
        self,
        pl_module: pl.LightningModule,
        target: Callable[[], nn.Module],
        step: str = "training_step",
        batch_to_input: Callable[[Any], Any] | None = None,
    ) -> None:
        self.pl_module, self.target, self.step, self.batch_to_input = pl_module, target, step, batch_to_input
        self.guessed: str | None = None  # why the last call was read off the batch instead

    def __call__(self, batch: Any) -> ExampleInputs:
        if self.batch_to_input is not None:
            return batch_inputs(batch, self.batch_to_input)
        found = self.read(batch)
        if found is not None:
            return found
        return batch_inputs(batch, inputs=required_inputs(self.target()))

    def read(self, batch: Any) -> ExampleInputs | None:
        """The submodule's inputs in the step on ``batch``, or ``None`` (with ``guessed`` set) when the step
        raised or returned before calling it."""
        found = self._read(batch)
        return found[0] if found is not None else None

    def _read(self, batch: Any) -> tuple[ExampleInputs, Any] | None:
        """:meth:`read`'s inputs, with the batch as the step received it (moved to the module's device)."""
        pl_module = self.pl_module

        def called(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _Called(ExampleInputs(tuple(args), dict(kwargs)).map_tensors(lambda t: t.detach().contiguous()))

        handle = self.target().register_forward_pre_hook(called, with_kwargs=True, prepend=True)
        try:
            with _quiet_step(pl_module):
                moved = _to_module_device(pl_module, batch)
                step = getattr(pl_module, self.step)
                # a step of several dataloaders takes their index (Lightning passes it only then)
                extra = (0,) if "dataloader_idx" in inspect.signature(step).parameters else ()
                step(moved, 0, *extra)
        except _Called as call:
            self.guessed = None
            return call.inputs, moved
        except Exception as err:  # the step cannot run outside the loop: the batch is read instead
            self._guess(f"{self.step} raised {type(err).__name__}: {err}")
            return None
        finally:
            handle.remove()
        self._guess(f"{self.step} returned without calling it")
        return None

    def targets(self, batches: Sequence[Any], signature: inspect.Signature | None = None) -> torch.Tensor | None:
        """The targets of ``batches`` concatenated (``None`` where they hold none): each tuple batch's item after
        the inputs the step hands on as they are (read off the first batch), else its second item. Inputs that
        only training gives (``labels``) are not inputs here; ``signature`` is the submodule's as written (a
        prepared graph's forward may name its inputs otherwise)."""
        found = self._read(batches[0]) if batches and self.batch_to_input is None and _is_tuple(batches[0]) else None
        if found is None:
            return batch_targets(batches)
        call, moved = found
        prediction = inference_inputs(signature or forward_signature(self.target()), call)
        return batch_targets(batches, max(_passed_items(moved, prediction), 1))

    def _guess(self, why: str) -> None:
        if self.guessed is None:
            rank_zero_warn(
                f"lightning-quant could not read how {type(self.pl_module).__name__}.{self.step} calls the quantized "
                f"module ({why[:300]}); its inputs are read off each batch instead (a tensor, the first item of a "
                "tuple or its first n for a forward of n inputs, or a mapping of keyword inputs). Pass "
                "batch_to_input= if that is not the call"
            )
        self.guessed = why


def _is_tuple(batch: Any) -> bool:
    return isinstance(batch, Sequence) and not isinstance(batch, str)


def _passed_items(batch: Any, inputs: ExampleInputs) -> int:
    """1 + the index of the last item of a tuple ``batch`` that ``inputs`` hold as it is (the same tensor), else 0."""
    if not _is_tuple(batch):
        return 0
    held = {
        (t.data_ptr(), tuple(t.shape))
        for t in (*inputs.args, *inputs.kwargs.values())
        if isinstance(t, torch.Tensor) and t.numel() > 0
    }
    passed = [
        i
        for i, item in enumerate(batch)
        if isinstance(item, torch.Tensor) and item.numel() > 0 and (item.data_ptr(), tuple(item.shape)) in held
    ]
    return passed[-1] + 1 if passed else 0


def _to_module_device(pl_module: pl.LightningModule, batch: Any) -> Any:
    """``batch`` as the step receives it in the loop: through the DataModule's and the LightningModule's
    batch-transfer hooks, on the module's device."""
    try:
        datamodule = getattr(pl_module.trainer, "datamodule", None)
    except RuntimeError:  # not attached to a Trainer
        datamodule = None
    owners = [o for o in (datamodule, pl_module) if o is not None]
    for owner in owners:
        if is_overridden("on_before_batch_transfer", owner):
            batch = owner.on_before_batch_transfer(batch, 0)
    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
    for owner in owners:
        if is_overridden("on_after_batch_transfer", owner):
            batch = owner.on_after_batch_transfer(batch, 0)
    return batch

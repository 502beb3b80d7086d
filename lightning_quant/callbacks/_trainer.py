"""What the callbacks read off the Trainer and the LightningModule: a stage's dataloader, the validation metric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """Every callback of the Trainer, in order (Lightning sets the attribute at run time)."""
    return list(trainer.callbacks)  # type: ignore[attr-defined]


def first_of(loaders: Any) -> Any:
    """The first loader of a collection of loaders (Lightning accepts lists and dicts of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence) and not isinstance(loaders, DataLoader):
        return loaders[0] if loaders else None
    return loaders


def stage_dataloader(trainer: pl.Trainer, stage: str) -> Any:
    """The dataloader the given stage will read, from whichever source the user gave it (a loader passed to
    ``fit``/``validate``, a LightningModule hook or a DataModule hook), without starting the stage's loop.

    Lightning has no public view of a loader passed to ``fit(model, loader)`` before its loop starts, and
    asking the loop to set up its data early (``fit_loop.setup_data()``) would keep that loader from taking
    the state a resumed run restores into it (a stateful loader would restart its epoch). So the loop's
    data source is read where it is, feature-detected; where a Lightning release has none, the hooks of the
    DataModule and the LightningModule answer (and, failing those, the callbacks fall back to
    ``example_input_array`` and say so).
    """
    loop = {
        "fit": trainer.fit_loop,
        "validate": trainer.validate_loop,
        "test": trainer.test_loop,
        "predict": trainer.predict_loop,
    }[stage]
    source = getattr(loop, "_data_source", None)
    if source is not None and callable(getattr(source, "is_defined", None)) and hasattr(source, "instance"):
        if source.instance is None or not source.is_defined():
            return None
        return first_of(source.dataloader())
    return _hook_dataloader(trainer, {"fit": "train", "validate": "val"}.get(stage, stage))


def _hook_dataloader(trainer: pl.Trainer, prefix: str) -> Any:
    """``<prefix>_dataloader()`` of the DataModule, else of the LightningModule where it defines one."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    hook = f"{prefix}_dataloader"
    for owner in (getattr(trainer, "datamodule", None), trainer.lightning_module):
        if owner is not None and is_overridden(hook, owner):
            return first_of(getattr(owner, hook)())
    return None


def module_metric(pl_module: pl.LightningModule) -> Any:
    """The validation metric the LightningModule exposes (a torchmetrics attribute named ``val_*``), if any."""
    import torchmetrics

    for name, child in pl_module.named_children():
        if name.startswith("val") and isinstance(child, torchmetrics.Metric):
            return child
    return None


def metric_name(pl_module: pl.LightningModule, metric: Any) -> str:
    """``acc`` for a metric held as ``val_acc`` (the attribute name without its ``val`` prefix)."""
    for name, child in pl_module.named_children():
        if child is metric:
            return name.removeprefix("val").lstrip("_") or "metric"
    return type(metric).__name__

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


def _loop_for_stage(trainer: pl.Trainer, stage: str) -> Any:
    return {
        "fit": trainer.fit_loop,
        "validate": trainer.validate_loop,
        "test": trainer.test_loop,
        "predict": trainer.predict_loop,
    }[stage]


def stage_dataloader(trainer: pl.Trainer, stage: str) -> Any:
    """The dataloader the given stage will read, from whichever source the user gave it.

    Lightning exposes no public accessor for this before the loop starts, so the loop's data
    source is read; it resolves a LightningModule hook, a DataModule hook or a passed loader alike.
    """
    source = _loop_for_stage(trainer, stage)._data_source
    if source.instance is None or not source.is_defined():
        return None
    return first_of(source.dataloader())


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

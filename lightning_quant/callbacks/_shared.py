"""Steps every quantization callback takes the same way: find inputs, check the strategy, export."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
import torch.nn as nn
from torch.utils.data import DataLoader

from lightning_quant.export import export_int8

from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs, batch_inputs


def check_strategy(trainer: "pl.Trainer", owner: str) -> None:
    """Raise for strategies that shard or replace modules (FSDP, DeepSpeed): QAT modules need whole layers."""
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"{owner} supports single-device and DDP strategies, got {type(trainer.strategy).__name__}: "
            'use strategy="ddp" (or "auto" on one device)'
        )


def _loop_for_stage(trainer: "pl.Trainer", stage: str) -> Any:
    return {
        "fit": trainer.fit_loop,
        "validate": trainer.validate_loop,
        "test": trainer.test_loop,
        "predict": trainer.predict_loop,
    }[stage]


def first_of(loaders: Any) -> Any:
    """The first loader of a collection of loaders (Lightning accepts lists and dicts of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence) and not isinstance(loaders, DataLoader):
        return loaders[0] if loaders else None
    return loaders


def stage_dataloader(trainer: "pl.Trainer", stage: str) -> Any:
    """The dataloader the given stage will read, from whichever source the user gave it.

    Lightning exposes no public accessor for this before the loop starts, so the loop's data
    source is read; it resolves a LightningModule hook, a DataModule hook or a passed loader alike.
    """
    source = _loop_for_stage(trainer, stage)._data_source
    if source.instance is None or not source.is_defined():
        return None
    return first_of(source.dataloader())


def example_inputs_for(
    trainer: "pl.Trainer",
    pl_module: "pl.LightningModule",
    stage: str,
    batch_to_input: Optional[Callable[[Any], Any]],
    owner: str,
) -> ExampleInputs:
    """Model inputs from ``example_input_array``, else from the first batch of the stage's data."""
    if pl_module.example_input_array is not None:
        return ExampleInputs.from_value(pl_module.example_input_array).to("cpu")
    loader = stage_dataloader(trainer, stage)
    batch = next(iter(loader), None) if loader is not None else None
    if batch is None:
        raise ValueError(
            f"{owner} needs one real input to prepare the model: set `example_input_array` on "
            f"{type(pl_module).__name__} or give the Trainer a non-empty {stage} dataloader"
        )
    return batch_inputs(batch, batch_to_input).to("cpu")


def resolve_export_dir(config: QuantizationConfig, trainer: "pl.Trainer") -> Path:
    if config.export_dir is not None:
        return Path(config.export_dir)
    return Path(trainer.log_dir or trainer.default_root_dir) / "quantized"


def publish_int8(
    trainer: "pl.Trainer",
    pl_module: "pl.LightningModule",
    callback: Any,
    convert: Callable[[str], "nn.Module"],
    label: str,
    description: str,
) -> None:
    """The end of every quantization callback: convert, export, announce.

    Sets ``callback.quantized_model`` to ``convert(<backend engine>)``; on global rank 0 exports
    it to each target (converting again only for a target that needs another engine) into
    ``callback.export_records``/``export_paths``; then calls ``on_quantized`` on the Trainer's callbacks.
    """
    config = callback.config
    callback.quantized_model = convert(config.engine)
    rank_zero_info(f"[{label}] {description}: callback.quantized_model")
    if config.export and trainer.is_global_zero:
        converted = {config.engine: callback.quantized_model}

        def int8_for(engine: str) -> "nn.Module":
            if engine not in converted:
                converted[engine] = convert(engine)
            return converted[engine]

        directory = resolve_export_dir(config, trainer)
        callback.export_records = export_int8(
            int8_for, config.export, directory, callback.example_inputs, config.backend
        )
        callback.export_paths = log_export_records(trainer, label.lower(), callback.export_records)
    notify(trainer, "on_quantized", trainer, pl_module, callback)


def log_export_records(trainer: "pl.Trainer", prefix: str, records: Mapping[str, Any]) -> dict[str, str]:
    """Tell the user where files went and log each reload difference to the Trainer's loggers."""
    for target, record in records.items():
        rank_zero_info(f"[{prefix}] {target}: {record.path} (reloaded output max |diff| {record.max_abs_diff:.3g})")
    metrics = {f"{prefix}/export_max_abs_diff_{t}": r.max_abs_diff for t, r in records.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    return {target: str(record.path) for target, record in records.items()}


def notify(trainer: "pl.Trainer", hook: str, *args: Any) -> None:
    """Call ``hook(*args)`` on every Trainer callback that defines it.

    The quantization callbacks announce two moments this way, so that helpers work in any
    order in the callbacks list: ``on_before_quantization_prepare(trainer, pl_module)`` (the
    float model is about to be rewritten) and ``on_quantized(trainer, pl_module, callback)``
    (``callback.quantized_model`` and ``callback.export_paths`` are ready).
    """
    for callback in trainer.callbacks:
        method = getattr(callback, hook, None)
        if callable(method):
            method(*args)


def module_metric(pl_module: "pl.LightningModule") -> Any:
    """The validation metric the LightningModule exposes (a torchmetrics attribute named ``val_*``), if any."""
    import torchmetrics

    for name, child in pl_module.named_children():
        if name.startswith("val") and isinstance(child, torchmetrics.Metric):
            return child
    return None


def metric_name(pl_module: "pl.LightningModule", metric: Any) -> str:
    """``acc`` for a metric held as ``val_acc`` (the attribute name without its ``val`` prefix)."""
    for name, child in pl_module.named_children():
        if child is metric:
            return name.removeprefix("val").lstrip("_") or "metric"
    return type(metric).__name__

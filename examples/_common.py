"""What the examples share: a quiet Trainer and the float-vs-int8 table."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl

from lightning_quant.evaluation import compare, comparison_table


def trainer(epochs: int, callbacks: list, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
        **kwargs,
    )


def report(title: str, float_net, callback, datamodule, repeats: int = 30) -> dict[str, Any]:
    """Print and return float vs int8 accuracy, size and latency for a fitted callback."""
    metrics = compare(
        copy.deepcopy(float_net).cpu().eval(),
        callback.quantized_model,
        list(datamodule.test_dataloader()),
        callback.example_inputs,
        callback.config.engine,
        repeats=repeats,
        warmup=5,
    )
    print(f"\n{title}\n{comparison_table(metrics)}")
    return metrics

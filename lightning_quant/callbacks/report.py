"""A report of what quantization did, written next to the exported files."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_quant.callbacks._trainer import first_of, module_metric, stage_dataloader, trainer_callbacks
from lightning_quant.callbacks.base import QuantizationCallback, QuantizationListener
from lightning_quant.evaluation.analysis import next_steps
from lightning_quant.evaluation.report import build_report, write_report
from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.sharding import whole_copy
from lightning_quant.quantization.target import resolve_target
from lightning_quant.utils.checks import check_non_negative, check_positive_int
from lightning_quant.utils.files import check_writable_folder

REPORT_DATA = ("val", "test")


class QuantizationReport(QuantizationListener, Callback):
    """After a quantization callback converts, compare float and int8 and write a report.

    Works beside :class:`~lightning_quant.QuantizationAwareTraining` or
    :class:`~lightning_quant.PostTrainingQuantization`, in any order: they announce the int8
    model through ``on_quantized``. On ``max_batches`` batches of ``data`` it measures the task
    metric (the LightningModule's own ``val_*`` torchmetrics attribute when it has one, else
    accuracy or MSE), the SQNR of the outputs, every layer's output SQNR, the observer ranges,
    the size of the state dicts and of the exported files, and the latency of fp32 and int8 at
    batch 1 and the training batch size (medians after warm-up). It writes ``report.json``,
    ``report.md``, ``sqnr.png`` and ``ranges.png`` next to the exports, logs the headline
    figures to the Trainer's loggers (``report/...``), and warns, naming the worst layers and
    the next steps, when int8 loses more than ``threshold`` or any output is not finite.

    Args:
        data: ``"val"`` (default), ``"test"`` or an iterable of batches.
        max_batches: batches used (default 16).
        threshold: largest acceptable metric loss (default 0.01: one point of accuracy).
        batch_sizes: latency batch sizes; ``None`` = 1 and the training batch size.
        report_dir: where to write; ``None`` = the quantization callback's export folder.

    Raises:
        ValueError: an argument outside its allowed values.

    Example::

        >>> from lightning_quant import QuantizationAwareTraining
        >>> callbacks = [QuantizationAwareTraining(), QuantizationReport(threshold=0.02)]
    """

    def __init__(
        self,
        data: str | Iterable[Any] = "val",
        max_batches: int = 16,
        threshold: float = 0.01,
        batch_sizes: Sequence[int] | None = None,
        report_dir: str | Path | None = None,
    ) -> None:
        if isinstance(data, str) and data not in REPORT_DATA:
            raise ValueError(f"data must be one of {REPORT_DATA} or an iterable of batches, got {data!r}")
        if not isinstance(data, (str, Iterable)):
            raise TypeError(f"data must be one of {REPORT_DATA} or an iterable of batches, got {data!r}")
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise TypeError(f"report_dir must be a path or None, got {report_dir!r}")
        check_positive_int(max_batches, "max_batches")
        check_non_negative(threshold, "threshold")
        if batch_sizes is not None and (
            isinstance(batch_sizes, (str, int)) or not all(isinstance(b, int) and b > 0 for b in batch_sizes)
        ):
            raise ValueError(f"batch_sizes must be a sequence of positive ints or None, got {batch_sizes!r}")
        self.data, self.max_batches, self.threshold = data, max_batches, float(threshold)
        self.batch_sizes = tuple(batch_sizes) if batch_sizes is not None else None
        self.report_dir = report_dir
        self.report: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}
        self._fp32: nn.Module | None = None

    # ------------------------------------------------------------------ hooks: when
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A folder that cannot receive the report fails now, not after training (``report_dir``, else the
        quantization callback's export folder)."""
        if not trainer.is_global_zero:
            return
        if self.report_dir is not None:
            check_writable_folder(self.report_dir, "report_dir")
            return
        quant = next((c for c in trainer_callbacks(trainer) if isinstance(c, QuantizationCallback)), None)
        if quant is not None:
            check_writable_folder(quant.export_dir(trainer), "report_dir=None: the export folder")

    @override
    def on_before_quantization_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """QAT is about to rewrite the model: keep its float architecture for fp32 size and latency."""
        quant = next((c for c in trainer_callbacks(trainer) if isinstance(c, QuantizationCallback)), None)
        path = quant.config.module if quant is not None else None
        self._fp32 = copy.deepcopy(resolve_target(pl_module, path)[1]).cpu().eval()

    @override
    def on_quantized(self, trainer: pl.Trainer, pl_module: pl.LightningModule, callback: QuantizationCallback) -> None:
        self._report(trainer, pl_module, callback)  # every rank: under DDP the metric covers all ranks' data

    # ------------------------------------------------------------------ helpers: what
    def _batches(self, trainer: pl.Trainer) -> list[Any]:
        if not isinstance(self.data, str):
            source = self.data
        elif self.data == "val" and first_of(trainer.val_dataloaders) is not None:
            source = first_of(trainer.val_dataloaders)  # what validation read (this rank's shard under DDP)
        else:
            source = stage_dataloader(trainer, "validate" if self.data == "val" else "test")
        if source is None:
            raise ValueError(
                f"QuantizationReport(data={self.data!r}) found no such dataloader on the Trainer: "
                "give one, or pass data=<an iterable of batches>"
            )
        batches = []
        for batch in source:
            batches.append(batch)
            if len(batches) == self.max_batches:
                break
        return batches

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, callback: QuantizationCallback) -> None:
        batches = self._batches(trainer)
        config = callback.config
        fp32 = self._fp32 if self._fp32 is not None else whole_copy(callback.target(pl_module)).cpu().eval()
        example = callback.example_inputs
        if example is None or callback.quantized_model is None:
            raise RuntimeError(f"{type(callback).__name__} announced a model it has not quantized")
        train_bs = example.batch_size or 32
        steps = next_steps(
            bool(config.per_channel),
            config.observer.value,
            callback.calibration_batches_used,
            qat=callback.learns_ranges,
        )
        self.report = build_report(
            fp32_model=fp32,
            reference=callback.float_reference(pl_module),
            int8_model=callback.quantized_model,
            batches=batches,
            example=example,
            engine=config.engine,
            prepared=callback.observed_model(pl_module),
            # timings are of global rank 0 alone, the rank that writes the report: every rank timing at once
            # would share the machine's cores and time each other; the other ranks join only the metric
            export_paths=callback.export_paths if trainer.is_global_zero else {},
            batch_sizes=(self.batch_sizes or tuple(dict.fromkeys((1, train_bs)))) if trainer.is_global_zero else (),
            targets=callback.targets_reader(pl_module, self.data if isinstance(self.data, str) else "val")(batches),
            metric=module_metric(pl_module),
            threshold=self.threshold,
            next_steps=steps,
            batch_to_input=callback.inputs_reader(pl_module, self.data if isinstance(self.data, str) else "val"),
            reducer=RankReducer.current(trainer.strategy.root_device),
            backend=config.backend.value,
        )
        if trainer.is_global_zero:
            directory = Path(self.report_dir) if self.report_dir is not None else callback.export_dir(trainer)
            self.paths = write_report(self.report, directory)
            self._log(trainer, self.report)
        trainer.strategy.barrier("lightning_quant.report")

    def _log(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        headline = {"report/output_sqnr_db": report["output_sqnr_db"], "report/size_ratio": report["sizes"]["ratio"]}
        for bs, fp32 in report["latency_ms"]["fp32"].items():
            headline[f"report/speedup_b{bs}"] = fp32 / report["latency_ms"]["int8"][bs]
        if "metric" in report:
            headline.update(
                {
                    "report/float_metric": report["metric"]["float"],
                    "report/int8_metric": report["metric"]["int8"],
                    "report/metric_loss": report["metric"]["loss"],
                }
            )
        for logger in trainer.loggers:
            logger.log_metrics(headline, step=trainer.global_step)
        rank_zero_info(f"[report] {self.paths['md']}")
        if report.get("slower_than_float"):
            rank_zero_info(f"[report] {report['slower_than_float']}")
        for warning in report["warnings"]:
            rank_zero_warn(f"{warning}. Next steps: {'; '.join(report['next_steps'])}")

"""Post-training quantization as a callback: calibrate and convert a finished model, then export."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_quant.callbacks._trainer import first_of, stage_dataloader
from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.export import engine_for
from lightning_quant.quantization.arguments import (
    MODE_OPTIONS,
    RECIPE_OPTIONS,
    SEARCH_OPTIONS,
    Search,
    resolve,
    search_options,
    take_deprecated,
)
from lightning_quant.quantization.config import LayerSetting, Precision, QuantizationConfig
from lightning_quant.quantization.convert import convert_copy
from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.flows.dynamic import FP16_ENGINES
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.ptq import (
    Mode,
    builder,
    calibrates,
    check_calibration_data,
    check_layers,
    check_mode_options,
    check_search_latency,
    check_search_score,
    convert_calibrated,
    mode_config,
    prepare_and_calibrate,
    recipe_mode,
    search_candidates,
    search_fastest,
    search_precisions_of,
    search_targets,
    uncalibrated_copy,
)
from lightning_quant.quantization.search import (
    LatencySearch,
    PrecisionSearch,
    SkipSearch,
    budget_search,
    check_precision_ladder,
)
from lightning_quant.quantization.target import resolve_target
from lightning_quant.utils.checks import check_bool, check_non_negative, check_positive_int, parse_enum

CALIBRATION_SOURCES = ("train", "val")


#: how the constructor reads, for messages
PTQ_FORM = "recipe, calibration_data, calibration_batches, module, export, export_dir, batch_to_input, search, "
PTQ_FORM += "progress"


class PostTrainingQuantization(QuantizationCallback):
    """Quantize a trained model without retraining: static (calibrated) or dynamic.

    When: at the end of ``trainer.fit`` and at the end of ``trainer.validate``. The second is
    how a finished model is quantized: ``trainer.validate(model, datamodule=dm,
    ckpt_path="best.ckpt")`` reports the float metrics, then calibrates and converts. Test and
    predict never quantize (they measure, they do not change the model).

    What: a CPU deep copy of the submodule is prepared, fed ``calibration_batches`` batches
    from ``calibration_data`` with observers on and no gradients (a progress bar shows it),
    converted and exported. The trained float model is never modified. Dynamic mode needs no
    calibration. Same quantization arguments, meanings and results (``quantized_model``,
    ``export_paths``) as :class:`~lightning_quant.QuantizationAwareTraining`.

    Args:
        recipe: how the model is quantized, and on which stack, as for
            :class:`~lightning_quant.QuantizationAwareTraining`; the recipe also says the mode: static
            (``FxRecipe``, ``EagerRecipe``, ``Pt2eRecipe``: calibrated activations), dynamic
            (``DynamicRecipe``: activations quantized at run time, no calibration), or torchao's scheme
            (``TorchaoRecipe``, an ``AOBaseConfig``: weight-only or dynamic, no calibration unless the recipe names
            torchao's ``algorithm="awq"|"smoothquant"``, which runs on the calibration batches). Default:
            ``FxRecipe()`` with the ``"histogram"`` observer, the best choice for a few calibration batches.
        calibration_data: ``"train"`` (default: the train dataloader), ``"val"``, or any
            iterable of batches (a DataLoader, a list).
        calibration_batches: batches used for calibration (default 32).
        module, export, export_dir, batch_to_input: as for ``QuantizationAwareTraining``.
        search: a :class:`~lightning_quant.Search` (or a mapping of its fields): keep the most sensitive
            layers at a more exact precision until int8 is within ``max_metric_drop`` of float on
            ``eval_batches`` validation batches, fit a ``max_size_bytes`` budget, or keep float the layers where
            int8 is slower (``latency``). The outcome is in ``skip_search`` (which layers stayed float, or the
            precision of each layer as a pasteable ``layers`` mapping; the score after each step; whether the
            budget was met), ``sensitivity`` (each layer's score when quantized alone) and ``latency_search``.
        progress: show a progress bar while calibrating (rank zero only).
        **deprecated: the previous release's keyword arguments (``mode``, ``backend``, ``flow``, ``observer``,
            ``per_channel``, ``skip``, ``layers``, ``qconfig_mapping``, ``modules_to_fuse``, ``dtype``,
            ``module_types``, ``scheme``, ``group_size``, ``config``, ``max_metric_drop``, ``eval_batches``,
            ``search_precisions``, ``max_size_bytes``, ``search_score``, ``search_latency``): mapped onto a
            recipe and a search, with a ``DeprecationWarning`` that spells the new form.

    Raises:
        ValueError: an argument outside its allowed values; in setup, an empty calibration source.
        TypeError: an argument of the wrong type.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[PostTrainingQuantization(calibration_batches=16)], logger=False)
    """

    label = "PTQ"

    def __init__(
        self,
        recipe: Any = None,
        *,
        calibration_data: str | Iterable[Any] = "train",
        calibration_batches: int = 32,
        module: str | None = None,
        export: str | Sequence[str] | None = "default",
        export_dir: str | Path | None = None,
        batch_to_input: Callable[[Any], Any] | None = None,
        search: Search | Mapping[str, Any] | None = None,
        progress: bool = True,
        **deprecated: Any,
    ) -> None:
        owner = type(self).__name__
        legacy = take_deprecated(owner, deprecated, {**RECIPE_OPTIONS, **MODE_OPTIONS, **SEARCH_OPTIONS}, PTQ_FORM)
        shared = {"module": module, "export": export, "export_dir": export_dir}
        resolved = resolve(owner, recipe, legacy, shared, "histogram")
        super().__init__(resolved.config, batch_to_input)
        searched = search_options(search, legacy, owner)
        dtype, module_types = resolved.dtype, resolved.module_types
        max_metric_drop, eval_batches = searched["max_metric_drop"], searched["eval_batches"]
        search_precisions, max_size_bytes = searched["search_precisions"], searched["max_size_bytes"]
        search_score, search_latency = searched["search_score"], searched["search_latency"]
        self.mode = recipe_mode(self.config, parse_enum(Mode, resolved.mode, "mode"))
        self.config = mode_config(self.config, self.mode)
        self.search_latency = check_search_latency(search_latency, self.mode, self.config.flow)
        self.latency_search: LatencySearch | None = None
        if isinstance(calibration_data, str) and calibration_data not in CALIBRATION_SOURCES:
            raise ValueError(
                f"calibration_data must be one of {CALIBRATION_SOURCES} or an iterable of batches, "
                f"got {calibration_data!r}"
            )
        if not isinstance(calibration_data, (str, Iterable)):
            raise TypeError(
                f"calibration_data must be one of {CALIBRATION_SOURCES} or an iterable of batches, "
                f"got {type(calibration_data).__name__}"
            )
        if not isinstance(calibration_data, str):
            check_calibration_data(calibration_data)
        self.calibration_data = calibration_data
        self.calibration_batches = check_positive_int(calibration_batches, "calibration_batches")
        self.dtype = dtype
        self.module_types = check_mode_options(self.mode, dtype, module_types, self.config.flow)
        self.progress = check_bool(progress, "progress")
        self.max_metric_drop = check_non_negative(max_metric_drop, "max_metric_drop", allow_none=True)
        self.eval_batches = check_positive_int(eval_batches, "eval_batches")
        self.search_precisions = check_precision_ladder(
            search_precisions, search_precisions_of(self.mode, self.config.flow)
        )
        self.max_size_bytes = check_positive_int(max_size_bytes, "max_size_bytes", allow_none=True)
        self.search_score = check_search_score(search_score)
        self.skip_search: SkipSearch | PrecisionSearch | None = None
        self.sensitivity: dict[str, float] = {}
        self.calibrated_model: nn.Module | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode.value, backend=self.config.backend.value, module=self.config.module
        )

    # ------------------------------------------------------------------ hooks: when
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self._check_strategy(trainer)
        self._check_alone(trainer, pl_module)
        self._target_path, target = resolve_target(pl_module, self.config.module)
        check_layers(target, self.config, self.mode, self.module_types, self.dtype)
        self._check_fp16_engines()
        self.example_inputs = self._take_example_inputs(trainer, pl_module, stage)
        self._check_export_dir(trainer)
        self._rehearse(target, self._trial_conversion(target))
        if self._calibrates:
            source = self._calibration_batches_source(trainer)
            if source is None:
                raise ValueError(
                    f"calibration_data={self.calibration_data!r} but the Trainer has no such dataloader; "
                    "give one, or pass calibration_data=<an iterable of batches>"
                )
            check_calibration_data(source, f"calibration_data={self.calibration_data!r}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_real_call(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._record_real_call(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forget_real_call()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantize_and_export(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._quantize_and_export(trainer, pl_module)

    # ------------------------------------------------------------------ helpers: what
    def _search_float_islands(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module
    ) -> QuantizationConfig:
        """Run the skip search on validation batches; returns the config with the layers kept in float."""
        loader = first_of(trainer.val_dataloaders) or stage_dataloader(trainer, "validate")
        eval_stage = "val" if loader is not None else self._calibration_stage
        eval_reader = self.inputs_reader(pl_module, eval_stage)
        loader = loader or self._calibration_source(trainer)
        batches = list(itertools.islice(iter(loader), self.eval_batches))
        reducer = self._reducer(trainer)
        build = builder(
            target,
            self.config,
            self.mode,
            self._calibration_source(trainer) if self._calibrates else None,
            self.calibration_batches,
            self.inputs_reader(pl_module, self._calibration_stage),
            self.dtype,
            self.module_types,
            reducer=reducer,
        )
        layers = search_candidates(target, self.config, self.mode, self.module_types, self.dtype)
        self.skip_search, self.sensitivity = budget_search(
            target,
            build,
            layers,
            batches,
            self.config.engine,
            self.max_metric_drop,
            search_targets(batches, self.search_score, read=self.targets_reader(pl_module, eval_stage)),
            eval_reader,
            reducer=reducer,
            ladder=self.search_precisions,
            max_size_bytes=self.max_size_bytes,
        )
        search = self.skip_search
        budget = (
            f"metric within {self.max_metric_drop} of float {search.reference:.4f}"
            if self.max_metric_drop is not None
            else ""
        )
        if self.max_size_bytes is not None:
            budget += f"{' and ' if budget else ''}at most {self.max_size_bytes} bytes"
        verdict = "met" if search.met else "MISSED with every candidate layer as exact as it can be"
        rank_zero_info(
            f"[PTQ] budget {budget}: {verdict}; all-int8 {search.full_int8:.4f}, final {search.final:.4f}; "
            f"layers: {search.layers}"
        )
        if isinstance(search, PrecisionSearch):
            rules = tuple(self.config.layers) + tuple((n, LayerSetting(Precision(p))) for n, p in search.layers.items())
            return dataclasses.replace(self.config, layers=rules)
        return dataclasses.replace(self.config, skip=tuple(self.config.skip) + tuple(search.skipped))

    def _uncalibrated_conversion(self, target: nn.Module, config: QuantizationConfig) -> Callable[[str], nn.Module]:
        """``engine -> int8 copy of target`` for the modes that need no calibration (dynamic, torchao's schemes)."""
        return lambda engine: uncalibrated_copy(target, config, self.module_types, self.dtype, engine)

    @override
    def _rehearsal_key(self, float_module: nn.Module, example: ExampleInputs) -> str:
        mode = f"|{self.mode.value}|{self.dtype}|{self.module_types}"
        return super()._rehearsal_key(float_module, example) + mode

    def _trial_conversion(self, target: nn.Module) -> Callable[[str], nn.Module]:
        """``engine -> int8 model`` as the end of fit makes it, calibrated on the example inputs alone: for
        the rehearsal before training."""
        if not self._calibrates:
            return self._uncalibrated_conversion(target, self.config)
        calibrated: list[nn.Module] = []

        def convert(engine: str) -> nn.Module:
            assert self.example_inputs is not None, "taken in setup"
            if not calibrated:
                example = self.example_inputs.to("cpu")
                calibrated.append(prepare_and_calibrate(target, [example], self.config, 1, None, example, False))
            return convert_calibrated(calibrated[0], self.config, engine)

        return convert

    @override
    def float_reference(self, pl_module: pl.LightningModule) -> nn.Module:
        """A CPU copy computing float outputs under the int8 model's module names (for per-layer error)."""
        return copy.deepcopy(
            self.calibrated_model if self.calibrated_model is not None else self.target(pl_module)
        ).cpu()

    @override
    def observed_model(self, pl_module: pl.LightningModule) -> nn.Module | None:
        """The model holding the calibrated observers (static mode), for their ranges."""
        return self.calibrated_model

    @property
    @override
    def calibration_batches_used(self) -> int | None:
        return self.calibration_batches if self._calibrates else None

    @property
    def _algorithm_said(self) -> str:
        return f" ({self.config.algorithm.value})" if self.config.algorithm is not None else ""

    @property
    def _calibrates(self) -> bool:
        """Static ranges, or a torchao algorithm that chooses the weights from calibration batches."""
        return calibrates(self.mode, self.config)

    def _check_fp16_engines(self) -> None:
        """fp16 (the dtype, a layer setting, a step of the search) needs x86/fbgemm for every engine converted for."""
        if self.mode is not Mode.DYNAMIC:
            return
        wants_fp16 = (
            self.dtype == "float16"
            or "fp16" in self.search_precisions
            or any(s.precision is Precision.FP16 or s.dtype == "float16" for _, s in self.config.layers)
        )
        engines = {engine_for(target, self.config.backend) for target in self.config.export} | {self.config.engine}
        blocked = sorted(engines - set(FP16_ENGINES))
        if wants_fp16 and blocked:
            raise ValueError(
                f"fp16 weights (dtype, layers or search_precisions) cannot run on the {blocked} engine "
                f"(backend={self.config.backend.value!r}, export={[t.value for t in self.config.export]}): "
                f"qnnpack has no half-precision kernels; drop 'mobile' from export, or keep to int8 and float"
            )

    @staticmethod
    def _reducer(trainer: pl.Trainer) -> RankReducer | None:
        """How the ranks of a DDP run merge what they measured (``None`` in one process)."""
        return RankReducer.current(trainer.strategy.root_device)

    def _calibration_source(self, trainer: pl.Trainer) -> Iterable[Any]:
        """The calibration batches: the loader the run read (under DDP, this rank's shard of it),
        else the stage's dataloader (setup has checked that one exists)."""
        if self.calibration_data == "train" and trainer.train_dataloader is not None:
            return first_of(trainer.train_dataloader)
        if self.calibration_data == "val" and first_of(trainer.val_dataloaders) is not None:
            return first_of(trainer.val_dataloaders)
        source = self._calibration_batches_source(trainer)
        if source is None:
            raise ValueError(f"calibration_data={self.calibration_data!r}: the Trainer has no such dataloader")
        return source

    @property
    def _calibration_stage(self) -> str:
        """Whose step reads the calibration batches: ``validation_step`` for ``calibration_data="val"``, else
        ``training_step``."""
        return "val" if self.calibration_data == "val" else "train"

    def _calibration_batches_source(self, trainer: pl.Trainer) -> Iterable[Any] | None:
        if not isinstance(self.calibration_data, str):
            return self.calibration_data
        return stage_dataloader(trainer, "fit" if self.calibration_data == "train" else "validate")

    def _quantize_and_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        config = self.config
        if self.max_metric_drop is not None or self.max_size_bytes is not None:
            config = self._search_float_islands(trainer, pl_module, target)
        self.calibrated_model = None
        if not self._calibrates:
            convert = self._uncalibrated_conversion(target, config)
        else:
            calibrated = prepare_and_calibrate(
                target,
                self._calibration_source(trainer),
                config,
                self.calibration_batches,
                self.inputs_reader(pl_module, self._calibration_stage),
                self.example_inputs,
                progress=self.progress and trainer.is_global_zero,
                reducer=self._reducer(trainer),
            )
            self.calibrated_model = calibrated
            kept: list[str] = []
            if self.search_latency:
                assert self.example_inputs is not None, "taken in setup"
                if trainer.is_global_zero:  # one timing decides, so every rank converts the same model
                    self.latency_search = search_fastest(
                        calibrated, target, self.example_inputs.to("cpu"), config.engine
                    )
                    kept = self.latency_search.kept_float
                kept = trainer.strategy.broadcast(kept, src=0)
                rank_zero_info(f"[PTQ] latency search kept {len(kept)} layer(s) float: {kept[:10]}")

            def convert(engine: str) -> nn.Module:
                if kept:
                    return convert_copy(calibrated, config.flow, engine, kept)
                return convert_calibrated(calibrated, config, engine)

        self._publish(
            trainer,
            pl_module,
            convert,
            f"{self.mode.value} int8 model{self._algorithm_said} of {self._target_path!r} for {self.config.engine}",
        )

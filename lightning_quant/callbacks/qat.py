"""Quantization-aware training as one line on a Trainer."""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_quant.callbacks._trainer import first_of, metric_name, module_metric, stage_dataloader
from lightning_quant.callbacks.base import QuantizationCallback
from lightning_quant.evaluation.analysis import Fidelity
from lightning_quant.evaluation.fidelity import check_conversion
from lightning_quant.quantization.arguments import RECIPE_OPTIONS, SCHEDULE_OPTIONS, resolve, take_deprecated
from lightning_quant.quantization.calibrate import first_non_finite_layer
from lightning_quant.quantization.convert import convert_copy, unobserved
from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.flows import get_flow, inference_view
from lightning_quant.quantization.flows.spec import SPECS, check_qat_native, spec_of, spelled
from lightning_quant.quantization.inputs import (
    ExampleInputs,
    describe_inputs,
    input_kinds,
)
from lightning_quant.quantization.outputs import collect_outputs, is_causal_lm, task_metric
from lightning_quant.quantization.recipe import attach, static_recipe
from lightning_quant.quantization.schedule import (
    Phase,
    QATSchedule,
    is_prepared,
    observer_states,
    project_learned_ranges,
    restore_observer_states,
    set_bn_frozen,
    set_fake_quant,
    set_observers,
)
from lightning_quant.quantization.sharding import keep_skeleton, whole_copy
from lightning_quant.quantization.target import replace_target, resolve_target
from lightning_quant.utils.checks import check_bool

log = logging.getLogger(__name__)

#: validation batches the int8 model is compared with its fake-quant model on, after fit
FIDELITY_BATCHES = 4


#: how the constructor reads, for messages
QAT_FORM = "recipe, schedule, module, export, export_dir, batch_to_input, convert_on_fit_end, validate_int8, "
QAT_FORM += "keep_diverging_float"


class QuantizationAwareTraining(QuantizationCallback):
    """Train with fake quantization, then convert to int8 and export, from one callback.

    The model is prepared in ``setup``, before Lightning restores a checkpoint, wraps the
    model in DDP or builds the optimizer, so all three see the QAT modules. Observers learn
    from training batches only: sanity check, validation, test and predict pause them and
    restore them afterwards. At the end of fit a CPU deep copy is converted to int8
    (``quantized_model``) and exported; the QAT model stays trainable. The int8 model is
    compared with the fake-quant model it came from on a few validation batches
    (``fidelity``: the mean cosine of their outputs, logged as ``qat/int8_fidelity``); below
    0.98 a warning names the layers where they part.

    Other callbacks hear of two moments, in any order in the callbacks list: just before
    preparing, ``on_before_quantization_prepare(trainer, pl_module)`` (``KnowledgeDistillation``
    copies the float model then), and after converting and exporting,
    ``on_quantized(trainer, pl_module, callback)`` (``QuantizationReport`` writes its report).

    Schedule (:class:`~lightning_quant.QATSchedule`, in epochs or in optimizer steps, one unit per run):
    fake quantization and observers are off before ``quant_start_*`` (float warm-up); scales and zero points
    stop moving from ``freeze_observers_*`` on; BatchNorm running statistics stop updating from
    ``freeze_bn_*`` on.

    Args:
        recipe: how the model is quantized, and on which stack (:mod:`~lightning_quant.quantization.flows.recipes`):
            a recipe (``FxRecipe(backend="qnnpack")``, ``EagerRecipe``, ``Pt2eRecipe``, ``TorchaoRecipe``), a
            stack's own object (a torchao ``QATConfig`` or ``AOBaseConfig`` such as
            ``Int8DynamicActivationIntxWeightConfig``; a pt2e ``Quantizer`` built with ``is_qat=True``; a
            torch.ao ``QConfigMapping``), or a shorthand (``"x86"``, ``"qnnpack"``, ``"xnnpack"``,
            ``"int8_dyn_int4_weight"``...). Default: ``FxRecipe()`` (fx, x86).
        schedule: a :class:`~lightning_quant.QATSchedule` (or a mapping of its fields, as YAML gives it);
            default: fake quantization from the first step, nothing frozen.
        module: dotted path of the submodule of the LightningModule to quantize; ``None`` picks
            its only child with parameters.
        export: ``"default"`` (the flow's own files), ``None``, or targets of the flow: ``"torchscript"``,
            ``"mobile"``, ``"onnx"`` (fx, eager); ``"pt2"``, ``"executorch"`` (pt2e, torchao);
            ``"state_dict"``, ``"safetensors"`` (torchao's weights), ``"hf"`` (torchao: a folder
            ``transformers``' ``from_pretrained`` loads).
        export_dir: folder for exported files (default ``<trainer.log_dir>/quantized``).
        batch_to_input: callable turning a batch into the model's input, where the call the LightningModule
            makes cannot be recorded (see :class:`~lightning_quant.QuantizationCallback`).
        convert_on_fit_end: convert a copy to int8 and export at the end of fit (default True).
        validate_int8: at the end of each validation epoch of fit, convert a CPU copy and run the
            validation data through it, logging ``val/<metric>_int8`` beside the fake-quant
            metrics: the LightningModule's own ``val_*`` torchmetrics attribute when it has one
            (``val_acc`` gives ``val/acc_int8``), else ``val/accuracy_int8`` or ``val/mse_int8``.
            Skipped (with a log line) while quantization has not started.
        keep_diverging_float: when the int8 model follows its fake-quant model to a cosine under
            0.98 after fit, convert again with the layers where they part kept float (and export
            that), if it follows more closely. ``None`` (default): on for the flows whose conversion can leave
            layers float after training (fx); the warning names the layers either way.
        **deprecated: the previous release's keyword arguments (``backend``, ``flow``, ``observer``,
            ``per_channel``, ``skip``, ``layers``, ``qconfig_mapping``, ``modules_to_fuse``, ``scheme``,
            ``group_size``, ``config``, ``quant_start_epoch``, ``freeze_observers_epoch``, ``freeze_bn_epoch``):
            mapped onto a recipe and a schedule, with a ``DeprecationWarning`` that spells the new form.

    Raises:
        ValueError: an argument outside its allowed values (the message lists them).
        TypeError: an argument of the wrong type.
        ModuleNotFoundError: ``export`` names ONNX and ``onnx`` is not installed.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> qat = QuantizationAwareTraining("x86", schedule=QATSchedule(quant_start_epoch=1, freeze_observers_epoch=3))
        >>> trainer = Trainer(callbacks=[qat], logger=False)
    """

    STATE_VERSION = 3  # 2: also observer and per_channel; 3: also scheme and group_size
    label = "QAT"
    shards_with_fsdp2 = True

    def __init__(
        self,
        recipe: Any = None,
        schedule: QATSchedule | Mapping[str, Any] | None = None,
        *,
        module: str | None = None,
        export: str | Sequence[str] | None = "default",
        export_dir: str | Path | None = None,
        batch_to_input: Callable[[Any], Any] | None = None,
        convert_on_fit_end: bool = True,
        validate_int8: bool = False,
        keep_diverging_float: bool | None = None,
        **deprecated: Any,
    ) -> None:
        owner = type(self).__name__
        legacy = take_deprecated(owner, deprecated, {**RECIPE_OPTIONS, **SCHEDULE_OPTIONS}, QAT_FORM)
        shared = {"module": module, "export": export, "export_dir": export_dir}
        config = resolve(owner, recipe, legacy, shared, "moving_average").config
        if config.algorithm is not None:
            raise ValueError(
                f"algorithm={config.algorithm.value!r} is a post-training algorithm (torchao's, run on calibration "
                "batches): use it with PostTrainingQuantization or quantize(); QAT learns the weights itself, so leave "
                "algorithm out of the recipe"
            )
        super().__init__(config, batch_to_input)
        epochs = {**SCHEDULE_OPTIONS, **{k: v for k, v in legacy.items() if k in SCHEDULE_OPTIONS}}
        self.schedule = _schedule_from(
            schedule, epochs["quant_start_epoch"], epochs["freeze_observers_epoch"], epochs["freeze_bn_epoch"]
        )
        spec = spec_of(self.config.flow)
        if self.config.recipe is not None:
            check_qat_native(self.config.recipe)
        if not spec.observes and self.schedule.freeze_observers is not None:
            unit = self.schedule.unit
            raise ValueError(
                f"freeze_observers_{unit}={self.schedule.freeze_observers}, but flow={spec.flow.value!r} has no "
                "observers to freeze: its fake quantization computes every range from the tensor it quantizes, at "
                f"every step; leave freeze_observers_{unit} out"
            )
        self.convert_on_fit_end = check_bool(convert_on_fit_end, "convert_on_fit_end")
        self.validate_int8 = check_bool(validate_int8, "validate_int8")
        if keep_diverging_float is not None:
            check_bool(keep_diverging_float, "keep_diverging_float")
        if keep_diverging_float and not spec.keeps_float:
            able = [s.flow.value for s in SPECS.values() if s.keeps_float]
            raise ValueError(
                f"keep_diverging_float=True needs flow={spelled(able)} (its conversion can leave layers float after "
                f"training), got flow={self.config.flow.value!r}: leave it out (the warning still names the layers), "
                "or train with layers={name: 'float'}"
            )
        self.keep_diverging_float = spec.keeps_float if keep_diverging_float is None else keep_diverging_float
        self._keep_float: list[str] = []
        self._phase: Phase | None = None
        self._load_hook: Any = None
        self._said_float = False
        self._current_batch: Any = None
        # (epoch, batch, loss-is-finite flag on the loss's device): read only to explain a failure
        self._loss_finite: collections.deque[tuple[int, int, torch.Tensor]] = collections.deque(maxlen=256)
        self._saved_observers: dict[str, bool] | None = None
        self.fidelity: Fidelity | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            backend=self.config.backend.value, flow=self.config.flow.value, module=self.config.module
        )

    # ------------------------------------------------------------------ hooks: when
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        self._check_alone(trainer, pl_module)
        path, target = resolve_target(pl_module, self.config.module)
        if stage == "fit":
            self._check_finite_weights(target, path)
            self._check_schedule_fits(trainer)
            if self.convert_on_fit_end:
                self._check_export_dir(trainer)
            if self._target_path is not None and not is_prepared(target):
                self.example_inputs = self.training_call = None  # another model than last time: its own inputs
            self._target_path = path
            self._prepare(trainer, pl_module, stage)
        else:
            # Outside fit the model is evaluated as it is: a float model stays float. A QAT
            # checkpoint (ckpt_path=...) is recognised as Lightning loads it and prepared then.
            self._target_path = path
        self._watch_checkpoint_loads(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_finite_weights(self.target(pl_module), str(self._target_path))
        self._record_real_call(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedule(pl_module, trainer.current_epoch, trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._current_batch = (batch, batch_idx, trainer.current_epoch)
        if self.schedule.unit == "step":
            self._apply_schedule(pl_module, trainer.current_epoch, trainer.global_step)
        if self._phase is not None and self._phase.bn_frozen:
            set_bn_frozen(self.target(pl_module), True)  # Lightning's model.train() after validation unfreezes plain BN

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.config.range_learning:  # after the step: learned scales stay positive
            project_learned_ranges(self.target(pl_module))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._say_if_float(trainer, pl_module)
        self._pause_observers(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_int8 and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validate_int8(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._say_if_float(trainer, pl_module)
        self._pause_observers(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._say_if_float(trainer, pl_module)
        self._pause_observers(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._resume_observers(pl_module)
        self._explain_non_finite(pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forget_real_call()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert_on_fit_end:
            self._convert_and_export(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            **self._recipe(),
            "schedule": asdict(self.schedule),
        }

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._current_batch is not None:  # no host sync: the flag is read only if something fails
            self._loss_finite.append(
                (trainer.current_epoch, self._current_batch[1], torch.isfinite(loss.detach()).all())
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current_batch = None  # kept only to explain a failure inside the epoch

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("schedule", {})
        if saved:
            saved = {**asdict(QATSchedule()), **saved}  # checkpoints before step schedules lack the step fields
        if saved and saved != asdict(self.schedule):
            rank_zero_warn(f"resuming with schedule {asdict(self.schedule)}, the checkpoint was trained with {saved}")

    # ------------------------------------------------------------------ helpers: what
    @override
    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The (prepared) submodule this callback quantizes."""
        if self._target_path is None:
            raise RuntimeError(f"{type(self).__name__} has not prepared a model yet: it does so in Trainer setup")
        return pl_module.get_submodule(self._target_path)

    def convert(self, pl_module: pl.LightningModule, engine: str | None = None) -> nn.Module:
        """An int8 copy of the current QAT model for ``engine`` (default: the backend's); training is untouched.
        Layers the end of fit kept float (``keep_diverging_float``) stay float."""
        return convert_copy(self.target(pl_module), self.config.flow, engine or self.config.engine, self._keep_float)

    @override
    def float_reference(self, pl_module: pl.LightningModule) -> nn.Module:
        """A CPU copy of the QAT model with quantization switched off: float outputs, int8 module names."""
        reference = whole_copy(inference_view(self.target(pl_module))).cpu().eval()
        set_fake_quant(reference, False)
        set_observers(reference, False)
        return reference

    @property
    @override
    def learns_ranges(self) -> bool:
        return True

    @override
    def observed_model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The QAT model, whose fake-quantize modules hold the learnt ranges."""
        return self.target(pl_module)

    def convert_and_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert and export now, as at the end of fit: for a QAT checkpoint loaded by ``validate``,
        say (``trainer.validate(model, ckpt_path=...)`` with this callback, then this)."""
        if not is_prepared(self.target(pl_module)):
            raise ValueError(
                f"{self._target_path!r} holds no quantization state: fit with this callback first, or "
                "validate a QAT checkpoint (ckpt_path=...) before converting"
            )
        self._convert_and_export(trainer, pl_module)

    @override
    def _on_real_call(self, module: nn.Module, real: ExampleInputs) -> None:
        quantized_inputs = getattr(module, "quant", None)  # the eager boundary's stubs, one per float input
        if isinstance(quantized_inputs, nn.ModuleDict):  # (a model's own single QuantStub is used as written)
            floats = sorted(name for name, kind in input_kinds(module, real).items() if kind.startswith("float"))
            if floats != sorted(quantized_inputs):
                guessed = describe_inputs(module, self.example_inputs) if self.example_inputs is not None else "-"
                raise ValueError(
                    f"QuantizationAwareTraining prepared {self._target_path!r} (eager flow) to quantize the float "
                    f"inputs {sorted(quantized_inputs)} read from the data {guessed}, but training calls it with "
                    f"{describe_inputs(module, real)}: set example_input_array on the LightningModule to the "
                    "inputs of that call (a dict for keyword inputs), or pass batch_to_input="
                )
        super()._on_real_call(module, real)

    def _recipe(self) -> dict[str, Any]:
        """How the model is quantized: what a checkpoint records so it can be loaded again."""
        recipe: dict[str, Any] = {
            "backend": self.config.backend.value,
            "flow": self.config.flow.value,
            "module": self._target_path,
            "observer": self.config.observer.value,
            "per_channel": self.config.per_channel,
        }
        if self.config.recipe is not None:  # the user's quantizer decides the model
            recipe["recipe"] = type(self.config.recipe).__name__
        if "scheme" in spec_of(self.config.flow).options:  # the scheme decides the torchao model
            recipe["scheme"] = self.config.scheme.value if self.config.scheme is not None else None
            recipe["group_size"] = self.config.group_size
        return recipe

    def _say_if_float(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" or self._said_float or is_prepared(self.target(pl_module)):
            return
        self._said_float = True
        rank_zero_info(
            f"[QAT] {trainer.state.fn}: {self._target_path!r} holds no quantization state (it was not trained "
            "with QuantizationAwareTraining), so it is evaluated in float; pass a QAT checkpoint (ckpt_path=...) "
            "to evaluate the quantized model"
        )

    def _watch_checkpoint_loads(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Recognise a QAT checkpoint as Lightning loads it into the LightningModule.

        A float model receiving QAT weights is prepared first, so they fit; a QAT checkpoint
        made with other settings raises naming them instead of torch's missing/unexpected keys.
        """
        if self._load_hook is not None:
            self._load_hook.remove()

        def before_load(module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
            self._before_load(trainer, pl_module, stage, state_dict, prefix)

        self._load_hook = pl_module.register_load_state_dict_pre_hook(before_load)

    def _before_load(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, state_dict: Any, prefix: str
    ) -> None:
        target_prefix = f"{prefix}{self._target_path}."
        incoming = {k[len(target_prefix) :] for k in state_dict if k.startswith(target_prefix)}
        if not any("fake_quant" in k for k in incoming):
            if is_prepared(self.target(pl_module)) and stage == "fit" and trainer.ckpt_path is not None:
                name = type(pl_module).__name__
                raise ValueError(
                    f"ckpt_path={str(trainer.ckpt_path)!r} holds a float {self._target_path!r} (saved without "
                    "QuantizationAwareTraining), and fit(ckpt_path=...) resumes that run exactly (optimizer and loop "
                    "state included) into the QAT-prepared model, so a float run cannot resume as a QAT one. To "
                    f"start QAT from these weights, load them and fit anew: model = {name}.load_from_checkpoint(path) "
                    "(or model.load_state_dict(torch.load(path, weights_only=True)['state_dict'])), then "
                    "trainer.fit(model) without ckpt_path"
                )
            if is_prepared(self.target(pl_module)) and stage != "fit":
                raise ValueError(
                    f"the checkpoint holds a float {self._target_path!r} but the model in memory is already "
                    "QAT-prepared: load float checkpoints into a float model (a new LightningModule)"
                )
            return  # float weights into a float model (or a fit that starts QAT from float weights)
        saved = _saved_recipe(trainer)
        ours = self._recipe()
        # the module path is where it was found, which may differ in name only; the rest decides the model
        differs = {k: v for k, v in (saved or {}).items() if k != "module" and ours.get(k) != v}
        if not is_prepared(self.target(pl_module)) and not differs:
            self._prepare(trainer, pl_module, stage)
        expected = set(self.target(pl_module).state_dict())
        if differs or incoming != expected:
            trained = f"trained with {saved}" if saved else "made with other quantization settings"
            raise ValueError(
                f"the checkpoint holds a QAT model of {self._target_path!r} {trained}, but this "
                f"QuantizationAwareTraining is {ours}; create the callback with the checkpoint's settings to "
                "load it ("
                + (
                    f"these differ: {sorted(differs)}"
                    if differs
                    else f"missing e.g. {sorted(expected - incoming)[:3]}, "
                    f"unexpected e.g. {sorted(incoming - expected)[:3]}"
                )
                + ")"
            )

    def _check_finite_weights(self, target: nn.Module, path: str) -> None:
        """Weights that are NaN or Inf before the first step (initialised or loaded so) fail now, named; not at
        the first batch, where they would read as that batch's fault (checked in setup, and again once a
        checkpoint's weights are in).

        Raises:
            ValueError: naming up to five of them.
        """
        tensors: list[tuple[str, torch.Tensor]] = [
            (n, t) for n, t in target.named_parameters() if t.is_floating_point()
        ]
        tensors += [(n, t) for n, t in target.named_buffers() if n.endswith(("running_mean", "running_var"))]
        if not tensors:
            return
        # an FSDP2-sharded weight is checked on this rank's shard (a DTensor's reductions would need placements
        # torch cannot redistribute to after a validation pass), and every rank takes every shard's verdict
        sharded = any(hasattr(t, "to_local") for _, t in tensors)  # DTensors
        local = [t.to_local() if hasattr(t, "to_local") else t for _, t in tensors]
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in local]).to(torch.int32)
        reducer = RankReducer.current(local[0].device) if sharded else None
        if reducer is not None:
            finite = reducer.min(finite)
        if bool(finite.all()):
            return
        bad = [n for (n, _), ok in zip(tensors, finite.tolist(), strict=True) if not ok]
        raise ValueError(
            f"{len(bad)} weight tensors of {path!r} hold NaN or Inf before the first training step, "
            f"as initialised or loaded (no batch has run yet): {bad[:5]}. Quantization cannot represent them; fix "
            "the initialisation or the checkpoint they came from"
        )

    def _explain_non_finite(self, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Add to an error raised by NaN/Inf reaching fake quantization the layer and batch where it appeared."""
        if self._current_batch is None or self._target_path is None or not hasattr(exception, "add_note"):
            return
        batch, batch_idx, epoch = self._current_batch
        found = first_non_finite_layer(self.target(pl_module), self.inputs_reader(pl_module, "train")(batch))
        if found is None:
            return
        first_bad_loss = next(((e, b) for e, b, finite in self._loss_finite if not bool(finite)), None)
        origin = (
            f"; the loss was first non-finite at training batch {first_bad_loss[1]} of epoch {first_bad_loss[0]}, "
            "whose inputs or gradients made the weights non-finite"
            if first_bad_loss is not None
            else ""
        )
        exception.add_note(
            f"lightning-quant: NaN or Inf reached fake quantization at training batch {batch_idx} of epoch "
            f"{epoch}, first in {found}{origin}. Check those batches, the loss and the learning rate (fake "
            "quantization cannot represent non-finite values)"
        )

    def _check_schedule_fits(self, trainer: pl.Trainer) -> None:
        """The fit must reach the schedule's start (by ``max_epochs`` and ``max_steps``), or nothing is quantized."""
        if not self.convert_on_fit_end:
            return
        start, unit = self.schedule.start, self.schedule.unit
        max_epochs = trainer.max_epochs
        steps_per_epoch = _optimizer_steps_per_epoch(trainer)
        if unit == "step":
            limits = []
            if trainer.max_steps > 0:
                limits.append((trainer.max_steps, f"max_steps={trainer.max_steps}"))
            if max_epochs is not None and max_epochs >= 0 and steps_per_epoch:
                limits.append(
                    (
                        max_epochs * steps_per_epoch,
                        f"max_epochs={max_epochs} x {steps_per_epoch} optimizer steps per epoch",
                    )
                )
            for total, said in limits:
                if start >= total:
                    raise ValueError(
                        f"quant_start_step={start} is not before the fit's last optimizer step ({said} = {total} "
                        "steps): the model would never be quantized; lower quant_start_step or train longer"
                    )
            return
        if max_epochs is not None and max_epochs >= 0 and start >= max_epochs:
            raise ValueError(
                f"quant_start_epoch={start} is not before max_epochs={max_epochs}: the model "
                "would never be quantized; lower quant_start_epoch or raise max_epochs"
            )
        if start > 0 and trainer.max_steps > 0 and steps_per_epoch:
            if trainer.max_steps <= start * steps_per_epoch:
                raise ValueError(
                    f"max_steps={trainer.max_steps} ends the fit in epoch {(trainer.max_steps - 1) // steps_per_epoch} "
                    f"({steps_per_epoch} optimizer steps per epoch), before quant_start_epoch={start}: the model would "
                    f"never be quantized; raise max_steps above {start * steps_per_epoch} or lower quant_start_epoch"
                )

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path, target = resolve_target(pl_module, self._target_path or self.config.module)
        self._target_path = path
        if self.example_inputs is None:
            self.example_inputs = self._take_example_inputs(trainer, pl_module, stage)
        if is_prepared(target):  # a second fit, or test/validate after fit: prepare once
            return
        self._notify(trainer, pl_module, "prepare")  # e.g. KD copies the float model
        training = pl_module.training
        call = self.training_call if self.training_call is not None else self.example_inputs
        with torch.random.fork_rng(devices=[]):  # fused QAT layers initialise weights: training draws as without us
            prepared = get_flow(self.config.flow).prepare(target, self.config, call, qat=True)
        attach(prepared, static_recipe(self.config, self.example_inputs, qat=True))  # for save_int8
        if isinstance(trainer.strategy, ModelParallelStrategy):  # configure_model shards it next: keep its structure
            keep_skeleton(prepared)
        replace_target(pl_module, path, prepared)
        prepared.train(training)
        self._apply_schedule(pl_module, trainer.current_epoch, trainer.global_step)
        if self.convert_on_fit_end and str(getattr(stage, "value", stage)) == "fit":  # what fit will make, before it
            self._rehearse(target, self._trial_conversion(prepared, call))
        rank_zero_info(
            f"[QAT] prepared {path!r} ({type(target).__name__}) with the {self.config.flow.value} flow for "
            f"{self.config.backend.value}; schedule {asdict(self.schedule)}"
        )

    def _trial_conversion(self, prepared: nn.Module, call: ExampleInputs) -> Callable[[str], nn.Module]:
        """``engine -> int8 model`` of a copy of the untrained QAT model that has seen ``call`` once with
        fake quantization and observers on: what the end of fit converts, made before training."""
        trial: list[nn.Module] = []

        def convert(engine: str) -> nn.Module:
            if not trial:
                model = copy.deepcopy(prepared).cpu().eval()
                set_fake_quant(model, True)
                set_observers(model, True)
                with torch.no_grad():
                    call.to("cpu")(model)
                trial.append(model)
            return convert_copy(trial[0], self.config.flow, engine)  # (a copy per engine: convert is in place)

        return convert

    def _apply_schedule(self, pl_module: pl.LightningModule, epoch: int, step: int) -> None:
        if self.schedule.unit == "step" and self._phase is not None and self._phase == self.schedule.phase(epoch, step):
            return  # every batch asks; the switches change only at the schedule's steps
        phase = self.schedule.apply(self.target(pl_module), epoch, step)
        if phase != self._phase:
            when = f"step {step}" if self.schedule.unit == "step" else f"epoch {epoch}"
            observers = (
                (
                    "weight ranges learned, activation ranges from each tensor"
                    if self.config.range_learning
                    else "ranges from each tensor"
                )  # torchao: no observers
                if not spec_of(self.config.flow).observes
                else f"observers {'on' if phase.observers else 'off'}"
            )
            rank_zero_info(
                f"[QAT] {when}: fake quantization {'on' if phase.fake_quant else 'off'}, {observers}, "
                f"BatchNorm statistics {'frozen' if phase.bn_frozen else 'updating'}"
            )
        self._phase = phase

    def _pause_observers(self, pl_module: pl.LightningModule) -> None:
        if self._target_path is not None and self._saved_observers is None:
            target = self.target(pl_module)
            self._saved_observers = observer_states(target)
            set_observers(target, False)

    def _resume_observers(self, pl_module: pl.LightningModule) -> None:
        if self._saved_observers is not None:
            restore_observer_states(self.target(pl_module), self._saved_observers)
            self._saved_observers = None

    def _validate_int8(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        if unobserved(target):
            rank_zero_info(
                f"[QAT] epoch {trainer.current_epoch}: int8 validation skipped, quantization has not started"
            )
            return
        loader = first_of(trainer.val_dataloaders)
        limit = first_of(trainer.num_val_batches) if trainer.num_val_batches else None
        batches = list(itertools.islice(iter(loader), int(limit) if limit not in (None, float("inf")) else None))
        targets = self.targets_reader(pl_module, "val")(batches)
        if targets is None:
            return
        to_input = self.inputs_reader(pl_module, "val")
        outputs = collect_outputs(self.convert(pl_module), batches, self.config.engine, to_input)
        metric = module_metric(pl_module)
        # over every rank's validation batches: the value of the whole validation set, on every rank
        reducer = RankReducer.current(trainer.strategy.root_device)
        name, value = task_metric(outputs, targets, metric, reducer, causal=is_causal_lm(target))
        key = metric_name(pl_module, metric) if metric is not None else name
        pl_module.log(f"val/{key}_int8", value, on_epoch=True)

    @override
    def check_converted(self, trainer: pl.Trainer, pl_module: pl.LightningModule, int8: nn.Module) -> nn.Module:
        """Compare the int8 model with the fake-quant model it came from, on a few validation batches (the
        example inputs without a validation set), and repair it where it parts when ``keep_diverging_float``
        (:func:`~lightning_quant.evaluation.fidelity.check_conversion`; rank zero decides, so every rank holds
        the same model). Kept in ``callback.fidelity``; logged as ``qat/int8_fidelity``."""
        batches, to_input = self._fidelity_batches(trainer, pl_module)
        checked = check_conversion(
            self.target(pl_module),
            int8,
            batches,
            to_input,
            self.config.flow,
            self.config.engine,
            repair=self.keep_diverging_float,
            broadcast=lambda names: trainer.strategy.broadcast(names, src=0),
        )
        self.fidelity, self._keep_float = checked.fidelity, checked.kept_float
        if checked.warning:
            rank_zero_warn(checked.warning)
        if self.fidelity is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"qat/int8_fidelity": self.fidelity.cosine}, step=trainer.global_step)
        return checked.model

    def _fidelity_batches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[list[Any], Callable[[Any], Any] | None]:
        """Up to ``FIDELITY_BATCHES`` validation batches, read as ``validation_step`` calls the model; else
        the real call's inputs."""
        loader = first_of(trainer.val_dataloaders) if trainer.val_dataloaders is not None else None
        batches: list[Any] = list(itertools.islice(iter(loader), FIDELITY_BATCHES)) if loader is not None else []
        if batches:
            return batches, self.inputs_reader(pl_module, "val")
        example = self.example_inputs
        return ([example.to("cpu")], None) if example is not None else ([], None)

    def _convert_and_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep_float = []
        self._publish(
            trainer,
            pl_module,
            lambda engine: self.convert(pl_module, engine),
            f"converted {self._target_path!r} to int8 for {self.config.engine}",
        )


def _schedule_from(
    schedule: QATSchedule | Mapping[str, Any] | None,
    quant_start_epoch: int,
    freeze_observers_epoch: int | None,
    freeze_bn_epoch: int | None,
) -> QATSchedule:
    """``schedule`` (a mapping from YAML builds one), else the three epoch arguments'.

    Raises:
        TypeError: ``schedule`` is neither a ``QATSchedule``, a mapping nor ``None``.
        ValueError: ``schedule`` is given and an epoch argument too.
    """
    if schedule is None:
        return QATSchedule(quant_start_epoch, freeze_observers_epoch, freeze_bn_epoch)
    given = [
        name
        for name, value, default in (
            ("quant_start_epoch", quant_start_epoch, 0),
            ("freeze_observers_epoch", freeze_observers_epoch, None),
            ("freeze_bn_epoch", freeze_bn_epoch, None),
        )
        if value != default
    ]
    if given:
        raise ValueError(f"schedule= and {given} both say when QAT starts: put {given} in the QATSchedule")
    if isinstance(schedule, Mapping):
        unknown = sorted(set(schedule) - {f.name for f in fields(QATSchedule)})
        if unknown:
            raise ValueError(
                f"schedule has fields {unknown}; a QATSchedule has {[f.name for f in fields(QATSchedule)]}"
            )
        return QATSchedule(**dict(schedule))
    if not isinstance(schedule, QATSchedule):
        raise TypeError(
            f"schedule must be a QATSchedule, a mapping of its fields or None, got {type(schedule).__name__}"
        )
    return schedule


def _saved_recipe(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The quantization settings a checkpoint being loaded was trained with, from its QAT callback state.

    Lightning loads the weights before the callbacks' state and offers no public view of the checkpoint
    while it does, so the file at ``trainer.ckpt_path`` is opened again: memory-mapped, weights only (no
    code runs, tensors are not read). ``None`` when it cannot tell (no local file): the structure check
    after it still refuses a model of other settings.
    """
    path = trainer.ckpt_path
    if path is None or not Path(str(path)).is_file():
        return None
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return qat_recipe(checkpoint) if isinstance(checkpoint, dict) else None


def qat_recipe(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization settings a Lightning checkpoint's QAT state records, or ``None`` for a checkpoint
    not trained with :class:`QuantizationAwareTraining`."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(QuantizationAwareTraining.__name__) and isinstance(state, dict):
            keys = ("backend", "flow", "module", "observer", "per_channel", "scheme", "group_size", "recipe")
            return {k: state[k] for k in keys if k in state}
    return None


def _optimizer_steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch, from the train dataloader's length (``None`` if it has none)."""
    loader = stage_dataloader(trainer, "fit")
    try:
        batches = len(loader)
    except TypeError:
        return None
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * (limit if limit is not None else 1.0))
    return math.ceil(batches / trainer.accumulate_grad_batches) if batches else None

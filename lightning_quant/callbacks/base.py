"""What every quantization callback shares: one base class, and the two moments other callbacks hear of.

:class:`QuantizationCallback` owns the state QAT and PTQ have in common (``config``,
``example_inputs``, ``quantized_model``, ``export_paths``, the target submodule) and the steps
they take the same way: check the strategy, take example inputs, and *publish* (convert,
export on global rank 0, announce). A subclass says *when* it quantizes and *what* its float
reference and observed model are.

:class:`QuantizationListener` is the type of a callback that listens to those moments:
``on_before_quantization_prepare`` (the float model is about to be rewritten) and
``on_quantized`` (the int8 model and its files are ready). ``KnowledgeDistillation`` and
``QuantizationReport`` are listeners; any callback in the Trainer that is one hears of them,
in whatever order the callbacks list holds them.
"""

from __future__ import annotations

import inspect
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_quant.callbacks._calls import StepCalls, step_name
from lightning_quant.callbacks._trainer import stage_dataloader, trainer_callbacks
from lightning_quant.export import ExportCheckError, ExportFailedError, ExportRecord, export_int8, serialized
from lightning_quant.quantization.config import QuantizationConfig, config_from
from lightning_quant.quantization.convert import allow_int8_kernels_under_determinism, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.spec import spec_of
from lightning_quant.quantization.inputs import (
    ExampleInputs,
    batch_inputs,
    check_example_inputs,
    describe_inputs,
    forward_signature,
    inference_inputs,
    input_kinds,
    required_inputs,
)
from lightning_quant.quantization.target import resolve_target
from lightning_quant.utils.checks import check_callable
from lightning_quant.utils.files import check_writable_folder

#: rehearsals that passed in this process (see ``QuantizationCallback._rehearse``)
_REHEARSED: set[str] = set()


def _per_engine(
    convert: Callable[[str], nn.Module], known: dict[str, nn.Module] | None = None
) -> Callable[[str], nn.Module]:
    """``convert`` called once per engine (a target of another engine converts again, once)."""
    converted = dict(known or {})

    def int8_for(engine: str) -> nn.Module:
        if engine not in converted:
            converted[engine] = convert(engine)
        return converted[engine]

    return int8_for


def _export_failed(err: Exception, config: QuantizationConfig, message: str) -> ExportFailedError:
    """An export failure retold for where the callback met it, naming the same target."""
    return ExportFailedError(getattr(err, "target", config.export[0]), message)


class QuantizationRehearsalError(RuntimeError):
    """The int8 model could not be made or run on the LightningModule's call, found before training."""


@runtime_checkable
class QuantizationListener(Protocol):
    """A callback that hears of the two moments of quantization.

    Subclass it (both methods do nothing unless overridden) or define both methods.
    """

    def on_before_quantization_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The float model is about to be rewritten (QAT prepares it in ``setup``)."""
        return None

    def on_quantized(self, trainer: pl.Trainer, pl_module: pl.LightningModule, callback: QuantizationCallback) -> None:
        """``callback.quantized_model`` and ``callback.export_paths`` are ready."""
        return None


class QuantizationCallback(Callback):
    """The base of the quantization callbacks (QAT and PTQ): shared state, shared steps, override points.

    Args:
        config: what to quantize and how.
        batch_to_input: callable from a batch to the model input (``None``: the usual batch layouts).

    Attributes:
        config: the :class:`~lightning_quant.QuantizationConfig`.
        example_inputs: the quantized submodule's inputs as the LightningModule's step calls it, without
            training-only inputs (``labels``...): what the int8 model is checked, reported and exported with.
        training_call: the same call as the step makes it, training-only inputs included (QAT prepares with it).
        quantized_model: the int8 model after the callback converted (CPU, eval mode).
        export_paths: ``{target: path}`` of the files written.
        export_records: ``{target: ExportRecord}``: each file and its reload difference.
    """

    #: the name in log lines and logged metrics ("QAT", "PTQ")
    label: ClassVar[str] = "quant"
    #: whether FSDP2 may shard the prepared model (``ModelParallelStrategy``): QAT's torchao models
    shards_with_fsdp2: ClassVar[bool] = False

    def __init__(self, config: QuantizationConfig, batch_to_input: Callable[[Any], Any] | None = None) -> None:
        get_flow(config.flow).check(config)
        self.config = config
        self.batch_to_input = check_callable(batch_to_input, "batch_to_input")
        self.example_inputs: ExampleInputs | None = None
        self.training_call: ExampleInputs | None = None
        self._signature: inspect.Signature | None = None
        self.quantized_model: nn.Module | None = None
        self.export_paths: dict[str, str] = {}
        self.export_records: dict[str, ExportRecord] = {}
        self._target_path: str | None = None
        self._real_call_hook: Any = None
        self._declared_inputs = False

    @classmethod
    def _config_from(cls, config: QuantizationConfig | None, arguments: Mapping[str, Any]) -> QuantizationConfig:
        """``config`` when given, else a config built from the constructor's ``arguments`` (its ``locals()``).

        Raises:
            TypeError: ``config`` is not a ``QuantizationConfig``.
            ValueError: ``config`` is given and an option it holds was also set to a non-default value.
        """
        return config_from(config, arguments, inspect.signature(cls.__init__).parameters, cls.__name__)

    # ------------------------------------------------------------------ override points
    @property
    def target_path(self) -> str | None:
        """Dotted path of the quantized submodule once setup found it."""
        return self._target_path

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The submodule this callback quantizes."""
        return resolve_target(pl_module, self._target_path or self.config.module)[1]

    def float_reference(self, pl_module: pl.LightningModule) -> nn.Module:
        """A CPU copy computing float outputs under the int8 model's module names (for per-layer error)."""
        raise NotImplementedError

    def observed_model(self, pl_module: pl.LightningModule) -> nn.Module | None:
        """The model whose observers hold the ranges, if any."""
        raise NotImplementedError

    @property
    def calibration_batches_used(self) -> int | None:
        """How many calibration batches set the ranges (``None``: not calibrated, e.g. QAT)."""
        return None

    @property
    def learns_ranges(self) -> bool:
        """Whether the ranges were learnt by training (QAT) rather than calibrated."""
        return False

    # ------------------------------------------------------------------ shared steps
    def _check_strategy(self, trainer: pl.Trainer) -> None:
        """Raise for strategies this callback cannot run under, before any training: FSDP1 and DeepSpeed replace
        modules; FSDP2 (``ModelParallelStrategy``) is taken by QAT on the torchao flow, data parallel only."""
        strategy = trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            if not self.shards_with_fsdp2 or not spec_of(self.config.flow).shards:
                raise ValueError(
                    f"{type(self).__name__} with flow={self.config.flow.value!r} does not run under "
                    "ModelParallelStrategy: FSDP2 shards QuantizationAwareTraining models of flow='torchao' (prepared "
                    'whole, then sharded by your configure_model); use strategy="ddp" here'
                )
            tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)
            if tensor_parallel not in (1, "auto"):
                raise ValueError(
                    f"ModelParallelStrategy(tensor_parallel_size={tensor_parallel}): quantized layers are sharded by "
                    "FSDP2 (data parallel) only; set tensor_parallel_size=1"
                )
            if self.config.range_learning:
                raise ValueError(
                    "range_learning=True under ModelParallelStrategy: learned ranges are parameters inside the "
                    "fake quantizers, and sharding them with FSDP2 has not been verified here; train with "
                    'range_learning under strategy="ddp", or leave it out under FSDP2 (ranges from each weight)'
                )
            return
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            fsdp2 = (
                " or, for QAT of a torchao model too large for one process, "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard in your "
                "configure_model (FSDP2; FSDPStrategy is FSDP1, which replaces modules and refuses CPU)"
                if self.shards_with_fsdp2
                else ""
            )
            raise ValueError(
                f"{type(self).__name__} supports single-device and DDP strategies, got "
                f'{type(strategy).__name__}: use strategy="ddp" (or "auto" on one device){fsdp2}'
            )
        if isinstance(trainer.strategy, DDPStrategy) and multiprocessing.parent_process() is not None:
            raise ValueError(
                f"{type(self).__name__} does not support DDP that starts its processes from this one (ddp_spawn, "
                "ddp_fork, ddp_notebook): fit runs in child processes there, so the quantized model and the "
                'prepared weights would not come back to this process; use strategy="ddp"'
            )

    def _check_alone(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before any work, another quantization callback of this Trainer that quantizes the same
        submodule (or one inside or around it), or that writes its files into the same folder.

        Two QATs (or QAT and PTQ) on one submodule would have the second convert what the first prepared
        (x86 per-channel converted as qnnpack per-tensor, say) and overwrite the first's files with a model
        that is neither callback's.

        Raises:
            ValueError: naming both callbacks, the submodule or folder they share, and what to do.
        """
        mine = self._target_path or resolve_target(pl_module, self.config.module)[0]
        for other in trainer_callbacks(trainer):
            if other is self or not isinstance(other, QuantizationCallback):
                continue
            theirs = other._target_path or resolve_target(pl_module, other.config.module)[0]
            names = f"{type(self).__name__} and {type(other).__name__}"
            if mine == theirs or mine.startswith(f"{theirs}.") or theirs.startswith(f"{mine}."):
                same = " (with the same settings)" if other.config == self.config else " with other settings"
                raise ValueError(
                    f"{names} on one Trainer both quantize {mine!r}{same}: the second would convert what the first "
                    "prepared, and overwrite its files with a model that is neither's. Keep one quantization callback "
                    "per submodule (a QAT model needs no PTQ after it); to compare settings, run one fit per setting "
                    "(a Hydra multirun over quant=...)"
                )
            if self.config.export and other.config.export and self.export_dir(trainer) == other.export_dir(trainer):
                raise ValueError(
                    f"{names} on one Trainer both write their files to {str(self.export_dir(trainer))!r}: give one "
                    "of them an export_dir=... of its own"
                )

    def _take_example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> ExampleInputs:
        """The quantized submodule's inputs as the LightningModule's own step calls it on the first batch of
        the stage's data (:class:`~lightning_quant.callbacks._calls.StepCalls`); else ``example_input_array``;
        else read off the first batch. Sets ``training_call`` (the call as made, labels and all) and returns
        the prediction call (``example_inputs``: without training-only inputs such as ``labels``).

        Raises:
            ValueError: no input to be had; a floating-point input that is not float32 (float64,
                float16: quantization observes float32 activations); a mapping batch read as keyword
                inputs with keys that are not arguments of the quantized module's forward.
        """
        target = self.target(pl_module)
        self._signature = forward_signature(target)
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        loader = stage_dataloader(trainer, stage)
        with torch.random.fork_rng(devices=[]):  # a shuffled loader draws a seed: training shuffles as without us
            batch = next(iter(loader), None) if loader is not None else None
        calls = self._step_calls(pl_module, stage)
        real = calls.read(batch) if batch is not None and self.batch_to_input is None else None
        if real is not None:
            example, source, guessed = real.to("cpu"), f"{type(pl_module).__name__}.{calls.step}", False
        elif pl_module.example_input_array is not None:
            example = ExampleInputs.from_value(pl_module.example_input_array).to("cpu")
            source, guessed = f"{type(pl_module).__name__}.example_input_array", False
        elif batch is not None:
            example = batch_inputs(batch, self.batch_to_input, required_inputs(target)).to("cpu")
            source, guessed = f"the first {stage} batch", self.batch_to_input is None
        else:
            raise ValueError(
                f"{type(self).__name__} needs one real input to prepare the model: give the Trainer a non-empty "
                f"{stage} dataloader, or set `example_input_array` on {type(pl_module).__name__}"
            )
        self._declared_inputs = real is None and pl_module.example_input_array is not None
        check_example_inputs(target, example, source, keyed_batch=guessed)
        self.training_call = example
        return inference_inputs(self._signature, example)

    def inputs_reader(self, pl_module: pl.LightningModule, stage: str) -> Callable[[Any], ExampleInputs]:
        """``batch -> inputs``: the quantized submodule's prediction inputs as the LightningModule's step for
        ``stage``'s data (``"train"``, ``"val"``, ``"test"``) calls it on that batch. Everything that runs the
        float or int8 model on data (calibration, checks, the report, searches) reads batches through it."""
        calls = self._step_calls(pl_module, stage)
        signature = self._written_signature(pl_module)
        return lambda batch: inference_inputs(signature, calls(batch))

    def targets_reader(self, pl_module: pl.LightningModule, stage: str) -> Callable[[Sequence[Any]], Any]:
        """``batches -> targets`` (or ``None``) for scoring the models on ``stage``'s data: a tuple batch's item
        after the inputs ``stage``'s step hands the quantized submodule, else its second item or a mapping's
        ``labels``."""
        calls = self._step_calls(pl_module, stage)
        signature = self._written_signature(pl_module)
        return lambda batches: calls.targets(batches, signature)

    def _written_signature(self, pl_module: pl.LightningModule) -> inspect.Signature:
        """The quantized submodule's forward signature as written (a prepared graph's may name its inputs
        otherwise): the one read when the example was taken, else the module's own."""
        return self._signature or forward_signature(self.target(pl_module))

    def _step_calls(self, pl_module: pl.LightningModule, stage: str) -> StepCalls:
        """The reading of ``stage``'s step calling the quantized submodule (or ``batch_to_input``)."""
        return StepCalls(pl_module, lambda: self.target(pl_module), step_name(pl_module, stage), self.batch_to_input)

    def _record_real_call(self, pl_module: pl.LightningModule) -> None:
        """Take the quantized module's inputs from its first call in this run (see :meth:`_on_real_call`)."""
        self._forget_real_call()

        def first_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._forget_real_call()
            real = ExampleInputs(args, dict(kwargs)).map_tensors(lambda t: t.detach().to("cpu", copy=True))
            self._on_real_call(module, real)

        self._real_call_hook = self.target(pl_module).register_forward_pre_hook(first_call, with_kwargs=True)

    def _forget_real_call(self) -> None:
        hook = getattr(self, "_real_call_hook", None)
        if hook is not None:
            hook.remove()
        self._real_call_hook = None

    def _on_real_call(self, module: nn.Module, real: ExampleInputs) -> None:
        """The module's first call in the loop. It replaces inputs that were not read off the step (a step
        that cannot run outside the loop, ``example_input_array``) where they are of other names or kinds,
        with a warning: exports, checks and the report use the real call."""
        real = inference_inputs(self._signature or forward_signature(module), real)
        example = self.example_inputs
        if example is None:
            self.example_inputs = real
            return
        agree = input_kinds(module, example) == input_kinds(module, real)
        if agree:
            if not self._declared_inputs:
                self.example_inputs = real  # the same inputs, now by position and name as the loop calls them
            return
        where = "example_input_array" if self._declared_inputs else "the data"
        rank_zero_warn(
            f"{self._target_path!r} is called with {describe_inputs(module, real)}, but the inputs taken from "
            f"{where} were {describe_inputs(module, example)}: exports, checks and the report use the real call"
        )
        self.example_inputs = real

    def _rehearse(self, float_module: nn.Module, convert: Callable[[str], nn.Module]) -> None:
        """Before any training: convert the untrained model (``convert(engine)``), run the int8 model on the
        example inputs, and serialise and reload every export target in memory, so what can only fail
        after training fails now, with the step that failed and the way out. Writes nothing. A structure,
        settings and call that passed once in this process are not rehearsed again (a second ``fit``, a
        sweep's next run).

        Raises:
            QuantizationRehearsalError: the int8 model could not be made or run on the step's call.
            ExportFailedError: an export target cannot serialise this model.
        """
        example = self.example_inputs
        if example is None:
            return
        config = self.config
        key = self._rehearsal_key(float_module, example)
        if key in _REHEARSED:  # the same structure, settings and call passed in this process already
            return
        int8_for = _per_engine(convert)
        try:
            with torch.random.fork_rng(devices=[]):  # what conversion draws is not taken from training
                int8 = int8_for(config.engine)
            with quantized_engine(config.engine), torch.no_grad():
                example.to("cpu")(int8)
        except ValueError:  # ours, with its own remedy (nothing to quantize, a layer setting...)
            raise
        except Exception as err:
            if type(err).__module__.startswith("lightning_quant."):  # a tracing or capture error names its way out
                raise
            first = " ".join(str(err).split())[:400]
            raise QuantizationRehearsalError(
                f"{type(self).__name__}: before any training or calibration, the int8 model of {self._target_path!r} "
                f"({config.flow.value} flow) could not be made or run on the call "
                f"{describe_inputs(float_module, example)}: {type(err).__name__}: {first}. Nothing was "
                "trained. Keep the layer float (skip=[...] or layers={name: 'float'}), or use another flow "
                "(fx traces the model and quantizes + and * too; torchao quantizes Linear layers without tracing; "
                "eager needs torch.ao.nn.quantized.FloatFunctional for + and *)"
            ) from err
        if config.export:
            try:
                with torch.random.fork_rng(devices=[]):
                    serialized(int8_for, config.export, example, config.backend, compare=False)
            except (ExportFailedError, ExportCheckError) as err:
                raise _export_failed(
                    err,
                    config,
                    f"{type(self).__name__}: before any training or calibration, on the untrained "
                    f"model: {err}; nothing was trained",
                ) from err
        _REHEARSED.add(key)

    def _rehearsal_key(self, float_module: nn.Module, example: ExampleInputs) -> str:
        """What decides whether conversion and export can work: the module's structure (its repr holds every
        layer and its shapes), the settings, and the call. Subclasses add their own settings."""
        return f"{type(self).__name__}|{float_module!r}|{self.config!r}|{describe_inputs(float_module, example)}"

    def _check_export_dir(self, trainer: pl.Trainer) -> None:
        """A folder that cannot receive the files fails now, not after training."""
        if self.config.export:
            check_writable_folder(self.export_dir(trainer), "export_dir")

    def export_dir(self, trainer: pl.Trainer) -> Path:
        """Where files go: ``export_dir``, else ``<trainer.log_dir>/quantized``."""
        if self.config.export_dir is not None:
            return Path(self.config.export_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "quantized"

    def _notify(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
        """Tell every listener in the Trainer's callbacks of ``moment`` (``"prepare"`` or ``"quantized"``)."""
        for callback in trainer_callbacks(trainer):
            if callback is self or not isinstance(callback, QuantizationListener):
                continue
            if moment == "prepare":
                callback.on_before_quantization_prepare(trainer, pl_module)
            else:
                callback.on_quantized(trainer, pl_module, self)

    def _publish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        convert: Callable[[str], nn.Module],
        description: str,
    ) -> None:
        """The end of every quantization callback: convert, export, announce.

        Sets ``quantized_model`` to ``convert(<backend engine>)``; on global rank 0 exports it to
        each target (converting again only for a target that needs another engine); then calls
        ``on_quantized`` on every listener.
        """
        config = self.config
        self.quantized_model = self.check_converted(trainer, pl_module, convert(config.engine))
        if allow_int8_kernels_under_determinism():
            rank_zero_warn(
                "deterministic algorithms are on (Trainer(deterministic=True)), which makes torch's int8 Linear "
                "kernel raise; switched torch.use_deterministic_algorithms to warn_only=True so the int8 model "
                "runs in this process (deterministic kernels are still used everywhere)"
            )
        rank_zero_info(f"[{self.label}] {description}: callback.quantized_model")
        if config.export and trainer.is_global_zero:
            if self.example_inputs is None:
                raise RuntimeError(f"{type(self).__name__} has no example inputs: it takes them in setup")
            int8_for = _per_engine(convert, {config.engine: self.quantized_model})
            try:
                self.export_records = export_int8(
                    int8_for, config.export, self.export_dir(trainer), self.example_inputs, config.backend
                )
            except (ExportFailedError, ExportCheckError) as err:
                raise _export_failed(
                    err,
                    config,
                    f"{err}. callback.quantized_model holds the int8 model, the trained model and its "
                    "checkpoints are kept, and no file of the export set was written; export it again with "
                    "lightning_quant.export.export_int8 or save_int8",
                ) from err
            self.export_paths = self._log_exports(trainer)
        if config.export:
            # every rank knows where the files are, and finds them there when fit returns
            self.export_paths = trainer.strategy.broadcast(self.export_paths, src=0)
            trainer.strategy.barrier("lightning_quant.export")
        self._notify(trainer, pl_module, "quantized")

    def check_converted(self, trainer: pl.Trainer, pl_module: pl.LightningModule, int8: nn.Module) -> nn.Module:
        """The int8 model to publish, given the converted one, before it is exported: an override point
        (as ``BaseFinetuning.finetune_function``) to judge or repair the model on your own terms. QAT's
        compares it with its fake-quant model and may convert again with layers kept float
        (:func:`~lightning_quant.evaluation.fidelity.check_conversion`); ``convert`` then converts the same
        way."""
        return int8

    def _log_exports(self, trainer: pl.Trainer) -> dict[str, str]:
        """Tell the user where files went and log each reload difference to the Trainer's loggers."""
        prefix = self.label.lower()
        for target, record in self.export_records.items():
            rank_zero_info(f"[{prefix}] {target}: {record.path} (reloaded output max |diff| {record.max_abs_diff:.3g})")
        metrics = {f"{prefix}/export_max_abs_diff_{t}": r.max_abs_diff for t, r in self.export_records.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return {target: str(record.path) for target, record in self.export_records.items()}

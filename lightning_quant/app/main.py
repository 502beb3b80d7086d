"""The ``lightning-quant`` command: a Hydra app that trains, quantizes, exports and reports.

Configs are the repository's ``conf/`` folder, shipped inside the package as
``lightning_quant.app.conf`` and found through Hydra's ``pkg://`` search path, so the command
runs from any folder once the project is installed (editable or from a wheel).

The default experiment trains a small CNN on
scikit-learn's digits with a float warm-up and QAT, converts it to int8, exports it and
prints float vs int8 accuracy, size and latency. ``-m`` sweeps end with one results table
(:mod:`lightning_quant.app.sweep`); ``hparams_search=optuna`` optimises the returned objective.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method, instantiate
from omegaconf import MISSING, DictConfig, ListConfig

from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, quantization_disabled
from lightning_quant.callbacks.qat import qat_recipe
from lightning_quant.evaluation.metrics import compare, comparison_table
from lightning_quant.utils.files import atomic_write
from lightning_quant.utils.integrity import load_weights_only, read_checked
from lightning_quant.utils.tables import format_table

log = logging.getLogger(__name__)

CONF_PATH = "pkg://lightning_quant.app.conf"


@dataclass
class BenchmarkConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    repeats: int = 50
    warmup: int = 10


@dataclass
class ObjectiveConfig:
    metric: str = "int8_acc"
    latency_weight: float = 0.0
    latency_batch_size: int = 1


@dataclass
class AppConfig:
    """The schema of the root config: unknown keys and wrong types fail before anything runs."""

    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    quant: Any = MISSING
    callbacks: Any = field(default_factory=dict)
    distillation: Any = None
    seed: int = 0
    ckpt_path: str | None = None
    float_epochs: int = 0
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


ConfigStore.instance().store(name="app_schema", node=AppConfig)

_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


def check_config(node: Any, path: str) -> None:
    """Check every ``_target_`` node: each key must be an argument of its target.

    Raises:
        ValueError: naming the key, the target and the arguments it takes.
    """
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_config(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    if target:
        try:
            signature = inspect.signature(get_method(target) if not isinstance(target, type) else target)
        except Exception as err:
            raise ValueError(f"{path}._target_={target!r} cannot be imported: {err}") from err
        params = signature.parameters
        # ``**deprecated`` takes the previous release's names, which configs no longer use: checked as absent
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD and p.name != "deprecated" for p in params.values()):
            for key in map(str, node):
                if key not in params and key not in _HYDRA_KEYS:
                    allowed = sorted(k for k in params if k not in ("self", "deprecated"))
                    raise ValueError(f"{path}.{key} is not an argument of {target}; it takes {allowed}")
    for key in map(str, node):
        if key != "_target_":
            check_config(node._get_node(key), f"{path}.{key}")


def read_checkpoint(ckpt_path: str) -> tuple[Path, dict[str, Any]]:
    """A Lightning checkpoint, read without unpickling arbitrary objects.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: the file is not a Lightning checkpoint.
    """
    path = Path(hydra.utils.to_absolute_path(ckpt_path))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such file")
    checkpoint = load_weights_only(read_checked(path, "Lightning checkpoint", zip_format=True), path, "checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={ckpt_path!r} is not a Lightning checkpoint (it has no 'state_dict')")
    return path, checkpoint


def load_weights(model: pl.LightningModule, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
    """Load a float checkpoint's ``state_dict`` (read by :func:`read_checkpoint`) into ``model``.

    Raises:
        ValueError: the checkpoint holds a QAT model.
    """
    recipe = qat_recipe(checkpoint)
    if recipe is not None:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} holds a QAT model (trained with {recipe}), not float weights: use quant=ptq "
            "(or quant=dynamic) to convert it to int8 with its learnt ranges, or resume that run's training with "
            "Lightning's own ckpt_path"
        )
    model.load_state_dict(checkpoint["state_dict"])
    log.info("loaded weights from %s", ckpt_path)


def qat_callback_for(recipe: dict[str, Any], quant: Any) -> QuantizationAwareTraining:
    """A QuantizationAwareTraining that loads a QAT checkpoint of ``recipe``, exporting as ``quant`` would."""
    settings = {k: v for k, v in recipe.items() if k != "module"}
    return QuantizationAwareTraining(
        **settings,
        module=recipe.get("module"),
        export=tuple(t.value for t in quant.config.export),
        export_dir=quant.config.export_dir,
        batch_to_input=quant.batch_to_input,
    )


def measure(
    cfg: DictConfig,
    callback: Any,
    model: pl.LightningModule,
    float_net: torch.nn.Module,
    datamodule: pl.LightningDataModule,
) -> dict[str, Any]:
    """Float vs int8 accuracy on the test split, weight size, and latency at each benchmark batch size.

    "float" accuracy is the trained weights in float (for QAT: the QAT weights with quantization
    switched off), so the difference is what int8 costs for these weights. Size and latency of
    fp32 are measured on the float network as built (same architecture and shapes).
    """
    trained = copy.deepcopy(callback.target(model)).cpu()
    bench = cfg.benchmark
    with quantization_disabled(trained):  # a QAT model in float; a no-op on a PTQ model's float net
        metrics = compare(
            float_net,
            callback.quantized_model,
            list(datamodule.test_dataloader()),
            callback.example_inputs,
            callback.config.engine,
            list(bench.batch_sizes),
            bench.repeats,
            bench.warmup,
            float_eval_model=trained,
            files=callback.export_paths,
            backend=callback.config.backend.value,
        )
    metrics["export_paths"] = dict(callback.export_paths)
    return metrics


def measure_float(cfg: DictConfig, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The float baseline alone (``quant=none``): test accuracy, size, latency."""
    from lightning_quant.quantization.inputs import default_batch_to_input

    net = copy.deepcopy(model.get_submodule("net")).cpu().eval()
    test = list(datamodule.test_dataloader())
    bench = cfg.benchmark
    example = default_batch_to_input(test[0]).to("cpu")
    metrics = compare(net, None, test, example, "", list(bench.batch_sizes), bench.repeats, bench.warmup)
    metrics["export_paths"] = {}
    return metrics


def results_table(metrics: dict[str, Any], batch_sizes: list[int]) -> str:
    exports = "\n".join(f"  {target}: {path}" for target, path in metrics["export_paths"].items())
    table = (
        comparison_table(metrics, batch_sizes)
        if "int8_acc" in metrics
        else (f"float only: test accuracy {metrics['float_acc']:.4f}, {metrics['fp32_bytes']} bytes")
    )
    return f"{table}\nexports:\n{exports or '  (none)'}"


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float:
    """What a sweep optimises: ``metric - latency_weight * int8/fp32 latency ratio`` (NaN if missing);
    fp32 compiled is the baseline of a compiled int8 model."""
    value = metrics.get(cfg.objective.metric)
    if not isinstance(value, (int, float)):
        return float("nan")
    if cfg.objective.latency_weight:
        bs = cfg.objective.latency_batch_size
        # a compiled int8 model (pt2e) against fp32 compiled as well
        fp32 = metrics.get(f"fp32_compiled_ms_b{bs}", metrics.get(f"fp32_ms_b{bs}", math.nan))
        ratio = metrics.get(f"int8_ms_b{bs}", math.nan) / fp32
        value = value - cfg.objective.latency_weight * ratio
    return float(value)


def build_callbacks(cfg: DictConfig) -> tuple[Any, list[pl.Callback]]:
    """The quantization callback (``None`` for ``quant=none``) and every callback for the Trainer."""
    quant = instantiate(cfg.quant) if cfg.quant.get("_target_") else None
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and c.get("_target_")]
    if quant is not None:
        callbacks.append(quant)
    if cfg.get("distillation"):
        callbacks.append(instantiate(cfg.distillation))
    return quant, callbacks


#: Trainer arguments that are counts, checked before anything runs (Lightning would fail mid-run)
_TRAINER_INTS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "accumulate_grad_batches",
    "log_every_n_steps",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
)
_TRAINER_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval")


def check_run_values(cfg: DictConfig) -> None:
    """Check the values Hydra cannot type: the Trainer's counts, the benchmark, the objective, float_epochs.

    Raises:
        ValueError: naming the key, what it must be, and what it is.
    """
    for key in _TRAINER_INTS:
        value = cfg.trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"trainer.{key} must be an int, got {value!r}")
    for key in _TRAINER_LIMITS:
        value = cfg.trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"trainer.{key} must be a non-negative int (batches) or float (fraction), got {value!r}")
    bench = cfg.benchmark
    if bench.repeats < 1 or bench.warmup < 0:
        raise ValueError(
            f"benchmark.repeats must be >= 1 and benchmark.warmup >= 0, got repeats={bench.repeats} "
            f"warmup={bench.warmup}"
        )
    if not bench.batch_sizes or any(b < 1 for b in bench.batch_sizes):
        raise ValueError(f"benchmark.batch_sizes must be positive ints, got {list(bench.batch_sizes)}")
    if cfg.float_epochs < 0:
        raise ValueError(f"float_epochs must be >= 0 (0: no float pre-training), got {cfg.float_epochs}")
    metrics = ["float_acc", "int8_acc", "fp32_bytes", "int8_bytes", "global_step"]
    metrics += [f"{kind}_ms_b{b}" for b in bench.batch_sizes for kind in ("fp32", "int8")]
    if cfg.objective.metric not in metrics:
        raise ValueError(f"objective.metric must be one of {metrics}, got {cfg.objective.metric!r}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and quantize as ``cfg`` says; returns the measured metrics."""
    for key in ("data", "model", "trainer", "quant", "callbacks", "distillation"):
        check_config(cfg.get(key), key)
    check_run_values(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    quant, callbacks = build_callbacks(cfg)
    ckpt_file, checkpoint = read_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else (None, {})
    recipe = qat_recipe(checkpoint)
    converting_qat = recipe is not None and isinstance(quant, PostTrainingQuantization)
    if converting_qat:
        # a QAT checkpoint has learnt its ranges: convert it with them instead of calibrating
        log.info("ckpt_path holds a QAT model (trained with %s): converting it with its learnt ranges", recipe)
        callbacks = [c for c in callbacks if c is not quant]
        quant = qat_callback_for(recipe or {}, quant)
        callbacks.append(quant)
    elif cfg.ckpt_path:
        load_weights(model, cfg.ckpt_path, checkpoint)
    if cfg.float_epochs > 0:  # float pre-training, then quantization from those weights
        instantiate(
            cfg.trainer, max_epochs=cfg.float_epochs, logger=False, enable_checkpointing=False, callbacks=[]
        ).fit(model, datamodule=datamodule)
    float_net = copy.deepcopy(model.net).eval()
    trainer = instantiate(cfg.trainer, callbacks=callbacks)
    if converting_qat:
        trainer.validate(model, datamodule=datamodule, ckpt_path=str(ckpt_file))
        quant.convert_and_export(trainer, model)  # the QAT model as trained, to int8: no training
    elif cfg.ckpt_path and isinstance(quant, PostTrainingQuantization):
        trainer.validate(model, datamodule=datamodule)  # float metrics, then calibrate + convert: no training
    else:
        trainer.fit(model, datamodule=datamodule)
    metrics = measure(cfg, quant, model, float_net, datamodule) if quant else measure_float(cfg, model, datamodule)
    metrics["global_step"] = trainer.global_step
    print(results_table(metrics, list(cfg.benchmark.batch_sizes)))
    search = getattr(quant, "skip_search", None)
    if search is not None:
        metrics.update(search_metrics(search))
        print(search_table(search, metrics))
    return metrics


def search_metrics(search: Any) -> dict[str, Any]:
    """What the sensitivity search chose and measured, for metrics.json."""
    record = {
        "search_met": search.met,
        "search_layers": dict(search.layers),
        "search_reference": search.reference,
        "search_full_int8": search.full_int8,
        "search_final": search.final,
    }
    if hasattr(search, "final_bytes"):
        record.update(search_full_int8_bytes=search.full_int8_bytes, search_final_bytes=search.final_bytes)
    return record


def search_table(search: Any, metrics: dict[str, Any]) -> str:
    """The search's score (on the validation batches it used) and size: all float, all int8, chosen;
    then the chosen ``layers`` as YAML, to paste as ``quant.recipe.layers``."""
    rows = [("all float", f"{search.reference:.4f}", metrics["fp32_bytes"])]
    rows.append(("all int8", f"{search.full_int8:.4f}", getattr(search, "full_int8_bytes", "-")))
    rows.append(("chosen", f"{search.final:.4f}", metrics["int8_bytes"]))
    mapping = "\n".join(f"  {name}: {precision}" for name, precision in search.layers.items()) or "  {}"
    verdict = "budget met" if search.met else "budget MISSED"
    return (
        f"\nsensitivity search ({verdict}; score on the validation batches it used):\n"
        f"{format_table(('model', 'score', 'weights (bytes)'), rows)}\n"
        f"layers (paste as quant.recipe.layers):\n{mapping}"
    )


def describe_error(err: BaseException) -> str:
    """One line naming the error users must act on (unwrapping Hydra's instantiation wrapper)."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return " ".join(f"{type(err).__name__}: {err}".split())


def _write_metrics(metrics: dict[str, Any]) -> None:
    hydra_cfg = HydraConfig.get()
    record = {**metrics, "overrides": list(hydra_cfg.overrides.task)}
    atomic_write(Path(hydra_cfg.runtime.output_dir) / "metrics.json", json.dumps(record, indent=2, default=str))


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one experiment; return the objective (for Optuna). In a multirun a failing run is
    recorded (traceback logged, error in its ``metrics.json``) and returns NaN, so the sweep and
    its results table go on; a single run raises."""
    try:
        metrics = run(cfg)
    except Exception as err:
        if HydraConfig.get().mode is not RunMode.MULTIRUN:
            raise
        log.error("run failed:\n%s", traceback.format_exc())
        _write_metrics({"status": "failed", "error": describe_error(err)})
        return float("nan")
    value = objective(cfg, metrics)
    _write_metrics({"status": "ok", **metrics, "objective": value})
    return value


if __name__ == "__main__":
    main()

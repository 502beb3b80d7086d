"""The ``lightning-quant`` command: a Hydra app that trains, quantizes, exports and reports.

Configs live in the repository's ``conf/`` folder (install the project editable, as the
Makefile does, or pass ``--config-dir``). The default experiment trains a small CNN on
scikit-learn's digits with a float warm-up and QAT, converts it to int8, exports it and
prints float vs int8 accuracy, size and latency.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.report import compare, comparison_table
from lightning_quant.quantization.schedule import quantization_disabled

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def load_weights(model: pl.LightningModule, ckpt_path: str) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``model`` without unpickling arbitrary objects.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: the file is not a Lightning checkpoint.
    """
    path = Path(hydra.utils.to_absolute_path(ckpt_path))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={ckpt_path!r} is not a Lightning checkpoint (it has no 'state_dict')")
    model.load_state_dict(checkpoint["state_dict"])
    log.info("loaded weights from %s", path)


def measure(cfg: DictConfig, callback: Any, model: pl.LightningModule,
            float_net: torch.nn.Module, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Float vs int8 accuracy on the test split, weight size, and latency at each benchmark batch size.

    "float" accuracy is the trained weights in float (for QAT: the QAT weights with quantization
    switched off), so the difference is what int8 costs for these weights. Size and latency of
    fp32 are measured on the float network as built (same architecture and shapes).
    """
    trained = copy.deepcopy(callback.target(model)).cpu()
    bench = cfg.benchmark
    with quantization_disabled(trained):  # a QAT model in float; a no-op on a PTQ model's float net
        metrics = compare(float_net, callback.quantized_model, list(datamodule.test_dataloader()),
                          callback.example_inputs, callback.config.engine, list(bench.batch_sizes),
                          bench.repeats, bench.warmup, float_eval_model=trained)
    metrics["export_paths"] = dict(callback.export_paths)
    return metrics


def results_table(metrics: dict[str, Any], batch_sizes: list[int]) -> str:
    exports = "\n".join(f"  {target}: {path}" for target, path in metrics["export_paths"].items())
    return f"{comparison_table(metrics, batch_sizes)}\nexports:\n{exports or '  (none)'}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and quantize as ``cfg`` says; returns the measured metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    float_net = copy.deepcopy(model.net).eval()
    callback = instantiate(cfg.quant)
    trainer = instantiate(cfg.trainer, callbacks=[callback])
    if cfg.ckpt_path:
        load_weights(model, cfg.ckpt_path)
    if cfg.ckpt_path and isinstance(callback, PostTrainingQuantization):
        trainer.validate(model, datamodule=datamodule)  # float metrics, then calibrate + convert: no training
    else:
        trainer.fit(model, datamodule=datamodule)
    metrics = measure(cfg, callback, model, float_net, datamodule)
    metrics["global_step"] = trainer.global_step
    print(results_table(metrics, list(cfg.benchmark.batch_sizes)))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    (out_dir / "metrics.json").write_text(json.dumps({**metrics, "overrides": overrides}, indent=2))
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    return run(cfg)["int8_acc"]


if __name__ == "__main__":
    main()

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

from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.report import classification_accuracy, format_table, latency_ms, state_dict_bytes
from lightning_quant.quantization.schedule import quantization_disabled

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def measure(cfg: DictConfig, callback: QuantizationAwareTraining, model: pl.LightningModule,
            float_net: torch.nn.Module, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Float vs int8 accuracy on the test split, weight size, and latency at each benchmark batch size.

    "float" accuracy is the trained QAT weights run with quantization switched off, so the
    difference is what int8 costs for these weights. Size and latency of fp32 are measured on
    the float network (same architecture and shapes) before it was prepared.
    """
    int8 = callback.quantized_model
    engine = callback.config.engine
    test = list(datamodule.test_dataloader())
    target = callback.target(model)
    with quantization_disabled(target):
        float_acc = classification_accuracy(copy.deepcopy(target).cpu(), test)
    metrics: dict[str, Any] = {
        "float_acc": float_acc,
        "int8_acc": classification_accuracy(int8, test, engine=engine),
        "fp32_bytes": state_dict_bytes(float_net),
        "int8_bytes": state_dict_bytes(int8),
    }
    bench = cfg.benchmark
    for bs in bench.batch_sizes:
        metrics[f"fp32_ms_b{bs}"] = latency_ms(float_net, callback.example_inputs, bs, bench.repeats, bench.warmup)
        metrics[f"int8_ms_b{bs}"] = latency_ms(int8, callback.example_inputs, bs, bench.repeats, bench.warmup, engine)
    metrics["export_paths"] = dict(callback.export_paths)
    return metrics


def results_table(metrics: dict[str, Any], batch_sizes: list[int]) -> str:
    rows = [
        ("accuracy (test)", f"{metrics['float_acc']:.4f}", f"{metrics['int8_acc']:.4f}",
         f"{metrics['int8_acc'] - metrics['float_acc']:+.4f}"),
        ("weights (bytes)", metrics["fp32_bytes"], metrics["int8_bytes"],
         f"{metrics['fp32_bytes'] / metrics['int8_bytes']:.2f}x smaller"),
    ]
    for bs in batch_sizes:
        fp32, int8 = metrics[f"fp32_ms_b{bs}"], metrics[f"int8_ms_b{bs}"]
        rows.append((f"latency batch {bs} (ms)", f"{fp32:.3f}", f"{int8:.3f}", f"{fp32 / int8:.2f}x faster"))
    table = format_table(("", "float", "int8", "change"), rows)
    exports = "\n".join(f"  {target}: {path}" for target, path in metrics["export_paths"].items())
    return f"{table}\nexports:\n{exports or '  (none)'}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and quantize as ``cfg`` says; returns the measured metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    float_net = copy.deepcopy(model.net).eval()
    callback = instantiate(cfg.quant)
    trainer = instantiate(cfg.trainer, callbacks=[callback])
    trainer.fit(model, datamodule=datamodule)
    metrics = measure(cfg, callback, model, float_net, datamodule)
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

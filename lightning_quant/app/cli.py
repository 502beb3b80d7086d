"""``lightning-quant-cli``: Lightning's own LightningCLI, for users who configure runs that way.

The callbacks take plain, type-hinted arguments, so they work from a LightningCLI YAML::

    trainer:
      callbacks:
        - class_path: lightning_quant.QuantizationAwareTraining
          init_args: {backend: x86, quant_start_epoch: 1}

Run ``lightning-quant-cli fit --config my.yaml`` (any LightningModule and DataModule by
``class_path``). Needs ``pip install "jsonargparse[signatures]"``.
"""

from __future__ import annotations


def main() -> None:
    from lightning_quant.utils.checks import require_module

    require_module("jsonargparse", '"jsonargparse[signatures]"', "lightning-quant-cli")
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()

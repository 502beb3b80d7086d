"""Does distillation help QAT? int8 test accuracy of QAT alone vs QAT + KD over several seeds.

Two settings, each: train a float student briefly (shared starting point), then for each
seed run QAT alone and QAT + KnowledgeDistillation with the same seed and epochs, convert,
and measure int8 accuracy on the test split.

- ``digits``: the default CNN on scikit-learn's digits, self-distillation (teacher = the
  float student). An easy task: float and int8 are both near 99%.
- ``digits, small student``: a 4-channel CNN, teacher = a 32-channel float CNN. Harder for
  the student (it is capacity-limited); is a stronger teacher's soft target worth the task
  loss it displaces over a short QAT run?

Run: ``.venv/bin/python benchmarks/distillation.py [--seeds 5]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import trainer  # noqa: E402
from publish import publish  # noqa: E402

from lightning_quant import KnowledgeDistillation, QATSchedule, QuantizationAwareTraining  # noqa: E402
from lightning_quant.demos import (  # noqa: E402
    Classifier,
    DigitsCNN,
    DigitsDataModule,  # noqa: E402
)
from lightning_quant.evaluation import classification_accuracy  # noqa: E402
from lightning_quant.utils import format_table  # noqa: E402
from lightning_quant.utils.timing import machine_description  # noqa: E402


def float_model(datamodule, width: int, epochs: int, seed: int) -> Classifier:
    pl.seed_everything(seed)
    model = Classifier(DigitsCNN(width=width), lr=3e-3)
    trainer(epochs, []).fit(model, datamodule=datamodule)
    return model


def qat_run(start: Classifier, datamodule, epochs: int, seed: int, teacher) -> float:
    pl.seed_everything(seed)
    model = copy.deepcopy(start)
    model.hparams.lr = 1e-3
    callbacks = [QuantizationAwareTraining(schedule=QATSchedule(freeze_bn_epoch=epochs - 1), export=None)]
    if teacher is not False:
        callbacks.append(KnowledgeDistillation(teacher=teacher, alpha=0.7, temperature=4.0))
    trainer(epochs, callbacks).fit(model, datamodule=datamodule)
    return classification_accuracy(callbacks[0].quantized_model, list(datamodule.test_dataloader()), engine="x86")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--publish", help="also write the table to this Markdown file (make bench-distillation does)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")

    digits = DigitsDataModule(batch_size=32)
    settings = {  # name: (data, student width, teacher width or None for self-distillation, float epochs)
        "digits, self-distillation": (digits, 32, None, 2),
        "digits, 4-channel student, 32-channel teacher": (digits, 4, 32, 8),
    }
    rows = []
    for name, (datamodule, width, teacher_width, student_epochs) in settings.items():
        student = float_model(datamodule, width, epochs=student_epochs, seed=100)
        teacher = None
        if teacher_width:
            teacher = float_model(datamodule, teacher_width, epochs=6, seed=101).net.eval()
            teacher_acc = classification_accuracy(teacher, list(datamodule.test_dataloader()))
        else:
            teacher_acc = classification_accuracy(student.net.eval(), list(datamodule.test_dataloader()))
        alone = [qat_run(student, datamodule, args.qat_epochs, s, teacher=False) for s in range(args.seeds)]
        with_kd = [qat_run(student, datamodule, args.qat_epochs, s, teacher=teacher) for s in range(args.seeds)]
        wins = sum(k >= a for k, a in zip(with_kd, alone))
        rows.append(
            (
                name,
                f"{teacher_acc:.4f}",
                f"{statistics.mean(alone):.4f} ± {statistics.stdev(alone):.4f}",
                f"{statistics.mean(with_kd):.4f} ± {statistics.stdev(with_kd):.4f}",
                f"{statistics.mean(with_kd) - statistics.mean(alone):+.4f}",
                f"{wins}/{args.seeds}",
            )
        )
    heading = (
        f"int8 test accuracy, {args.seeds} seeds, {args.qat_epochs} QAT epochs (mean ± stdev); {machine_description()}"
    )
    table = format_table(
        ("setting", "teacher float acc", "QAT alone", "QAT + KD", "difference", "seeds KD >= alone"), rows
    )
    print(f"\n{heading}\n{table}")
    publish(args.publish, f"{heading}\n\n{table}", "make bench-distillation")


if __name__ == "__main__":
    main()

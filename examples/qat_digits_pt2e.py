"""QAT of a CNN on scikit-learn's digits with the pt2e flow, for an x86 server or an ARM phone.

Trains with fake quantization (torch.export + torchao's prepare_qat_pt2e), converts a copy with
convert_pt2e and exports it: ``--backend x86`` writes a ``.pt2`` program (served compiled);
``--backend xnnpack`` also writes an ExecuTorch ``.pte`` file, which this example then runs in
ExecuTorch's runtime on the test set. Needs ``pip install 'lightning-quant[pt2e,executorch]'``.
Run: ``.venv/bin/python examples/qat_digits_pt2e.py --backend xnnpack``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import trainer  # noqa: E402

from lightning_quant import Pt2eRecipe, QATSchedule, QuantizationAwareTraining, load_pt2, quantization_disabled  # noqa: E402
from lightning_quant.demos import Classifier, DigitsCNN, DigitsDataModule  # noqa: E402
from lightning_quant.evaluation import compare, comparison_table  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["x86", "xnnpack"], default="xnnpack")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--export-dir", default="outputs/examples/qat_digits_pt2e")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=32, limit=args.limit)
    model = Classifier(DigitsCNN(), num_classes=10, cosine_schedule=True)
    float_net = copy.deepcopy(model.net)  # the float architecture, for size and latency
    qat = QuantizationAwareTraining(
        Pt2eRecipe(quantizer=args.backend),
        QATSchedule(
            quant_start_epoch=max(0, args.epochs // 4),
            freeze_bn_epoch=max(1, args.epochs - 2),
            freeze_observers_epoch=max(1, args.epochs - 1),
        ),
        export_dir=args.export_dir,
    )
    trainer(args.epochs, [qat]).fit(model, datamodule=datamodule)
    test = list(datamodule.test_dataloader())
    trained = copy.deepcopy(model.net).eval()
    with quantization_disabled(trained):  # "float": the QAT weights with fake quantization off
        metrics = compare(
            float_net.eval(),
            qat.quantized_model,
            test,
            qat.example_inputs,
            qat.config.engine,
            repeats=30,
            warmup=5,
            float_eval_model=trained,
        )
    print(f"\ndigits CNN, QAT, pt2e ({args.backend})\n{comparison_table(metrics)}")

    labels = torch.cat([y for _, y in test])
    program = load_pt2(qat.export_paths["pt2"])  # what a server loads (serve it with torch.compile on x86)
    with torch.no_grad():
        metrics["pt2_acc"] = float((torch.cat([program(x) for x, _ in test]).argmax(-1) == labels).float().mean())
    if args.backend == "xnnpack":
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(qat.export_paths["executorch"])  # keep it: the method runs on its memory
        method = program.load_method("forward")
        predictions = torch.cat([method.execute([x])[0].argmax(-1) for x, _ in test])
        metrics["executorch_acc"] = float((predictions == labels).float().mean())
    print({k: round(v, 4) for k, v in metrics.items() if k.endswith("_acc")})
    return metrics


if __name__ == "__main__":
    main()

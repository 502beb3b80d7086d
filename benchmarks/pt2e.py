"""One digits QAT run on each flow and backend: int8 accuracy, file size and latency, side by side.

Run with ``make bench-pt2e`` (needs ``pip install 'lightning-quant[pt2e,executorch]'``). One float
DigitsCNN is trained once; each row fine-tunes a copy of it with ``QuantizationAwareTraining``
for the same epochs and measures what that flow ships, the way it is served:

- ``fx/x86``: torch.ao's int8 modules (their kernels run eagerly), TorchScript file;
- ``pt2e/x86``: the converted program compiled with ``torch.compile`` (freezing on), which is
  where its int8 kernels come from; the compile time is reported on its own; ``.pt2`` file;
- ``pt2e/xnnpack``: the ``.pte`` program in ExecuTorch's runtime (XNNPACK-delegated), accuracy
  measured from that file too.

fp32 is timed eager and compiled. Timings are medians of repeated forward passes after a warm-up;
compile times are cold (a fresh Inductor cache directory for the run).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from publish import publish

from lightning_quant import QATSchedule, QuantizationAwareTraining, recipe_for
from lightning_quant.demos import Classifier, DigitsCNN, DigitsDataModule
from lightning_quant.evaluation import latency_ms
from lightning_quant.evaluation.metrics import classification_accuracy, compiled_latency_ms, median_ms
from lightning_quant.export import ExportFailedError
from lightning_quant.quantization import ExampleInputs
from lightning_quant.utils import format_table
from lightning_quant.utils.timing import machine_description

ROWS = (("fx", "x86"), ("pt2e", "x86"), ("pt2e", "xnnpack"))


def trainer(epochs: int, callbacks: list[Any]) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def executorch_runner(path: Path) -> Any:
    from executorch.runtime import Runtime

    data = path.read_bytes()
    program = Runtime.get().load_program(data)
    method = program.load_method("forward")  # it runs on memory the program and its bytes own: keep them
    return lambda x, keep=(data, program): method.execute([x])[0]


def main() -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")  # cold compile times
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--float-epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--qat-lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--publish", help="also write the table to this Markdown file (make bench-pt2e does)")
    args = parser.parse_args()

    seed_everything(0)
    datamodule = DigitsDataModule(batch_size=32)
    model = Classifier(DigitsCNN(width=args.width), lr=3e-3)
    trainer(args.float_epochs, []).fit(model, datamodule=datamodule)
    test = list(datamodule.test_dataloader())
    float_net = copy.deepcopy(model.net).eval()
    example = ExampleInputs((test[0][0],))
    batches = (1, 32)
    fp32_eager = {bs: latency_ms(float_net, example, bs, args.repeats) for bs in batches}
    fp32_compiled = {bs: compiled_latency_ms(float_net, example, bs, args.repeats)[0] for bs in batches}
    rows = [
        [
            "fp32",
            "-",
            f"{classification_accuracy(float_net, test):.4f}",
            "-",
            *(f"{fp32_eager[bs]:.3f} / {fp32_compiled[bs]:.3f}" for bs in batches),
            "-",
        ]
    ]
    out = Path(tempfile.mkdtemp(prefix="bench_pt2e_"))
    for flow, backend in ROWS:
        seed_everything(0)
        student = copy.deepcopy(model)
        student.hparams.lr = args.qat_lr  # fine-tuning from trained weights
        student.hparams.cosine_schedule = True
        qat = QuantizationAwareTraining(
            recipe_for(flow, backend=backend),
            QATSchedule(freeze_bn_epoch=args.qat_epochs - 2, freeze_observers_epoch=args.qat_epochs - 1),
            export_dir=out / f"{flow}_{backend}",
        )
        try:
            trainer(args.qat_epochs, [qat]).fit(student, datamodule=datamodule)
        except ExportFailedError as refused:  # a refused file is a row too: the check is the result
            reason = " ".join(str(refused).split(";")[0].split())
            rows.append([f"{flow}/{backend}", "refused", reason, "-", "-", "-", "-"])
            continue
        int8 = qat.quantized_model
        files = {target: Path(path) for target, path in qat.export_paths.items()}
        compile_s = "-"
        if flow == "fx":
            accuracy = classification_accuracy(int8, test, engine="x86")
            latency = {bs: latency_ms(int8, example, bs, args.repeats, engine="x86") for bs in batches}
            shipped = files["torchscript"]
        elif backend == "x86":
            accuracy = classification_accuracy(int8, test)
            timed = {bs: compiled_latency_ms(int8, example, bs, args.repeats) for bs in batches}
            latency = {bs: ms for bs, (ms, _) in timed.items()}
            compile_s = " / ".join(f"{s:.1f}" for _, s in timed.values())
            shipped = files["pt2"]
        else:
            shipped = files["executorch"]
            run = executorch_runner(shipped)
            predictions = torch.cat([run(x).argmax(-1) for x, _ in test])
            accuracy = float((predictions == torch.cat([y for _, y in test])).float().mean())
            latency = {}
            for bs in batches:
                x = example.with_batch_size(bs).args[0]
                latency[bs] = median_ms(lambda x=x, run=run: run(x), args.repeats, 10)
        rows.append(
            [
                f"{flow}/{backend}",
                shipped.suffix,
                f"{accuracy:.4f}",
                f"{shipped.stat().st_size:,}",
                *(f"{latency[bs]:.3f}" for bs in batches),
                compile_s,
            ]
        )
    heading = (
        f"DigitsCNN(width={args.width}), digits 8x8; float {args.float_epochs} epochs, QAT {args.qat_epochs} epochs; "
        f"{machine_description()}"
    )
    table = format_table(
        ("model", "file", "test accuracy", "file bytes", "b1 ms", "b32 ms", "compile s (b1 / b32)"), rows
    )
    note = "fp32 latency: eager / compiled. fx: eager int8 modules; pt2e/x86: compiled; pt2e/xnnpack: ExecuTorch."
    print(heading)
    print(table)
    print(note)
    publish(args.publish, f"{heading}\n\n{table}\n\n{note}", "make bench-pt2e")


if __name__ == "__main__":
    main()

"""QAT under strategy="ddp" on 2 CPU processes; each rank saves its quantization state.

Run as ``python tests/scripts/ddp_qat.py OUT_DIR [FLOW]``; Lightning relaunches this script for rank 1.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_quant import QuantizationAwareTraining, QuantizationReport  # noqa: E402
from tests.helpers import BoringClassifier, TinyMLP, quant_state, quiet_trainer  # noqa: E402


class RankShiftedClassifier(BoringClassifier):
    """Each rank sees different data, so only synchronisation can make their ranges agree."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        from tests.helpers import random_images

        return DataLoader(random_images(64, seed=10 + self.global_rank), batch_size=16)

    def val_dataloader(self):
        from torch.utils.data import DataLoader

        from tests.helpers import random_images

        return DataLoader(random_images(24 + 8 * self.global_rank, seed=20 + self.global_rank), batch_size=8)


def main(out_dir: Path, flow: str) -> None:
    seed_everything(0)
    if flow == "torchao":  # Linear layers, int4 weights in groups of 4; no observers to freeze
        model = RankShiftedClassifier(net=TinyMLP())
        options = {"group_size": 4}
    else:
        model = RankShiftedClassifier()
        options = {"freeze_observers_epoch": 2}
    callback = QuantizationAwareTraining(
        flow=flow, quant_start_epoch=0, export_dir=out_dir / "export", validate_int8=True, **options
    )
    report = QuantizationReport(report_dir=out_dir / "report")
    trainer = quiet_trainer(
        strategy="ddp", devices=2, max_epochs=3, callbacks=[callback, report], use_distributed_sampler=False
    )
    trainer.fit(model)
    # this rank's own count of correct int8 predictions on its validation shard
    correct = total = 0
    with torch.no_grad():
        for x, y in model.val_dataloader():
            correct += int((callback.quantized_model(x).argmax(-1) == y).sum())
            total += len(y)
    metrics = {
        "val_int8": float(trainer.callback_metrics["val/accuracy_int8"]),
        "report_int8": report.report["metric"]["int8"],
        "report_timed": sorted(report.report["latency_ms"]["int8"]),
        "correct": correct,
        "total": total,
    }
    torch.save(metrics, out_dir / f"rank{trainer.global_rank}_metrics.pt")
    state = dict(quant_state(model.net)) if flow != "torchao" else dict(model.net.state_dict())
    torch.save(state, out_dir / f"rank{trainer.global_rank}.pt")
    written = sorted(p.name for p in (out_dir / "export").glob("[!.]*")) if trainer.is_global_zero else []
    (out_dir / f"rank{trainer.global_rank}_files.txt").write_text("\n".join(written))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "fx")

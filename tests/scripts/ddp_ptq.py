"""PTQ under strategy="ddp" on 2 CPU processes; each rank saves what it ended with.

Run as ``python tests/scripts/ddp_ptq.py OUT_DIR CASE`` with CASE one of ``minmax``,
``histogram``, ``search`` (PTQ with max_metric_drop); Lightning relaunches this script for rank 1.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_quant import PostTrainingQuantization  # noqa: E402
from tests.helpers import BoringClassifier, quiet_trainer, random_images  # noqa: E402

#: rank 1's inputs are this many times wider than rank 0's
WIDER = 4.0


def shard(rank: int) -> TensorDataset:
    """Each rank's own data: rank 1's activations are WIDER times rank 0's."""
    x, y = random_images(64, seed=10 + rank).tensors
    return TensorDataset(x * (WIDER if rank == 1 else 1.0), y)


class ShardedClassifier(BoringClassifier):
    def train_dataloader(self):
        return DataLoader(shard(self.global_rank), batch_size=16)

    def val_dataloader(self):
        return DataLoader(shard(self.global_rank), batch_size=16)


def main(out_dir: Path, case: str) -> None:
    seed_everything(0)
    model = ShardedClassifier()
    export_dir = out_dir / "export"
    options = dict(observer="histogram" if case == "histogram" else "minmax", per_channel=False)
    if case == "search":
        options.update(max_metric_drop=0.0, eval_batches=4)
    callback = PostTrainingQuantization(calibration_batches=4, export_dir=export_dir, progress=False, **options)
    trainer = quiet_trainer(
        strategy="ddp",
        devices=2,
        max_epochs=2,
        limit_train_batches=2,
        callbacks=[callback],
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    rank = trainer.global_rank
    seen_files = sorted(p.name for p in export_dir.glob("[!.]*"))  # right after fit returns, on every rank
    probe = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        out = callback.quantized_model(probe)
    result = {
        "files": seen_files,
        "export_paths": callback.export_paths,
        "int8_out": out,
        "float": model.net.state_dict(),
    }
    result["observers"] = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in callback.calibrated_model.named_modules()
        if name.startswith("activation_post_process")
    }
    result["skipped"] = callback.skip_search.skipped if callback.skip_search is not None else None
    torch.save(result, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

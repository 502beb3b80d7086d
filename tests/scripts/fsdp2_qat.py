"""QAT of a small Llama on 2 CPU processes, sharded by FSDP2 or replicated by DDP; rank 0 saves its logits.

Run as ``python tests/scripts/fsdp2_qat.py OUT_DIR fsdp2|ddp|crash|resume[-kd|-val]``; Lightning relaunches this
script for rank 1. Two epochs of two steps. ``crash`` is ``fsdp2`` saving a distributed checkpoint at the end of epoch 0
(step 2) and failing at the first step of epoch 1; ``resume`` goes on from that checkpoint
(``OUT_DIR/../crash/checkpoints/last.ckpt``) to the end. ``-kd`` adds ``KnowledgeDistillation`` from the float
model; ``-val`` a validation step (``self.log("val_loss", ...)``) and ``validate_int8=True``, each rank saving the
logged int8 and fake-quant validation losses. The LightningModule is written as the Lightning docs write
one for ``ModelParallelStrategy``: ``configure_model`` shards each decoder layer and the model with ``fully_shard``.
"""

import sys
from pathlib import Path

import torch
import transformers
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_quant import KnowledgeDistillation, QATSchedule, QuantizationAwareTraining, TorchaoRecipe  # noqa: E402

VOCAB = 64


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


class CausalLM(LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
        self.model = transformers.LlamaForCausalLM(config)
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        # one batch per rank and step: each rank reads its own, as a DistributedSampler would give them
        return DataLoader(batches(2, 10 + self.global_rank), batch_size=None)


class CrashAtStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("simulated crash at step 2")


def main(out: Path, kind: str) -> None:
    seed_everything(0)
    callbacks: list[Callback] = []
    validate = kind.endswith("-val")
    kind = kind.removesuffix("-val")
    if kind.endswith("-kd"):  # distillation from the float model beside QAT: the student sharded or replicated
        kind = kind.removesuffix("-kd")
        callbacks.append(KnowledgeDistillation(alpha=0.5, temperature=2.0))
    checkpointing = kind in ("crash", "resume")
    if kind == "crash":
        # at an epoch's end: Lightning resumes a list of batches mid-epoch from its first batch again
        checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", every_n_epochs=1, save_last=True)
        callbacks += [checkpoint, CrashAtStep()]
    if kind != "ddp":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    qat = QuantizationAwareTraining(
        TorchaoRecipe("int8_dyn_int8_weight"),
        schedule=QATSchedule(quant_start_step=1),
        export="hf",
        export_dir=out,
        validate_int8=validate,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[qat, *callbacks],
        max_epochs=2,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = CausalLM(shard=kind != "ddp")
    if validate:  # each rank validates on its own two batches
        module.val_dataloader = lambda: DataLoader(batches(2, 50 + module.global_rank), batch_size=None)
    resume = out.parent / "crash" / "checkpoints" / "last.ckpt" if kind == "resume" else None
    trainer.fit(module, ckpt_path=resume)
    inputs = batches(1, 99)[0]
    with torch.no_grad():
        logits = qat.quantized_model(input_ids=inputs["input_ids"]).logits
    torch.save({"input_ids": inputs["input_ids"], "logits": logits}, out / f"rank{trainer.global_rank}_logits.pt")
    if validate:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        torch.save(logged, out / f"rank{trainer.global_rank}_val.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

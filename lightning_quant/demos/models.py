"""Small models in plain torch and the LightningModule that trains them."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics

from lightning_quant.demos.assets import minilm_dir
from lightning_quant.utils.checks import require_module


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsCNN(nn.Module):
    """A three-block Conv/BN/ReLU network for small grey images (8x8 digits, 28x28 MNIST).

    Layers sit in ``nn.Sequential`` containers so both flows fuse them: FX by tracing, eager by
    finding the adjacent Conv/BN/ReLU runs.

    Args:
        in_channels: image channels.
        width: channels of the first block; the next two have twice and four times as many.
        num_classes: outputs.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(in_channels, width),
            *_conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class ReviewLSTM(nn.Module):
    """Embedding, one LSTM layer and a linear head over the mean of the non-padding outputs.

    Args:
        vocab_size: word ids (id 0 pads).
        embed_dim: embedding width.
        hidden_size: LSTM width.
        num_classes: outputs.
    """

    def __init__(
        self, vocab_size: int = 10000, embed_dim: int = 64, hidden_size: int = 128, num_classes: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(self.embed(tokens))
        mask = (tokens != 0).unsqueeze(-1).to(outputs.dtype)
        pooled = (outputs * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class MiniLMClassifier(nn.Module):
    """The pretrained all-MiniLM-L6-v2 encoder, mean pooling, and a linear head.

    Input: a ``(batch, 2, length)`` tensor stacking token ids and the attention mask (what
    ``RottenTomatoesDataModule(tokenizer="minilm")`` yields).

    Args:
        num_classes: outputs.
        freeze_encoder: train only the head (the encoder keeps its pretrained weights).
    """

    def __init__(self, num_classes: int = 2, freeze_encoder: bool = True) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        require_module("transformers", "transformers", "the MiniLM models")
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(minilm_dir())
        self.encoder.requires_grad_(not freeze_encoder)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: torch.ao's int8 embedding kernel refuses the strided slices of the stacked input
        ids, mask = x[:, 0].contiguous(), x[:, 1].contiguous()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


class Classifier(pl.LightningModule):
    """Cross-entropy classification of any ``net`` (images, token ids) with Adam, logging loss and accuracy.

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/acc``. The network is passed in
    (Hydra builds it from ``_target_``) and is not saved as a hyperparameter.

    Args:
        net: the network; its output is the logits.
        num_classes: classes, for the accuracy metric.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        cosine_schedule: decay the learning rate to zero over ``max_epochs`` (cosine).
        example_input_array: optional input for summaries and for quantization callbacks.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        cosine_schedule: bool = True,
        example_input_array: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "example_input_array"])
        self.net = net
        self.example_input_array = example_input_array
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch).argmax(-1)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]  # a frozen encoder is not optimised
        hparams: Any = self.hparams
        optimizer = torch.optim.Adam(trainable, lr=hparams.lr, weight_decay=hparams.weight_decay)
        if not hparams.cosine_schedule:
            return optimizer
        # Decaying the rate matters for QAT: once BatchNorm statistics freeze, a large rate lets
        # the pre-BN activations drift away from the frozen statistics.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

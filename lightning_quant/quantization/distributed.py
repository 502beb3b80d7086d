"""One set of quantization statistics for a run of several processes.

Under DDP every rank calibrates on its own shard of the data. :func:`reduce_observers` merges
what each rank's observers saw, so every rank holds the statistics one process would have
gathered from the union of the shards, and converts to the same int8 model:

- min/max observers (per tensor or per channel): the min of the mins and the max of the maxes
  (exact for ``minmax``; for ``moving_average`` the extremes of each rank's running average);
- histogram observers: each rank's histogram is re-binned into the common range the way the
  observer itself re-bins when its range grows, then the histograms are summed.

:class:`RankReducer` is the collective these use (``torch.distributed``, on the device the
process group's backend needs); in a single process there is none and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lightning_quant.quantization import flows


@dataclass(frozen=True)
class RankReducer:
    """Sums and extremes of tensors over every process of the default process group.

    Args:
        device: where tensors go for the collective (CPU for gloo, the rank's GPU for NCCL).
    """

    device: torch.device

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> RankReducer | None:
        """The reducer of this run, or ``None`` in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(torch.device(device))

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        result = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(result, op=op)
        return result.to(tensor.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MIN)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)


def _observers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return flows.observers(model)


def reduce_observers(model: nn.Module, reducer: RankReducer | None) -> int:
    """Merge every observer's statistics over all ranks, in place; returns how many were merged.

    Every rank must call this with the same model structure (they do: DDP starts from one model).
    Observers are visited in module order, so the collectives line up across ranks.
    """
    if reducer is None:
        return 0
    merged = 0
    for _, observer in _observers(model):
        min_val, max_val = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
        if not isinstance(min_val, torch.Tensor) or not isinstance(max_val, torch.Tensor):
            continue
        if min_val.numel() == 0:  # a per-channel observer that saw nothing: the same on every rank
            continue
        new_min, new_max = reducer.min(min_val), reducer.max(max_val)
        if flows.is_histogram(observer):
            _merge_histogram(observer, new_min, new_max, reducer)
        min_val.copy_(new_min)
        max_val.copy_(new_max)
        merged += 1
    return merged


def _merge_histogram(observer: Any, new_min: torch.Tensor, new_max: torch.Tensor, reducer: RankReducer) -> None:
    """Re-bin this rank's histogram into ``[new_min, new_max]`` as the observer does when its range
    grows (``_combine_histograms``), then sum the histograms of every rank."""
    histogram = observer.histogram
    seen = bool(torch.isfinite(observer.min_val).all()) and bool(torch.isfinite(observer.max_val).all())
    if not seen or not (torch.isfinite(new_min) and torch.isfinite(new_max)):
        local = torch.zeros_like(histogram)
    else:
        local = observer._combine_histograms(
            histogram, observer.min_val, observer.max_val, torch.zeros_like(histogram), new_min, new_max
        )
    histogram.copy_(reducer.sum(local))

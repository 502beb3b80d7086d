"""Which adjacent layers are fused into one (Conv/BN/ReLU, Linear/ReLU...) and so share one setting."""

from __future__ import annotations

import torch.nn as nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Fusable runs, longest first, as type tuples; torch's eager fuser supports each.
_FUSION_PATTERNS: tuple[tuple[tuple[type, ...], ...], ...] = (
    (_CONV, _BN, (nn.ReLU,)),
    (_CONV, _BN),
    (_CONV, (nn.ReLU,)),
    ((nn.BatchNorm2d, nn.BatchNorm3d), (nn.ReLU,)),
    ((nn.Linear,), (nn.BatchNorm1d,)),
    ((nn.Linear,), (nn.ReLU,)),
)


def fusable_groups(model: nn.Module) -> list[list[str]]:
    """Names of adjacent fusable modules inside every ``nn.Sequential`` of ``model``."""
    groups: list[list[str]] = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        i = 0
        while i < len(children):
            for pattern in _FUSION_PATTERNS:
                run = children[i : i + len(pattern)]
                if len(run) == len(pattern) and all(isinstance(m, t) for (_, m), t in zip(run, pattern)):
                    groups.append([f"{prefix}.{name}" if prefix else name for name, _ in run])
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups

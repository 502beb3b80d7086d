"""Module names and types as users write them: dotted paths and import paths."""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Iterable

import torch
import torch.nn as nn


def within(name: str, outer: Iterable[str], strictly: bool = False) -> str | None:
    """The first of ``outer`` that is module ``name`` itself or a module containing it (by dotted
    path); with ``strictly``, only a container counts. ``None`` if there is none."""
    return next((o for o in outer if (not strictly and name == o) or name.startswith(o + ".")), None)


def locate_module_type(path: str) -> type | None:
    """The ``nn.Module`` subclass at import path ``path`` (``"torch.nn.LSTM"``), or ``None``."""
    module_path, _, attr = path.rpartition(".")
    if not module_path:
        return None
    try:
        located = getattr(importlib.import_module(module_path), attr, None)
    except ImportError:
        return None
    return located if isinstance(located, type) and issubclass(located, nn.Module) else None


def type_named_in_file(name: str, model: nn.Module) -> type | None:
    """The ``nn.Module`` type a file names (``"module.Class"``), found without importing anything: a type of
    ``model``'s own submodules, or a class of one of torch's modules this process has imported already
    (``torch.nn.LSTM``). ``None`` for anything else: a file must not choose what gets imported."""
    for module in model.modules():
        kind = type(module)
        if f"{kind.__module__}.{kind.__qualname__}" == name:
            return kind
    module_path, _, attr = name.rpartition(".")
    if module_path.split(".")[0] != "torch" or module_path not in sys.modules:
        return None
    located = getattr(sys.modules[module_path], attr, None)
    return located if isinstance(located, type) and issubclass(located, nn.Module) else None


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes

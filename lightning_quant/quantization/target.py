"""Find the submodule of a LightningModule to quantize, and put its prepared version back."""

from __future__ import annotations

import torch.nn as nn


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def resolve_target(root: nn.Module, path: str | None) -> tuple[str, nn.Module]:
    """The ``(path, module)`` to quantize: ``path`` if given, else the only child with parameters.

    Raises:
        ValueError: ``path`` names no submodule, or ``path`` is ``None`` and the number of
            children with parameters is not one (the message lists them).
    """
    if path is not None:
        try:
            return path, root.get_submodule(path)
        except AttributeError:
            candidates = [name for name, _ in root.named_modules() if name][:20]
            raise ValueError(
                f"module={path!r} is not a submodule of {type(root).__name__}; submodules: {candidates}"
            ) from None
    candidates = [name for name, child in root.named_children() if _has_parameters(child)]
    if len(candidates) != 1:
        raise ValueError(
            f"module=None needs exactly one child module with parameters in {type(root).__name__} to "
            f"quantize, found {candidates}: set module= to one of them (a dotted path such as 'net.backbone')"
        )
    return candidates[0], getattr(root, candidates[0])


def replace_target(root: nn.Module, path: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``path`` of ``root`` to ``new``."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)

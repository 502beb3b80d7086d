"""Whole copies of models that FSDP2 (``fully_shard``) shards after they were prepared.

QAT prepares the model whole, before Lightning's ``ModelParallelStrategy`` calls the user's ``configure_model``
(which shards it): what torchtune's distributed QAT and torchao's advice (quantize before wrapping) do, so the
fake-quantized layers are what FSDP2 shards. A sharded module cannot be copied (FSDP2 refuses ``deepcopy``), yet
converting, checking and reporting each work on a copy of the model. So :func:`keep_skeleton` keeps, at prepare
time, the prepared model's structure on the meta device (no memory for its weights) and its non-persistent
buffers (which no state dict holds: a Llama's rotary frequencies); :func:`whole_copy` gathers the full state dict
(a collective every rank calls, as every rank converts) and loads it into a CPU copy of that structure: one full
copy of the model per process, on CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

#: where a prepared model keeps its skeleton (a plain attribute: not a submodule, not in the state dict)
SKELETON_ATTRIBUTE = "_lightning_quant_skeleton"


class Skeleton:
    """A model's structure on the meta device and its non-persistent buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = {
            f"{prefix}.{name}" if prefix else name: module._buffers[name].detach().cpu().clone()
            for prefix, module in model.named_modules()
            for name in module._non_persistent_buffers_set
            if module._buffers.get(name) is not None
        }
        self.structure = copy.deepcopy(model).to("meta")


def keep_skeleton(model: nn.Module) -> None:
    """Keep ``model``'s skeleton on it, for :func:`whole_copy` once it is sharded."""
    object.__setattr__(model, SKELETON_ATTRIBUTE, Skeleton(model))


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model`` or a module in it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def whole_copy(model: nn.Module) -> nn.Module:
    """A whole CPU copy of ``model``: ``copy.deepcopy`` of a model that is not sharded; of an FSDP2-sharded one,
    its skeleton loaded with the full state dict (every rank must call this at the same point).

    Raises:
        RuntimeError: a sharded model without a skeleton (sharded before it was prepared here).
    """
    if not is_sharded(model):
        return copy.deepcopy(model)
    skeleton: Skeleton | None = getattr(model, SKELETON_ATTRIBUTE, None)
    if skeleton is None:
        raise RuntimeError(
            f"{type(model).__name__} is sharded by FSDP2 but was not prepared whole: shard it in configure_model "
            "(Lightning's ModelParallelStrategy), which runs after the quantization callback prepares it"
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, Any] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    whole = copy.deepcopy(skeleton.structure).to_empty(device="cpu")
    whole.load_state_dict({name: tensor.detach().cpu() for name, tensor in state.items()})
    for name, buffer in skeleton.buffers.items():
        prefix, _, leaf = name.rpartition(".")
        whole.get_submodule(prefix)._buffers[leaf] = buffer.clone()
    whole.train(model.training)
    return whole


__all__ = ["SKELETON_ATTRIBUTE", "Skeleton", "is_sharded", "keep_skeleton", "whole_copy"]

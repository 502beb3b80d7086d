"""Knowledge-distillation losses and teacher loading, shared by the distillation callback and users.

- ``"kl"``: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch
  (Hinton et al.); the ``T^2`` keeps its gradient on the scale of the task loss;
- ``"mse"``: mean squared error between student and teacher logits (no temperature).
"""

from __future__ import annotations

import copy
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_quant.utils.integrity import load_weights_only, read_checked


class DistillationLoss(str, Enum):
    KL = "kl"
    MSE = "mse"


DISTILLATION_LOSSES = tuple(m.value for m in DistillationLoss)


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, the first tensor of a tuple, or ``.logits``.

    Raises:
        TypeError: no tensor found.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a {type(output).__name__}: return a tensor, a tuple starting with "
        "the logits, or an object with a .logits tensor"
    )


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss: str | DistillationLoss = "kl", temperature: float = 4.0
) -> torch.Tensor:
    """The distillation term between student and teacher logits (classes on the last dimension).

    Example::

        >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
        >>> float(distillation_loss(t, t)) == 0.0
        True
    """
    teacher = teacher.detach().to(student.dtype)
    if DistillationLoss(loss) is DistillationLoss.MSE:
        return F.mse_loss(student, teacher)
    s = F.log_softmax(student.flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher.flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def load_teacher_weights(architecture: nn.Module, ckpt_path: str | Path, module_path: str) -> nn.Module:
    """A copy of ``architecture`` holding the weights of ``module_path`` in a Lightning checkpoint.

    The checkpoint is read with ``weights_only=True``: no object in it is unpickled; its zip checksums
    are checked first.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: the file is empty, truncated or damaged.
        UnsafeFileError: the file holds pickled objects beyond tensors and plain values (nothing of it ran).
        ValueError: the checkpoint has no (float) weights for ``module_path``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {str(path)!r}: no such file")
    data = read_checked(path, "teacher checkpoint", zip_format=True)
    checkpoint = load_weights_only(data, path, "teacher checkpoint")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    prefix = f"{module_path}."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    teacher = copy.deepcopy(architecture)
    missing = teacher.load_state_dict(weights, strict=False).missing_keys if weights else list(teacher.state_dict())
    if missing:
        missing = missing[:5]
        raise ValueError(
            f"teacher checkpoint {str(path)!r} has no float weights for {module_path!r} (missing e.g. {missing}); "
            "a QAT checkpoint holds fused, fake-quantized layers: pass the teacher as an nn.Module instead"
        )
    return teacher

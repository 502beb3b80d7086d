import pytest
import torch.nn as nn

from lightning_quant.quantization.target import replace_target, resolve_target


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        self.loss = nn.CrossEntropyLoss()


def test_resolve_picks_only_child_with_parameters_and_dotted_paths():
    root = Root()
    assert resolve_target(root, None) == ("backbone", root.backbone)
    assert resolve_target(root, "backbone.0") == ("backbone.0", root.backbone[0])
    replace_target(root, "backbone.0", nn.Identity())
    assert isinstance(root.backbone[0], nn.Identity)


def test_resolve_raises_with_candidates():
    root = Root()
    root.head = nn.Linear(2, 2)
    with pytest.raises(
        ValueError,
        match=r"module=None needs exactly one child module with parameters in Root to "
        r"quantize, found \['backbone', 'head'\]",
    ):
        resolve_target(root, None)
    with pytest.raises(ValueError, match=r"module='neck' is not a submodule of Root; submodules: \['backbone'"):
        resolve_target(root, "neck")

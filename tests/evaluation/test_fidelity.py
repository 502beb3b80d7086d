"""The check of a QAT conversion against its fake-quant model, and the keep-float repair's decision."""

from __future__ import annotations

import copy

import torch

from lightning_quant.evaluation.fidelity import check_conversion
from lightning_quant.quantization.convert import convert_copy
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.recipes import FxRecipe
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.schedule import set_observers
from tests.helpers import TinyNet


def _qat_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = FxRecipe().to_config(export=())
    example = ExampleInputs((torch.randn(8, 1, 6, 6),))
    prepared = get_flow(config.flow).prepare(copy.deepcopy(TinyNet()), config, example, qat=True).train()
    with torch.no_grad():
        for _ in range(8):
            prepared(torch.randn(8, 1, 6, 6))
    set_observers(prepared, False)
    return prepared.eval()


def test_a_conversion_that_follows_its_fake_quant_model_is_kept_as_it_is():
    prepared = _qat_model()
    int8 = convert_copy(prepared, "fx", "x86")
    batches = [torch.randn(8, 1, 6, 6) for _ in range(2)]
    checked = check_conversion(prepared, int8, batches, None, "fx", "x86", repair=True)
    assert checked.model is int8 and checked.kept_float == [] and checked.warning is None
    assert checked.fidelity is not None and checked.fidelity.ok and checked.fidelity.cosine > 0.99


def test_without_batches_nothing_is_measured_but_every_process_takes_part():
    prepared = _qat_model()
    int8 = convert_copy(prepared, "fx", "x86")
    asked: list[list[str]] = []

    def broadcast(names: list[str]) -> list[str]:
        asked.append(names)
        return names

    checked = check_conversion(prepared, int8, [], None, "fx", "x86", repair=True, broadcast=broadcast)
    assert (checked.model, checked.fidelity, asked) == (int8, None, [[]])

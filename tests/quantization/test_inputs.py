import pytest
import torch
import torch.nn as nn

from lightning_quant.quantization.inputs import (
    ExampleInputs,
    as_positional,
    batch_inputs,
    batch_reader,
    batch_targets,
    check_call,
    default_batch_to_input,
    required_inputs,
)


class Masked(nn.Module):
    def forward(self, x, mask, scale=1.0, *rest, flag=False):
        return x * mask * scale


def test_default_batch_to_input_conventions():
    x, y, e = torch.zeros(4, 3), torch.zeros(4), torch.ones(4, 2)
    assert default_batch_to_input(x).args[0] is x
    assert default_batch_to_input((x, y)).args == (x,)
    assert default_batch_to_input([(x, e), y]).args == (x, e)
    assert default_batch_to_input(({"x": x}, y)).kwargs == {"x": x}
    assert default_batch_to_input({"input_ids": x, "mask": e}).kwargs == {"input_ids": x, "mask": e}
    assert batch_inputs((x, y), lambda b: b[1]).args == (y,)


def test_a_forward_of_several_inputs_reads_the_first_items_of_a_tuple_batch_and_its_target_after_them():
    x, mask, y = torch.zeros(4, 3), torch.ones(4, 3), torch.arange(4)
    assert required_inputs(Masked()) == 2 and required_inputs(nn.Linear(3, 3)) == 1
    assert batch_reader(nn.Linear(3, 3)) is None
    read = batch_reader(Masked())
    assert read is not None
    assert read((x, mask)).args == (x, mask) and read((x, mask, y)).args == (x, mask)
    assert read([(x, mask), y]).args == (x, mask)  # inputs grouped in the batch's first item: as before
    assert read({"x": x, "mask": mask}).kwargs == {"x": x, "mask": mask}
    assert batch_inputs((x, mask, y), inputs=2).args == (x, mask)
    assert torch.equal(batch_targets([(x, mask, y)], inputs=2), y)
    assert batch_targets([(x, mask)], inputs=2) is None  # no item after the inputs: no target
    assert torch.equal(batch_targets([(x, y)]), y)


def test_check_call_raises_naming_the_forward_and_what_the_batch_gave():
    check_call(Masked(), ExampleInputs((torch.zeros(1), torch.zeros(1))), "the first calibration batch")
    with pytest.raises(
        TypeError,
        match=r"^Masked.forward\(x, mask, scale=1.0, \*rest, flag=False\) cannot be called with the inputs read "
        r"off the first calibration batch \(Tensor, flag=\): missing a required argument: 'mask'\. Pass "
        r"batch_to_input= returning the inputs of one call: a tensor, a tuple of positional inputs or a dict of "
        r"keyword inputs$",
    ):
        check_call(Masked(), ExampleInputs((torch.zeros(1),), {"flag": True}), "the first calibration batch")


def test_unsupported_batch_raises():
    with pytest.raises(
        TypeError,
        match=r"model inputs must be a tensor, a tuple/list of positional inputs or a mapping "
        r"of keyword inputs, got int; pass batch_to_input=",
    ):
        default_batch_to_input(3)


def test_with_batch_size_tiles_and_cuts():
    example = ExampleInputs((torch.arange(3).view(3, 1),), {"scale": torch.tensor(2.0)})
    tiled = example.with_batch_size(7)
    assert tiled.args[0].flatten().tolist() == [0, 1, 2, 0, 1, 2, 0] and tiled.kwargs["scale"].dim() == 0
    assert example.with_batch_size(2).batch_size == 2


def test_as_positional_moves_keywords_by_signature():
    class Net(torch.nn.Module):
        def forward(self, x, extra):
            return x

    a, b = torch.zeros(1), torch.ones(1)
    positional = as_positional(Net(), ExampleInputs((), {"extra": b, "x": a}))
    assert positional.args == (a, b) and positional.kwargs == {}


def test_inference_inputs_drop_training_only_inputs_the_forward_makes_optional():
    import inspect

    from lightning_quant.quantization.inputs import inference_inputs

    def forward(input_ids, attention_mask=None, labels=None, use_cache=None):
        return None

    signature = inspect.signature(forward)
    ids, mask, labels = torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2)
    call = ExampleInputs((), {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False})
    assert sorted(inference_inputs(signature, call).kwargs) == ["attention_mask", "input_ids"]
    # by position: the labels go, what comes after them goes by name
    positional = inference_inputs(signature, ExampleInputs((ids, mask, labels, True)))
    assert len(positional.args) == 2 and positional.kwargs == {}

    def required(x, labels):  # labels the forward needs are an input
        return None

    kept = ExampleInputs((ids, labels))
    assert inference_inputs(inspect.signature(required), kept) is kept

    def keywords(**kwargs):
        return None

    assert sorted(inference_inputs(inspect.signature(keywords), call).kwargs) == ["attention_mask", "input_ids"]

import pytest
import torch

from lightning_quant.quantization.inputs import ExampleInputs, as_positional, batch_inputs, default_batch_to_input


def test_default_batch_to_input_conventions():
    x, y, e = torch.zeros(4, 3), torch.zeros(4), torch.ones(4, 2)
    assert default_batch_to_input(x).args[0] is x
    assert default_batch_to_input((x, y)).args == (x,)
    assert default_batch_to_input([(x, e), y]).args == (x, e)
    assert default_batch_to_input(({"x": x}, y)).kwargs == {"x": x}
    assert default_batch_to_input({"input_ids": x, "mask": e}).kwargs == {"input_ids": x, "mask": e}
    assert batch_inputs((x, y), lambda b: b[1]).args == (y,)


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

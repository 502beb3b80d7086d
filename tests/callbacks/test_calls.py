"""Reading the quantized module's call off the LightningModule's own step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lightning.pytorch import LightningModule

from lightning_quant.callbacks._calls import StepCalls, step_name


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.calls = nn.Linear(4, 2), 0
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, scale=None):
        self.calls += 1
        return self.fc(self.bn(x))


class Stepper(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.BatchNorm1d(4)  # a module the step runs before the quantized one
        self.net = Counting()
        self.logged: list[str] = []

    def log(self, name, *args, **kwargs):
        self.logged.append(name)

    def training_step(self, batch, batch_idx):
        self.log("before")
        x = self.pre(batch["x"].float() / 255)
        noise = torch.rand(1)  # the step draws from the random state
        out = self.net(x + 0 * noise, scale=2.0)
        self.log("after")
        return out.sum()


def test_step_calls_read_the_call_and_stop_there_leaving_the_module_as_it_was():
    module = Stepper()
    module.train()
    module.net.bn.eval()  # a frozen BatchNorm stays frozen
    batch = {"x": torch.randint(0, 255, (8, 4), dtype=torch.uint8), "y": torch.zeros(8)}
    state = torch.random.get_rng_state()
    calls = StepCalls(module, lambda: module.net)
    inputs = calls(batch)
    assert torch.equal(torch.random.get_rng_state(), state)  # training draws as it would without us
    assert module.net.calls == 0 and module.logged == []  # the module did not run, nothing was logged
    assert module.training and module.pre.training and not module.net.bn.training
    assert int(module.pre.num_batches_tracked) == 0  # run in eval: modules before it keep their statistics
    assert inputs.kwargs == {"scale": 2.0} and inputs.args[0].dtype == torch.float32
    assert inputs.args[0].abs().max() < 10  # normalised and cast as the step does, not the raw batch
    assert calls.guessed is None


def test_step_calls_fall_back_to_the_batch_with_the_reason_when_the_step_cannot_run():
    class Broken(Stepper):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("needs the loop")

    module = Broken()
    calls = StepCalls(module, lambda: module.net)
    with pytest.warns(
        UserWarning,
        match=r"could not read how Broken.training_step calls the quantized module "
        r"\(training_step raised RuntimeError: needs the loop\)",
    ):
        inputs = calls((torch.ones(2, 4), torch.zeros(2)))
    assert torch.equal(inputs.args[0], torch.ones(2, 4))
    assert calls.guessed == "training_step raised RuntimeError: needs the loop"


def test_step_calls_fall_back_to_the_first_items_of_a_tuple_batch_for_a_module_of_several_inputs():
    class Masked(nn.Module):
        def forward(self, x, mask):
            return x * mask

    class Broken(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Masked()

        def training_step(self, batch, batch_idx):
            raise RuntimeError("needs the loop")

    module = Broken()
    calls = StepCalls(module, lambda: module.net)
    x, mask, y = torch.ones(2, 4), torch.zeros(2, 4), torch.zeros(2)
    with pytest.warns(UserWarning, match=r"the first item of a tuple or its first n for a forward of n inputs"):
        inputs = calls((x, mask, y))
    assert inputs.args == (x, mask) and inputs.kwargs == {}


class Scorer(nn.Module):
    def forward(self, x, mask=None, labels=None):
        return x if mask is None else x * mask


class TupleSteps(LightningModule):
    """Steps as people write them for tuple batches: inputs, then the labels."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.net, self.how = Scorer(), how

    def training_step(self, batch, batch_idx):
        if self.how == "ids, mask, labels":
            ids, mask, labels = batch
            return self.net(ids, mask=mask).sum()
        if self.how == "x, labels, scaled":
            x, labels = batch
            return self.net(x.float() / 255).sum()
        if self.how == "hugging face labels":
            ids, labels = batch
            return self.net(ids, labels=labels).sum()
        x, mask = batch  # "x, mask": no labels at all
        return self.net(x, mask).sum()


@pytest.mark.parametrize(
    ("how", "items", "target"),
    [("ids, mask, labels", 3, 2), ("x, labels, scaled", 2, 1), ("hugging face labels", 2, 1), ("x, mask", 2, None)],
)
def test_step_calls_find_a_tuple_batchs_target_after_the_inputs_the_step_hands_on(how, items, target):
    module = TupleSteps(how)
    calls = StepCalls(module, lambda: module.net)
    batches = [tuple(torch.full((2, 3), float(10 * b + i)) for i in range(items)) for b in range(2)]
    targets = calls.targets(batches)
    if target is None:
        assert targets is None
    else:
        assert torch.equal(targets, torch.cat([batch[target] for batch in batches]))


def test_step_name_falls_back_to_training_step_where_the_module_defines_no_other():
    module = Stepper()
    assert step_name(module, "val") == "training_step" and step_name(module, "fit") == "training_step"


def test_step_calls_pass_a_dataloader_index_to_a_step_that_takes_one():
    class SeveralLoaders(Stepper):
        def validation_step(self, batch, batch_idx, dataloader_idx):
            return self.net(batch["x"].float() * (dataloader_idx + 1))

    module = SeveralLoaders()
    calls = StepCalls(module, lambda: module.net, step="validation_step")
    inputs = calls({"x": torch.ones(2, 4)})
    assert calls.guessed is None and torch.equal(inputs.args[0], torch.ones(2, 4))

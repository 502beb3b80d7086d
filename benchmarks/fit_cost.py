"""What QAT costs a fit, and where the time goes: `make bench-fit`.

The 1M-parameter CNN of `make bench` (3x32x32 inputs, BatchNorm), batches of 32, Adam, one epoch of ``--steps``
steps each way, in interleaved rounds (every round runs each way once, in a shuffled order; a way's figure is the
median of its rounds):

- ``float``: the LightningModule as written, no callback;
- ``QAT, callback``: the same Trainer with ``QuantizationAwareTraining()`` (fx, x86), fake quantization from the
  first step; the callback's preparation runs before the timed steps (``on_fit_start``) and conversion after them;
- ``QAT, torch.ao by hand``: ``prepare_qat_fx`` with torch's default x86 QAT qconfig, in a plain loop;
- ``QAT, by hand, vectorized activations``: the same loop with the callback's qconfig, whose activations' fake
  quantization is ``CpuFusedFakeQuantize`` (torch's fused quantizer, the same numbers, vectorized on CPU): what
  that quantizer saves, in the same run;
- ``float, by hand``: the same plain loop on the float network (what the hand-written QAT adds to it);
- ``QAT, callback, min/max observer`` and ``QAT, torch.ao by hand, min/max observer``: the same two QAT fits with
  the ``"minmax"`` activation observer, whose fake quantizer is torch's ``FakeQuantize`` by hand and
  ``CpuFakeQuantize`` (the same numbers, vectorized on CPU) in the callback.

Then one profile of a QAT step as the callback runs it (``torch.profiler``): the operators that take the most
time, so the cost can be read as fake-quant kernels, observers, BatchNorm folding and the rest.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from publish import publish
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtimes import PerfCNN  # noqa: E402

from lightning_quant import FxRecipe, QuantizationAwareTraining  # noqa: E402
from lightning_quant.quantization.config import QuantizationConfig  # noqa: E402
from lightning_quant.quantization.flows.qconfig import build_qconfig_mapping  # noqa: E402
from lightning_quant.utils import format_table  # noqa: E402
from lightning_quant.utils.timing import machine_description  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StepClock(pl.Callback):
    """Times the training steps only (from the first batch's start to the last batch's end)."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 1:  # the first step warms up (allocations, observers' first ranges)
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def loader(steps: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32 * steps, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (32 * steps,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def lightning_fit(net: nn.Module, steps: int, qat: bool, observer: str | None = None) -> float:
    clock = StepClock()
    callbacks: list[pl.Callback] = [clock]
    if qat:
        callbacks.append(QuantizationAwareTraining(FxRecipe(observer=observer), export=None))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Module(copy.deepcopy(net)), loader(steps))
    return clock.seconds / (steps - 1) * 1e3


def qat_mapping(net: nn.Module, ours: bool, minmax: bool = False) -> Any:
    """torch's default x86 QAT qconfig mapping, or the one the callback builds (``ours``); with ``minmax``,
    torch's ``FakeQuantize`` over a ``MinMaxObserver`` for the global activations of torch's."""
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, QConfig, get_default_qat_qconfig_mapping

    if ours:
        config = QuantizationConfig(observer="minmax") if minmax else QuantizationConfig()
        return build_qconfig_mapping(config, net, qat=True)
    mapping = get_default_qat_qconfig_mapping("x86")
    if minmax:
        activation = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=127, dtype=torch.quint8)
        mapping.set_global(QConfig(activation=activation, weight=mapping.global_qconfig.weight))
    return mapping


def hand_fit(net: nn.Module, steps: int, qat: bool, ours: bool = False, minmax: bool = False) -> float:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = copy.deepcopy(net).train()
    data = list(loader(steps))
    if qat:
        model = prepare_qat_fx(model, qat_mapping(net, ours, minmax), (data[0][0],))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = 0.0
    for i, (x, y) in enumerate(data):
        if i == 1:
            start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / (steps - 1) * 1e3


WAYS = {
    "float": lambda net, steps: lightning_fit(net, steps, qat=False),
    "QAT, callback": lambda net, steps: lightning_fit(net, steps, qat=True),
    "float, by hand": lambda net, steps: hand_fit(net, steps, qat=False),
    "QAT, torch.ao by hand": lambda net, steps: hand_fit(net, steps, qat=True),
    "QAT, by hand, vectorized activations": lambda net, steps: hand_fit(net, steps, qat=True, ours=True),
    "QAT, callback, min/max observer": lambda net, steps: lightning_fit(net, steps, qat=True, observer="minmax"),
    "QAT, torch.ao by hand, min/max observer": lambda net, steps: hand_fit(net, steps, qat=True, minmax=True),
}


def profile_qat_step(net: nn.Module, rows: int) -> str:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    data = list(loader(6))
    model = prepare_qat_fx(copy.deepcopy(net).train(), qat_mapping(net, ours=True), (data[0][0],))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step(*data[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in data[1:]:
            step(x, y)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or "fake_quant" in e.key]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
    return format_table(
        ("operator (self time, 5 QAT steps)", "ms per step", "share"),
        [(e.key, f"{e.self_cpu_time_total / 5e3:.2f}", f"{e.self_cpu_time_total / total:.1%}") for e in top],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per fit (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--publish", help="also write the tables to this Markdown file (make bench-fit does)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    torch.manual_seed(0)
    net = PerfCNN()
    heading = machine_description()
    print(heading, flush=True)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for r in range(args.rounds):
        order = list(WAYS)
        random.Random(r).shuffle(order)
        for way in order:
            times[way].append(WAYS[way](net, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{w} {times[w][-1]:.1f} ms" for w in WAYS), flush=True)
    ms = {way: statistics.median(values) for way, values in times.items()}
    rows = [(way, f"{ms[way]:.1f}", f"{ms[way] / ms['float']:.2f}x") for way in WAYS]
    table = format_table(("fit", "ms per step", "vs float"), rows)
    by_hand = ms["QAT, torch.ao by hand"]
    minmax_callback = ms["QAT, callback, min/max observer"] / ms["float"]
    minmax_by_hand = ms["QAT, torch.ao by hand, min/max observer"] / ms["float, by hand"]
    notes = [
        f"- QAT through the callback costs {ms['QAT, callback'] / ms['float']:.2f}x a float fit; torch.ao's QAT "
        f"by hand costs {by_hand / ms['float, by hand']:.2f}x its own float loop, "
        f"{ms['QAT, by hand, vectorized activations'] / ms['float, by hand']:.2f}x with the callback's vectorized "
        f"activation fake quantization.",
        f"- the callback against the hand-written QAT loop with torch's quantizer: "
        f"{ms['QAT, callback'] / by_hand:.2f}x.",
        f"- with the min/max activation observer: the callback {minmax_callback:.2f}x a float fit, torch.ao by hand "
        f"{minmax_by_hand:.2f}x its own float loop.",
        f"- {args.steps - 1} timed steps per fit, batch 32, median of {args.rounds} interleaved rounds.",
    ]
    profile = profile_qat_step(net, args.profile_rows)
    text = "\n".join(
        [
            heading,
            "",
            f"PerfCNN, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, 3x32x32",
            "",
            table,
            "",
            *notes,
            "",
            profile,
        ]
    )
    print(f"\n{text}")
    publish(args.publish, text, "make bench-fit")


if __name__ == "__main__":
    main()

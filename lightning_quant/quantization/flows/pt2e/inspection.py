"""Inspection of pt2e graphs: which layer a node belongs to, where its output is taken, and its values on inputs."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from lightning_quant.quantization.flows.pt2e.graph import COMPUTE, quant_ops


def layer_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0]) or None


def is_quant_point(node: torch.fx.Node) -> bool:
    """An activation observer or fake quantizer (prepared) or an activation quantize node (converted)."""
    if node.op == "call_module":
        return str(node.target).startswith("activation_post_process_")
    quantize, _ = quant_ops()
    return node.op == "call_function" and node.target in quantize


def layer_end(node: torch.fx.Node) -> torch.fx.Node:
    """Where a compute layer's output is taken: follow single-user nodes (bias, batch norm, ReLU,
    reshapes) until the next quantization point, compute layer, or branch."""
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        if user.op != "call_function" or is_quant_point(user) or user.target in COMPUTE:
            break
        if user.target is operator.getitem:
            break
        current = user
    return current


class Recorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, wanted: dict[torch.fx.Node, tuple[str, str]]) -> None:
        super().__init__(module)
        self.wanted = wanted
        self.values: dict[tuple[str, str], Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        key = self.wanted.get(n)
        if key is not None:
            self.values.setdefault(key, value)
        return value

"""The greedy float-island search on a scorer whose answer is known."""

from __future__ import annotations

import pytest

from lightning_quant.quantization.search import greedy_skip, layer_sensitivity


def test_sensitivity_and_greedy_skip_on_a_toy_scorer():
    layers = ["a", "b", "c"]
    cost = {"a": 0.05, "b": 0.3, "c": 0.01}
    build = lambda skip: tuple(skip)  # noqa: E731  the "model" is the skip list
    score = lambda skipped: 1.0 - sum(v for k, v in cost.items() if k not in skipped)  # noqa: E731
    sensitivity = layer_sensitivity(layers, build, score)
    assert sensitivity == pytest.approx({"a": 0.95, "b": 0.7, "c": 0.99})
    search = greedy_skip(layers, sensitivity, build, score, reference=1.0, target=0.96)
    assert search.met and search.skipped == ["b", "a"] and search.final == pytest.approx(0.99)
    impossible = greedy_skip(layers, sensitivity, build, score, reference=1.0, target=1.5)
    assert not impossible.met and impossible.skipped == ["b", "a", "c"]

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


def _toy(costs: dict[str, dict[str, float]], sizes: dict[str, int]):
    """A "model" that is its layers mapping; its score loses each layer's cost at its precision."""
    layers = list(costs)
    build = lambda chosen: {name: chosen.get(name, "int8") for name in layers}  # noqa: E731
    score = lambda model: 1.0 - sum(costs[name][p] for name, p in model.items())  # noqa: E731
    size_of = lambda model: sum(sizes[p] for p in model.values())  # noqa: E731
    return layers, build, score, size_of


COSTS = {
    "a": {"int8": 0.05, "fp16": 0.001, "float": 0.0},
    "b": {"int8": 0.30, "fp16": 0.002, "float": 0.0},
    "c": {"int8": 0.01, "fp16": 0.0, "float": 0.0},
}
SIZES = {"int8": 1, "fp16": 2, "float": 4}


def test_precision_search_steps_the_most_sensitive_layers_up_one_precision_at_a_time():
    from lightning_quant.quantization.search import precision_search

    layers, build, score, size_of = _toy(COSTS, SIZES)
    search, sensitivity = precision_search(layers, ("int8", "fp16", "float"), build, score, size_of, 1.0, 0.95)
    assert sensitivity == pytest.approx({"a": 0.95, "b": 0.7, "c": 0.99})
    # b to fp16 gives 0.938, then a to fp16 gives 0.987: met before anything goes to float
    assert search.met and search.layers == {"b": "fp16", "a": "fp16"} and search.skipped == []
    assert search.final == pytest.approx(0.987) and search.final_bytes == 5
    assert search.full_int8 == pytest.approx(0.64) and search.full_int8_bytes == 3


def test_precision_search_under_a_size_budget_steps_the_least_sensitive_layers_down():
    from lightning_quant.quantization.search import precision_search

    layers, build, score, size_of = _toy(COSTS, SIZES)
    search, _ = precision_search(layers, ("int8", "fp16", "float"), build, score, size_of, 1.0, None, 9)
    # all float would be 12 bytes; c then a step down to fp16 (10, then 8 bytes)
    assert search.met and search.layers == {"b": "float", "a": "fp16", "c": "fp16"} and search.final_bytes == 8
    impossible, _ = precision_search(layers, ("int8", "fp16", "float"), build, score, size_of, 1.0, None, 2)
    assert not impossible.met and impossible.layers == {} and impossible.final_bytes == 3


def test_a_search_ladder_must_be_what_the_mode_runs_cheapest_first():
    from lightning_quant.quantization.search import check_precision_ladder

    assert check_precision_ladder(["int8", "fp16", "float"], ("int8", "fp16", "float")) == ("int8", "fp16", "float")
    for ladder in (["fp16", "float"], ["int8", "float", "fp16"], ["int8"], ["int8", "fp16"]):
        with pytest.raises(ValueError, match=r"search_precisions must list precisions this mode runs, cheapest first"):
            check_precision_ladder(ladder, ("int8", "float"))


def test_latency_search_keeps_float_what_saves_time_halving_until_the_model_is_faster():
    from lightning_quant.quantization.search import latency_search

    convert = lambda kept: frozenset(kept)  # noqa: E731  the "model" is the set kept float
    # layer by layer, three look faster float; together, "c" makes the model slower (a neighbour's
    # boundary the layer-by-layer view missed)
    savings = {"a": 0.5, "b": 0.3, "c": 0.1, "d": -2.0}
    run_ms = lambda kept: 10.0 - 0.5 * ("a" in kept) - 0.3 * ("b" in kept) + 2.0 * ("c" in kept)  # noqa: E731
    search = latency_search(convert, savings, run_ms, fp32_ms=8.0)
    assert search.kept_float == ["a"]  # [a, b, c] slower, then the better half [a] (len 3 // 2)
    assert search.history == [(3, pytest.approx(11.2)), (1, pytest.approx(9.5))]
    assert search.int8_ms == 10.0 and search.final_ms == pytest.approx(9.5)
    assert search.speedup == pytest.approx(8.0 / 9.5)

    nothing = latency_search(convert, {"a": -1.0}, run_ms, fp32_ms=8.0)
    assert nothing.kept_float == [] and nothing.final_ms == 10.0 and nothing.history == []
    noise = latency_search(convert, {"a": 0.5}, lambda kept: 10.0 - 0.1 * ("a" in kept), fp32_ms=8.0)
    assert noise.kept_float == [] and noise.final_ms == 10.0  # 1% faster is under min_gain (2%)

import pytest

from lightning_quant.utils.tables import format_table, speed_against, speed_change


def test_format_table():
    table = format_table(("a", "b"), [(1, 0.123456), ("x", "y")])
    assert table.splitlines() == ["| a | b      |", "|---|--------|", "| 1 | 0.1235 |", "| x | y      |"]


def test_speed_change_says_slower_when_the_new_time_is_longer():
    assert speed_change(1.80, 0.72) == "2.50x faster"
    # the reviews LSTM on an AMX machine: 0.305 ms float, 0.638 ms int8 -- slower, said as slower
    assert speed_change(0.305, 0.638) == "2.09x slower"
    assert speed_change(1.0, 1.004) == "same speed"
    assert speed_against(0.493, 0.494, "OpenVINO int8") == "the same speed as OpenVINO int8"
    assert speed_against(0.305, 0.638, "fp32") == "2.09x slower than fp32"


@pytest.mark.parametrize("times", [(0.0, 1.0), (1.0, -2.0), (float("inf"), 1.0), (1.0, float("nan"))])
def test_speed_change_refuses_times_that_are_not_positive_and_finite(times):
    with pytest.raises(ValueError, match="speed_change needs two positive finite times"):
        speed_change(*times)

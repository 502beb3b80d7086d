from lightning_quant.utils.tables import format_table


def test_format_table():
    table = format_table(("a", "b"), [(1, 0.123456), ("x", "y")])
    assert table.splitlines() == ["| a | b      |", "|---|--------|", "| 1 | 0.1235 |", "| x | y      |"]

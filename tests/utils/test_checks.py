import pytest

from lightning_quant.quantization.config import Backend
from lightning_quant.utils.checks import (
    check_bool,
    check_callable,
    check_epoch,
    check_non_negative,
    check_positive_int,
    parse_enum,
    require_module,
)


def test_parse_enum_and_check_epoch():
    assert parse_enum(Backend, "qnnpack", "backend") is Backend.QNNPACK
    assert parse_enum(Backend, Backend.X86, "backend") is Backend.X86
    assert check_epoch(None, "e", allow_none=True) is None
    with pytest.raises(ValueError, match=r"e must be a non-negative int, got True"):
        check_epoch(True, "e", allow_none=False)


def test_counts_budgets_flags_and_callables():
    assert check_positive_int(3, "n") == 3 and check_positive_int(None, "n", allow_none=True) is None
    with pytest.raises(ValueError, match=r"n must be a positive int, got 0"):
        check_positive_int(0, "n")
    with pytest.raises(ValueError, match=r"n must be a positive int or None, got True"):
        check_positive_int(True, "n", allow_none=True)
    assert check_non_negative(0.0, "budget") == 0.0
    with pytest.raises(ValueError, match=r"budget must be a non-negative number, got nan"):
        check_non_negative(float("nan"), "budget")
    with pytest.raises(ValueError, match=r"budget must be a non-negative number or None, got -0.1"):
        check_non_negative(-0.1, "budget", allow_none=True)
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match=r"flag must be True or False, got 1"):
        check_bool(1, "flag")
    assert check_callable(len, "fn") is len
    with pytest.raises(TypeError, match=r"fn must be a callable or None, got 5"):
        check_callable(5, "fn")


def test_require_module_names_the_install_command():
    require_module("torch", "torch", "this")
    with pytest.raises(
        ModuleNotFoundError, match=r"the thing needs the optional package 'no_such_pkg': run `pip install no-such`"
    ):
        require_module("no_such_pkg", "no-such", "the thing")

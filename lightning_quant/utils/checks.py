"""Argument checks shared by every configurable object: each message lists what is allowed and what came.

Every public constructor validates its arguments with these, so a mistake is reported at
construction, in the same words everywhere, before any training starts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from enum import Enum
from typing import Any, Literal, TypeVar, overload

E = TypeVar("E", bound=Enum)


def parse_enum(enum_cls: type[E], value: Any, name: str, hint: Callable[[Any], str] | None = None) -> E:
    """Turn a string (or enum member) into ``enum_cls``, or raise a message listing the allowed values
    (and ``hint(value)``: where a value of another option belongs).

    Raises:
        ValueError: ``value`` is not one of the enum's values.
    """
    allowed = tuple(member.value for member in enum_cls)
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str) and value in allowed:
        return enum_cls(value)
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}{hint(value) if hint else ''}")


def check_bool(value: Any, name: str) -> bool:
    """Validate a flag: ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_epoch(value: Any, name: str, allow_none: bool) -> int | None:
    """Validate an epoch index: a non-negative int (or ``None`` where that means 'never')."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "a non-negative int or None" if allow_none else "a non-negative int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


@overload
def check_positive_int(value: Any, name: str, allow_none: Literal[False] = False) -> int: ...
@overload
def check_positive_int(value: Any, name: str, allow_none: bool) -> int | None: ...
def check_positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """Validate a count (batches, a batch size): a positive int, or ``None`` where that means 'all'."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


@overload
def check_non_negative(value: Any, name: str, allow_none: Literal[False] = False) -> float: ...
@overload
def check_non_negative(value: Any, name: str, allow_none: bool) -> float | None: ...
def check_non_negative(value: Any, name: str, allow_none: bool = False) -> float | None:
    """Validate a budget or threshold: a number >= 0 (NaN is refused) (or ``None`` where that means 'none')."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_callable(value: Any, name: str) -> Any:
    """Validate an optional callable argument (``batch_to_input``)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {value!r}")
    return value


def has_module(module: str) -> bool:
    """Whether an optional package can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require_module(module: str, pip_name: str, purpose: str) -> None:
    """Raise ``ModuleNotFoundError`` with the exact install command when an optional package is missing."""
    if not has_module(module):
        raise ModuleNotFoundError(f"{purpose} needs the optional package {module!r}: run `pip install {pip_name}`")

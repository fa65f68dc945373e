"""Value checks shared by the library's configs and the command line's parsers.

Each check takes a value (a number, or the text of a flag) and returns it
converted, or raises ValueError saying what was expected, without naming the
setting: the caller adds the name (``--steps must be ...`` on the command
line, ``TrainConfig.steps must be ...`` in Python). The CLI uses them as
argparse ``type=`` so a bad value is refused at parse time, in one line.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]


def _number(value: Any, integer: bool) -> float | int:
    """``value`` (a number or its text) as an int or a finite float."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise ValueError(f"must be {kind}, got {value!r}")
    try:
        if isinstance(value, str):
            value = int(value) if integer else float(value)
        elif not isinstance(value, int | float):
            value = operator.index(value) if integer else float(value)  # numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        raise ValueError(f"must be {kind}, got {value!r}") from None
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


def positive_int(value: Any) -> int:
    n = _number(value, integer=True)
    if n < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return int(n)


def nonnegative_int(value: Any) -> int:
    n = _number(value, integer=True)
    if n < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return int(n)


def finite_float(value: Any) -> float:
    return float(_number(value, integer=False))


def positive_float(value: Any) -> float:
    x = _number(value, integer=False)
    if x <= 0:
        raise ValueError(f"must be a number > 0, got {value!r}")
    return float(x)


def nonnegative_float(value: Any) -> float:
    x = _number(value, integer=False)
    if x < 0:
        raise ValueError(f"must be a number >= 0, got {value!r}")
    return float(x)


def unit_interval(value: Any) -> float:
    """A number in [0, 1]."""
    x = _number(value, integer=False)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value!r}")
    return float(x)


def fraction(value: Any) -> float:
    """A share in [0, 1): at least something is left."""
    x = _number(value, integer=False)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"must be in [0, 1), got {value!r}")
    return float(x)


def probability_mass(value: Any) -> float:
    """A probability in (0, 1] (top-p)."""
    x = _number(value, integer=False)
    if not 0.0 < x <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value!r}")
    return float(x)


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    check.__name__ = "choice"
    return check


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def text(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def optional(check: Check) -> Check:
    def check_optional(value: Any) -> Any:
        return None if value is None else check(value)

    return check_optional

"""Small value checks shared by the option parsers; each error names the key and the accepted range.

One rule for every entry point: Python, YAML, LightningCLI and Hydra all hand values through these,
so an integer is any ``numbers.Integral`` (NumPy's included, ``bool`` excluded) and a number any
``numbers.Real``.
"""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (``int``, NumPy integers, ...), not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(key: str, value: object, *, minimum: int, none_means: str | None = None) -> int | None:
    """Return ``value`` as an ``int >= minimum`` (or ``None`` where ``none_means`` says what it means)."""
    if value is None and none_means is not None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < minimum:
        accepted = f"an int >= {minimum}" + (f" or null ({none_means})" if none_means is not None else "")
        raise ValueError(f"{key}={value!r} must be {accepted}")
    return int(value)


def check_fraction(key: str, value: object, *, upper_inclusive: bool) -> float:
    """Return ``value`` as a float in ``[0, 1)`` (or ``[0, 1]``), else raise naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key}={value!r} must be a number in [0, {'1]' if upper_inclusive else '1)'}")
    value = float(value)
    if not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
        raise ValueError(f"{key}={value} is outside [0, {'1]' if upper_inclusive else '1)'}")
    return value

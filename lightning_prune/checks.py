"""Small value checks shared by the option parsers; each error names the key and the accepted range."""

from __future__ import annotations

import numbers


def check_fraction(key: str, value: object, *, upper_inclusive: bool) -> float:
    """Return ``value`` as a float in ``[0, 1)`` (or ``[0, 1]``), else raise naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key}={value!r} must be a number in [0, {'1]' if upper_inclusive else '1)'}")
    value = float(value)
    if not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
        raise ValueError(f"{key}={value} is outside [0, {'1]' if upper_inclusive else '1)'}")
    return value

"""Strategy objects compare, hash and print by their configuration, so configs and checkpoints can match them."""

from __future__ import annotations


class ValueObject:
    """Equal when of the same type with the same attributes; printed as ``Type(attr=value, ...)``."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

"""One registry shape for every strategy kind: criteria, patterns, sparsity curves, regularizers.

A config names a strategy with a string (``"snip_momentum"``, ``"4x1"``, ``"2:4"``); the registry of
its kind turns the string into an object. A user's own class, registered in their code before the
config is read, is then usable by name from Python, YAML, LightningCLI and Hydra alike::

    @register_criterion
    class MyCriterion(Criterion):
        name = "mine"
        ...

    PruningCallback(criterion="mine")

Besides exact names, a registry may hold *families*: a regular expression whose match builds the
object, as ``"NxM"`` and ``"N:M"`` patterns are parsed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class Registry(Generic[T]):
    """Names (and name families) of one kind of strategy, each with the factory that builds it.

    Args:
        key: the option the names are given for (``"criterion"``), used in error messages.
        forgiving: look names up without case and surrounding spaces (``" 4X1 "`` is ``"4x1"``).
    """

    def __init__(self, key: str, *, forgiving: bool = False) -> None:
        self.key = key
        self.forgiving = forgiving
        self._names: dict[str, Callable[..., T]] = {}
        self._families: list[tuple[re.Pattern[str], Callable[..., T], str]] = []

    def add(self, name: str, factory: Callable[..., T]) -> None:
        """Make ``name`` build ``factory(**options)``."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.key} needs a non-empty name to be registered, got {name!r}")
        self._names[self._key(name)] = factory

    def add_family(self, regex: str, factory: Callable[..., T], form: str, example: str) -> None:
        """Make every name that fully matches ``regex`` build ``factory(match, **options)``; ``form``
        and ``example`` describe such names (``"NxM"``, ``"4x1"``)."""
        self._families.append((re.compile(regex), factory, f"{form!r} (e.g. {example!r})"))

    def names(self) -> str:
        """What is accepted, for error messages: ``'1x1', 'channelx1', 'NxM' (e.g. '4x1')``."""
        return ", ".join(
            [repr(name) for name in sorted(self._names)] + [text for _, _, text in self._families]
        )

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        """The exact names (families are not enumerable)."""
        return iter(sorted(self._names))

    def __getitem__(self, name: str) -> T:
        return self.build(name)

    def build(self, name: str, **options: Any) -> T:
        """The object ``name`` stands for, built with ``options`` (a class's keyword arguments).

        Raises:
            ValueError: naming the value and every accepted name, or the options it does not take.
        """
        factory = self._lookup(name) if isinstance(name, str) else None
        if factory is None:
            raise ValueError(f"{self.key}={name!r} is not one of {self.names()}")
        try:
            return factory(**options)
        except TypeError as error:
            raise ValueError(f"{self.key}={name!r} does not take the options {options}: {error}") from error

    def _key(self, name: str) -> str:
        return name.strip().lower() if self.forgiving else name

    def _lookup(self, name: str) -> Callable[..., T] | None:
        text = self._key(name)
        if text in self._names:
            return self._names[text]
        for regex, factory, _ in self._families:
            match = regex.fullmatch(text)
            if match is not None:
                return _bound(factory, match)
        return None


def _bound(factory: Callable[..., T], match: re.Match[str]) -> Callable[..., T]:
    def build(**options: Any) -> T:
        return factory(match, **options)

    return build


#: The key a config uses to name a class by its import path, as Hydra does.
TARGET_KEY = "_target_"


def build_strategy(spec: object, base: type[Any], registry: Registry[T], key: str) -> T:
    """One strategy object from any config form.

    ``spec`` may be an instance of ``base`` (passed through), a registered name (``"snip_momentum"``),
    or a mapping: ``{"name": "snip_momentum", "alpha": 0.9}`` (a registered name with its options)
    or ``{"_target_": "lightning_prune.SnipMomentumCriterion", "alpha": 0.9}`` (Hydra's form).

    Raises:
        ValueError: naming ``key``, the value and what is accepted.
    """
    if isinstance(spec, base):
        return cast(T, spec)
    if isinstance(spec, str):
        return registry.build(spec)
    if isinstance(spec, Mapping):
        options = {str(k): v for k, v in spec.items()}
        if TARGET_KEY in options:
            cls = _import(str(options.pop(TARGET_KEY)), key)
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ValueError(f"{key}: {TARGET_KEY}={spec[TARGET_KEY]!r} is not a {base.__name__} class")
            try:
                return cast(T, cls(**options))
            except TypeError as error:
                raise ValueError(f"{key}: {cls.__name__} does not take {options}: {error}") from error
        if "name" in options:
            return registry.build(str(options.pop("name")), **options)
        raise ValueError(
            f"{key}={dict(spec)!r} must name the {key}: add 'name' ({registry.names()}) or "
            f"'{TARGET_KEY}' (a class path such as lightning_prune.{base.__name__} subclasses)"
        )
    raise ValueError(
        f"{key}={spec!r} must be a name ({registry.names()}), a {base.__name__} object, or a mapping "
        f"with 'name' or '{TARGET_KEY}' and options"
    )


def _import(path: str, key: str) -> object:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{key}: cannot import {TARGET_KEY}={path!r}: {error}") from error

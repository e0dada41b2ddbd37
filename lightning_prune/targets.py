"""Targets: which ``(module, weight)`` pairs are pruned."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

DEFAULT_OP_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")


@dataclass(frozen=True)
class Target:
    """One pruned weight.

    Args:
        name: qualified module name, as in ``model.named_modules()``.
        module: the module that owns the weight.
        param_name: attribute name of the weight on ``module``.
    """

    name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def param(self) -> Tensor:
        return getattr(self.module, self.param_name)


def compile_patterns(key: str, regexes: str | Sequence[str] | None) -> tuple[re.Pattern[str], ...]:
    """Compile the regexes given for ``key`` (``include``/``exclude``), raising on a bad one."""
    if regexes is None:
        return ()
    if isinstance(regexes, str | re.Pattern):
        regexes = [regexes]  # type: ignore[list-item]
    if not isinstance(regexes, Sequence):
        raise ValueError(f"{key}={regexes!r} must be a list of regex strings")
    compiled = []
    for regex in regexes:
        if isinstance(regex, re.Pattern):
            compiled.append(regex)
            continue
        if not isinstance(regex, str):
            raise ValueError(f"{key} entry {regex!r} must be a regex string")
        try:
            compiled.append(re.compile(regex))
        except re.error as error:
            raise ValueError(f"{key} entry {regex!r} is not a valid regex: {error}") from error
    return tuple(compiled)


def plain_name(name: str) -> str:
    """A module name without ``torch.compile``'s ``_orig_mod`` wrapper, as the user wrote the model."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _is_op_type(module: nn.Module, op_types: Sequence[str]) -> bool:
    # Match the class or any base, so Linear subclasses (e.g. attention's out_proj) count as Linear.
    return any(cls.__name__ in op_types for cls in type(module).__mro__)


def select_targets(
    model: nn.Module,
    *,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    skip_last_layer: bool = True,
) -> list[Target]:
    """Pick the weights to prune, in module registration order.

    A module is a target when its class (or a base class) is named in ``op_types``, it has a
    ``weight`` parameter with at least 2 dims, it is not the last such module when
    ``skip_last_layer`` (the classifier/head in registration order), at least one ``include`` regex
    finds its name (``re.search``; no ``include`` means all) and no ``exclude`` regex does.

    Raises:
        ValueError: an op type that names neither a ``torch.nn`` class nor a class in the model, an
            include/exclude regex that matches no candidate module, or an empty selection.
    """
    classes_in_model = {cls.__name__ for module in model.modules() for cls in type(module).__mro__}
    for op_type in op_types:
        if not isinstance(getattr(nn, op_type, None), type) and op_type not in classes_in_model:
            raise ValueError(
                f"op_types entry {op_type!r} names neither a torch.nn module class nor a class used in "
                f"the model; accepted: class names such as {list(DEFAULT_OP_TYPES)}"
            )
    candidates = [
        (plain_name(name), module)
        for name, module in model.named_modules()
        if _is_op_type(module, op_types)
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() >= 2
    ]
    if not candidates:
        raise ValueError(f"op_types={list(op_types)} matches no module with a weight in the model")
    names = [name for name, _ in candidates]
    if skip_last_layer:
        candidates = candidates[:-1]
    for key, regexes in (("include", include), ("exclude", exclude)):
        for regex in regexes:
            if not any(regex.search(name) for name in names):
                raise ValueError(
                    f"{key} regex {regex.pattern!r} matches no candidate module; candidates are {names}"
                )
    chosen = [
        Target(name, module)
        for name, module in candidates
        if (not include or any(r.search(name) for r in include)) and not any(r.search(name) for r in exclude)
    ]
    if not chosen:
        raise ValueError(
            f"include={[r.pattern for r in include]}, exclude={[r.pattern for r in exclude]} and "
            f"skip_last_layer={skip_last_layer} leave no module to prune; candidates are {names}"
        )
    return chosen

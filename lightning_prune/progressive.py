"""Progressive pruning: ease a structured mask in through a sequence of interval masks.

When an event decides that some groups (blocks, channels, N:M runs) are to be pruned, their weights
are not zeroed at once. Each newly pruned weight gets a *stage* ``1..steps``; on the ``j``-th step of
the fade (the event itself is ``j = 1``) every weight whose stage is ``<= j`` is zero. The interval
masks therefore only shrink and the last one (``j = steps``) is exactly the structured mask. Within
each group weights go in order of their element score (``kind="scores"``, lowest first) or of their
position in the block (``kind="linear"``), spread evenly over the stages.

Stages are stored in one byte per weight, only while a fade is under way:
``KEEP`` for weights that stay, ``0`` for weights pruned earlier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_prune.checks import is_int
from lightning_prune.patterns import Pattern

KINDS = ("scores", "linear")
KEEP = 255
#: Fade length for ``Progressive(steps=None)``, i.e. ``progressive=True``.
DEFAULT_STEPS = 4
MAX_STEPS = KEEP - 1


@dataclass(frozen=True)
class Progressive:
    """How newly pruned groups fade out.

    Args:
        steps: optimizer steps over which a newly pruned group goes from dense to zero, counting the
            event's own step; ``1 <= steps <= 254`` and at most the schedule's ``frequency``.
            ``None`` (what ``progressive=True`` gives) means ``DEFAULT_STEPS``, shortened to the
            schedule's ``frequency`` when that is smaller.
        kind: ``"scores"`` zeroes each group's weights lowest-score first; ``"linear"`` in their order
            within the block.
    """

    steps: int | None = None
    kind: str = "scores"

    def __post_init__(self) -> None:
        if self.steps is not None and (not is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS):
            raise ValueError(f"progressive steps={self.steps!r} must be an int in [1, {MAX_STEPS}]")
        if self.steps is not None:
            object.__setattr__(self, "steps", int(self.steps))  # frozen: NumPy ints become ints here
        if self.kind not in KINDS:
            raise ValueError(f"progressive kind={self.kind!r} is not one of {list(KINDS)}")


def parse_progressive(spec: object) -> Progressive | None:
    """``True`` -> the default :class:`Progressive`; ``False``/``None`` -> off; a mapping of its
    arguments (``{"steps": 2, "kind": "linear"}``, from YAML) -> that; objects pass through."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return Progressive()
    if isinstance(spec, Progressive):
        return spec
    if isinstance(spec, Mapping):
        try:
            return Progressive(**{str(k): v for k, v in spec.items()})
        except TypeError as error:
            raise ValueError(f"progressive={dict(spec)!r}: {error}; accepted keys: steps, kind") from error
    raise ValueError(
        f"progressive={spec!r} must be true, false, a Progressive(steps=..., kind=...) object or a "
        "mapping of its arguments"
    )


def check_progressive_pattern(progressive: Progressive | None, pattern: Pattern) -> None:
    """Progressive pruning eases structure in; unstructured pruning has none to ease."""
    if progressive is not None and not pattern.structured:
        raise ValueError(
            "progressive=True needs a structured pattern ('NxM', 'channelx1', '1xchannel', 'N:M'); "
            f"pattern {str(pattern)!r} is unstructured"
        )


def resolve_steps(progressive: Progressive, frequency: int | None) -> Progressive:
    """Fix ``steps=None`` to ``DEFAULT_STEPS``, no longer than ``frequency`` (``None``: one-shot)."""
    if progressive.steps is not None:
        return progressive
    steps = DEFAULT_STEPS if frequency is None else min(DEFAULT_STEPS, frequency)
    return Progressive(steps=steps, kind=progressive.kind)


def plan_fade(
    pattern: Pattern, old_keep: Tensor, new_keep: Tensor, scores: Tensor, progressive: Progressive
) -> Tensor:
    """Stage of every weight for the fade from ``old_keep`` to ``new_keep`` (both bool keep masks).

    Returns:
        uint8 tensor shaped like the weight: ``KEEP`` where ``new_keep``, ``0`` where already pruned
        in ``old_keep``, else the stage ``1..steps`` at which the weight becomes zero.
    """
    newly = pattern.group_view(old_keep & ~new_keep)
    size = newly.shape[-1]
    if progressive.kind == "scores":
        key = pattern.group_view(scores).float()
    else:
        key = torch.arange(size, device=scores.device, dtype=torch.float32).expand(newly.shape)
    # Rank the newly pruned weights of each group (others sort last), then spread ranks over stages.
    key = key.masked_fill(~newly, float("inf"))
    rank = key.argsort(dim=-1, stable=True).argsort(dim=-1)
    count = newly.sum(dim=-1, keepdim=True).clamp_min(1)
    assert progressive.steps is not None, "resolve_steps() first"
    stage = (rank * progressive.steps).div(count, rounding_mode="floor") + 1
    stage = pattern.from_group_view(stage.masked_fill(~newly, 0), old_keep.shape).to(torch.uint8)
    return stage.masked_fill_(new_keep, KEEP)


def interval_mask(stage: Tensor, position: int, out: Tensor) -> Tensor:
    """Write the keep mask of fade step ``position`` (1-based) into ``out``."""
    return torch.gt(stage, position, out=out)


class Fade:
    """A progressive fade under way: where each newly pruned weight becomes zero, and how far along.

    It owns the stage tensors (one byte per weight, only while fading) and writes each step's interval
    mask into the masks it is given. Its state is part of the Pruner's checkpoint.

    Args:
        stages: per target, the stage of every weight (see :func:`plan_fade`).
        steps: the fade's length in optimizer steps.
    """

    def __init__(self, stages: list[Tensor], steps: int) -> None:
        self.stages = stages
        self.steps = steps
        self.position = 0

    @property
    def done(self) -> bool:
        return self.position >= self.steps

    def advance(self, masks: list[Tensor]) -> None:
        """One fade step: write the next interval mask of every target into ``masks``."""
        self.position = min(self.position + 1, self.steps)
        for stage, mask in zip(self.stages, masks, strict=True):
            interval_mask(stage, self.position, out=mask)

    def finish(self, masks: list[Tensor]) -> None:
        """Jump to the last step: ``masks`` become the structured masks the event decided."""
        self.position = self.steps - 1
        self.advance(masks)

    def state_dict(self, names: list[str]) -> dict[str, object]:
        return {
            "position": self.position,
            "steps": self.steps,
            "stages": dict(zip(names, self.stages, strict=True)),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], names: list[str], masks: list[Tensor]) -> Fade:
        """A fade restored from :meth:`state_dict`, its stages on the masks' devices."""
        fade = cls(
            [state["stages"][n].to(m.device) for n, m in zip(names, masks, strict=True)], int(state["steps"])
        )
        fade.position = int(state["position"])
        return fade

"""Rewinding: after each pruning event, the kept weights go back to their values at an earlier step.

With step 0 this is the lottery ticket hypothesis (Frankle & Carbin 2019: the pruned network
retrained from its initialization); with a later step it is weight rewinding (Frankle et al. 2019,
Renda et al. 2020). With ``resample`` the kept weights are drawn anew from each layer's own
initialization instead (Lightning's ``ModelPruning(resample_parameters=True)``).

The snapshot is a copy of the targeted weights (4 bytes per weight in float32), taken once, kept
in the checkpoint, and never changed by training: every rewind restores the same values. (Lightning
2.6's ``ModelPruning`` assigns the saved tensor to the weight's ``.data``, so the two share storage
from the first rewind on and later rewinds restore the current values, changing nothing.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune.targets import Target


class Rewind:
    """The weights to rewind to, and when they are taken.

    Args:
        step: optimizer step whose weights (right after it) the kept weights return to; 0 is the
            weights before the first step.
        resample: draw the kept weights anew with each layer's ``reset_parameters`` instead.
        events: which events rewind: ``"every"``, ``"first"`` or ``"last"``.
    """

    def __init__(self, step: int, resample: bool = False, events: str = "every") -> None:
        self.step = step
        self.resample = resample
        self.events = events
        #: The weights of ``step``, once taken (never with ``resample``).
        self.snapshot: list[Tensor] | None = None

    def applies(self, *, first: bool, last: bool) -> bool:
        """Whether the event at hand rewinds (``first``/``last``: it is the schedule's first/last)."""
        return (
            self.events == "every" or (self.events == "first" and first) or (self.events == "last" and last)
        )

    @property
    def ready(self) -> bool:
        """Whether an event can rewind now."""
        return self.resample or self.snapshot is not None

    def check_targets(self, targets: Sequence[Target]) -> None:
        """Refuse ``resample`` on a layer that cannot draw fresh weights."""
        if not self.resample:
            return
        missing = [t.name for t in targets if not callable(getattr(t.module, "reset_parameters", None))]
        if missing:
            raise ValueError(
                f"rewind_resample=True draws new weights with each layer's reset_parameters(), which {missing} "
                "do not have; rewind to a step instead (rewind_resample=False)"
            )

    @torch.no_grad()
    def take(self, targets: Sequence[Target]) -> None:
        """Copy the targets' weights now (the optimizer has taken exactly ``step`` steps)."""
        if not self.resample:
            self.snapshot = [t.param.detach().clone() for t in targets]

    @torch.no_grad()
    def restore(self, targets: Sequence[Target]) -> list[Tensor]:
        """Put the snapshot (or fresh draws) into every target; returns the tensors written."""
        written = []
        for index, target in enumerate(targets):
            if self.resample:
                fresh = copy.deepcopy(target.module)
                fresh.reset_parameters()  # type: ignore[operator]
                values = getattr(fresh, target.param_name).detach()
            else:
                assert self.snapshot is not None
                values = self.snapshot[index]
            target.param.copy_(values)
            written.append(target.param.detach())
        return written

    def state_dict(self, names: list[str]) -> dict[str, Any]:
        snapshot = None if self.snapshot is None else dict(zip(names, self.snapshot, strict=True))
        return {"step": self.step, "resample": self.resample, "snapshot": snapshot}

    def load_state_dict(self, state: dict[str, Any], names: list[str], targets: Sequence[Target]) -> None:
        snapshot = state.get("snapshot")
        self.snapshot = (
            None
            if snapshot is None
            else [snapshot[n].to(t.param.device) for n, t in zip(names, targets, strict=True)]
        )

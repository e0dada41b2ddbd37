"""Where a fit's pruning starts, and how long its training is in optimizer steps.

A fit starts from the first of these that applies:

1. the pruning state of the checkpoint it resumes from (``ckpt_path``);
2. the state the callback held when its previous fit ended, if this fit continues that one (the same
   model, at the trainer step where that fit ended: ``trainer.fit`` called again);
3. nothing: the pruner counts from the trainer's step and catches up with the schedule at once.

Settings that change the result are compared with the state's and a difference is refused by name;
the window a fraction of training resolves to may move with the run's length, and then the state's
window is kept (and said so), so that events already done are neither redone nor skipped.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from lightning_prune.checks import is_int
from lightning_prune.options import PruningOptions
from lightning_prune.schedules import Schedule, is_known_length
from lightning_prune.state import compare_settings

#: Version 1 of the callback saved its state under ``PruningCallback{...settings...}``.
LEGACY_KEY_PREFIX = "PruningCallback{"


def migrate_legacy_key(callbacks: dict[str, Any], key: str) -> None:
    """Move a version-1 state, saved under a key that held some settings, to ``key``; keep those settings."""
    if key in callbacks:
        return
    legacy = [name for name in callbacks if name.startswith(LEGACY_KEY_PREFIX)]
    if len(legacy) > 1:
        raise ValueError(
            f"the checkpoint holds {len(legacy)} pruning states {legacy}; one callback resumes one"
        )
    if legacy:
        state = dict(callbacks.pop(legacy[0]))
        state["legacy_settings"] = ast.literal_eval(legacy[0][len(LEGACY_KEY_PREFIX) - 1 :])
        callbacks[key] = state


def check_legacy_settings(state: Mapping[str, Any], options: PruningOptions) -> None:
    """Compare the settings a version-1 key recorded (target, pattern, criterion class) with ``options``."""
    saved = state.get("legacy_settings")
    if not isinstance(saved, Mapping):
        return
    current = {
        "target_sparsity": options.target_sparsity,
        "pattern": str(options.pattern),
        "criterion": type(options.criterion).__name__,
    }
    compare_settings(
        {k: repr(v) for k, v in saved.items()},
        {k: repr(current[k]) for k in saved if k in current},
        "settings",
    )


def check_state_step(state: Mapping[str, Any], trainer_step: int) -> None:
    """A state cannot have counted more optimizer steps than the trainer it was saved with."""
    step = state.get("step")
    if is_int(step) and step > trainer_step:  # type: ignore[operator]
        raise ValueError(
            f"pruning state: step={step} is beyond the trainer's global_step {trainer_step} saved with it; "
            "the state belongs to another run"
        )


def saved_schedule(state: Mapping[str, Any] | None) -> Schedule | None:
    """The schedule a state was pruned on (``None`` for a state that did not record it)."""
    saved = None if state is None else state.get("schedule")
    if not isinstance(saved, Mapping):
        return None
    try:
        return Schedule(**saved)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"pruning state: 'schedule' {dict(saved)} is not a valid schedule: {error}"
        ) from error


def choose_schedule(resolved: Schedule | ValueError, saved: Schedule | None) -> tuple[Schedule, str | None]:
    """The state's schedule if there is one (with a note when this run's length would move it), else ``resolved``.

    Raises:
        ValueError: ``resolved`` is the error resolving this run's window gave, and no state saved one.
    """
    if saved is None:
        if isinstance(resolved, ValueError):
            raise resolved
        return resolved, None
    if resolved == saved:
        return saved, None
    moved = "cannot be placed" if isinstance(resolved, ValueError) else _window(resolved)
    note = (
        f"lightning_prune keeps the checkpoint's pruning window ({_window(saved)}); with this run's length "
        f"the same settings would give {moved}"
    )
    return saved, note


def _window(schedule: Schedule) -> str:
    if schedule.one_shot:
        return f"one-shot at step {schedule.start_step}"
    return f"steps {schedule.start_step}->{schedule.end_step} every {schedule.frequency}"


def steps_per_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """Optimizer steps per batch assumed when placing a window: 1, or one per optimizer under manual optimization."""
    return 1 if pl_module.automatic_optimization else max(1, len(trainer.optimizers))


def total_steps(trainer: pl.Trainer, per_batch: int) -> float:
    """The run's optimizer steps (``trainer.global_step`` at its end); ``inf`` or ``-1`` when unknown.

    Lightning's ``estimated_stepping_batches`` counts batches; under manual optimization every
    optimizer's step counts, so the batches are scaled by ``per_batch`` (``max_steps`` already
    counts optimizer steps).
    """
    total = trainer.estimated_stepping_batches
    batches = trainer.num_training_batches
    if per_batch == 1 or not is_known_length(total) or trainer.max_epochs == -1 or math.isinf(batches):
        return total
    by_epochs = math.ceil(batches) * max(trainer.max_epochs or 1, 1) * per_batch
    return min(by_epochs, trainer.max_steps) if trainer.max_steps != -1 else by_epochs

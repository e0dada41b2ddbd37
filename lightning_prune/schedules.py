"""Schedules: at which optimizer steps pruning happens, and the sparsity asked for at each.

Events fall at ``start + k * frequency`` for ``k = 1 .. T - 1`` and at ``end`` (``k = T``), with
``T = ceil((end - start) / frequency)``; event ``k`` asks for ``curve(k / T)``. ``start == end`` is
one-shot: a single event at ``start`` that asks for the full target. Step 0 is "before the first
optimizer step", so a one-shot at 0 prunes at initialization.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from lightning_prune.checks import check_fraction, is_int
from lightning_prune.registry import Registry

SparsityCurve = Callable[[float, float, float], float]
"""``(progress in [0, 1], initial sparsity s_0, final sparsity a) -> sparsity``."""


def _exp(p: float, s0: float, a: float) -> float:
    # The density shrinks by the same factor at every event (INC's "exp").
    return 1.0 - (1.0 - s0) * float(((1.0 - a) / (1.0 - s0)) ** p)


def _cos(p: float, s0: float, a: float) -> float:
    return s0 + (a - s0) * (1.0 - math.cos(p * math.pi / 2.0))


def _linear(p: float, s0: float, a: float) -> float:
    return s0 + (a - s0) * p


def _cube(p: float, s0: float, a: float) -> float:
    # INC's "cube": slow start, fast finish.
    return s0 + (a - s0) * p**3


def _agp(p: float, s0: float, a: float) -> float:
    # Zhu & Gupta 2017: fast start, slow finish.
    return a + (s0 - a) * (1.0 - p) ** 3


#: Sparsity curves by name: ``sparsity_curve="cos"`` in any config.
CURVES: Registry[SparsityCurve] = Registry("sparsity_curve")


def register_curve(name: str, curve: SparsityCurve) -> SparsityCurve:
    """Make ``curve`` (progress, initial sparsity, target -> sparsity) selectable as ``sparsity_curve=name``."""
    CURVES.add(name, lambda: curve)
    return curve


for _name, _curve in {"exp": _exp, "cos": _cos, "linear": _linear, "cube": _cube, "agp": _agp}.items():
    register_curve(_name, _curve)


def check_curve(curve: str) -> str:
    """Return ``curve`` if it names a known sparsity curve, else raise naming what is accepted."""
    if not isinstance(curve, str) or curve not in CURVES:
        raise ValueError(f"sparsity_curve={curve!r} is not one of [{CURVES.names()}]")
    return curve


@dataclass(frozen=True)
class Schedule:
    """When pruning events happen and what sparsity each asks for.

    Args:
        start_step: optimizer step where sparsity starts to rise (``>= 0``).
        end_step: optimizer step of the last event, where the target is reached (``>= start_step``).
        frequency: optimizer steps between events (``>= 1``); unused for one-shot.
        curve: ``"exp"``, ``"cos"``, ``"linear"``, ``"cube"`` or ``"agp"``.
        initial_sparsity: sparsity at ``start_step``; when above 0 an event at ``start_step`` applies it.

    Example::

        >>> schedule = Schedule(start_step=0, end_step=100, frequency=10, curve="linear")
        >>> schedule.is_event(10), schedule.sparsity_at(50, target=0.8)
        (True, 0.4)
    """

    start_step: int
    end_step: int
    frequency: int = 1
    curve: str = "exp"
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        for key in ("start_step", "end_step", "frequency"):
            value = getattr(self, key)
            if not is_int(value):
                raise ValueError(f"{key}={value!r} must be an int")
            object.__setattr__(self, key, int(value))  # frozen: NumPy ints become ints once, here
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step} must be >= 0")
        if self.end_step < self.start_step:
            raise ValueError(
                f"end_step={self.end_step} is before start_step={self.start_step}; "
                "use end_step >= start_step (equal means one-shot)"
            )
        if self.frequency < 1:
            raise ValueError(f"frequency={self.frequency} must be >= 1")
        check_curve(self.curve)
        check_fraction("initial_sparsity", self.initial_sparsity, upper_inclusive=False)

    @property
    def one_shot(self) -> bool:
        return self.start_step == self.end_step

    @property
    def num_intervals(self) -> int:
        """``T``: events after ``start_step`` (1 for one-shot)."""
        if self.one_shot:
            return 1
        return math.ceil((self.end_step - self.start_step) / self.frequency)

    def event_steps(self) -> list[int]:
        """Every step at which an event happens, in order."""
        first = [self.start_step] if self.is_event(self.start_step) else []
        if self.one_shot:
            return first
        middle = range(self.start_step + self.frequency, self.end_step, self.frequency)
        return [*first, *middle, self.end_step]

    def is_event(self, step: int) -> bool:
        """Whether the optimizer step ``step`` (the count of steps taken) is a pruning event."""
        if step == self.start_step:
            return self.one_shot or self.initial_sparsity > 0.0
        if not self.start_step < step <= self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    def progress_at(self, step: int) -> float:
        """``k / T`` of the last event at or before ``step`` (0 before the first, 1 from ``end_step``)."""
        if step >= self.end_step:
            return 1.0
        if step < self.start_step:
            return 0.0
        k = (step - self.start_step) // self.frequency
        return k / self.num_intervals

    def sparsity_at(self, step: int, target: float) -> float:
        """Sparsity the schedule asks for after the last event at or before ``step``."""
        if step < self.start_step or (step == self.start_step and not self.one_shot):
            return self.initial_sparsity if step == self.start_step else 0.0
        return min(target, CURVES[self.curve](self.progress_at(step), self.initial_sparsity, target))


def check_initial_sparsity(initial_sparsity: object, target: float) -> float:
    """Return ``initial_sparsity`` as a float in ``[0, target]``, else raise naming it and the range."""
    value = check_fraction("initial_sparsity", initial_sparsity, upper_inclusive=False)
    if value > target:
        raise ValueError(
            f"initial_sparsity={value} is above target_sparsity={target}; use a share in [0, {target}]"
        )
    return value


def check_step_spec(key: str, value: object) -> int | float | None:
    """Check a step given in a config: ``None``, an int ``>= 0`` or a float fraction in ``(0, 1]``."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) < 0:
            raise ValueError(f"{key}={value} must be >= 0")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key}={value!r} must be an int step >= 0, a float fraction in (0, 1], or null")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"{key}={value} is a float, so a fraction of the training steps; it must be in (0, 1]"
        )
    return float(value)


def check_window(start_step: int | float | None, end_step: int | float | None) -> None:
    """Refuse an end before the start when both are given the same way (two steps or two fractions);
    mixed forms are compared once the run's length resolves them (:func:`resolve_schedule`)."""
    if start_step is None or end_step is None or isinstance(start_step, int) is not isinstance(end_step, int):
        return
    if end_step < start_step:
        raise ValueError(
            f"end_step={end_step!r} is before start_step={start_step!r}; use end_step >= start_step "
            "(equal means one-shot)"
        )


def is_known_length(total_steps: float) -> bool:
    """Whether a step estimate is usable: Lightning gives ``inf`` or ``-1`` when it cannot tell."""
    return math.isfinite(total_steps) and total_steps >= 0


#: With no window given: prune from the start through this fraction of training, then fine-tune.
#: 0.9 beat 0.5, 0.75 and 1.0 in every case of benchmarks/bench_defaults.py (see RESULTS.md).
DEFAULT_END_FRACTION = 0.9
#: With no frequency given: about this many events in the window.
DEFAULT_EVENTS = 20


def resolve_schedule(
    start_step: int | float | None,
    end_step: int | float | None,
    frequency: int | None,
    curve: str,
    total_steps: float,
    initial_sparsity: float = 0.0,
) -> Schedule:
    """Turn the callback's step options into a :class:`Schedule` for a run of ``total_steps`` steps.

    Floats are fractions of ``total_steps``; ``None`` means ``0`` for the start, 9/10 of training for
    the end and about 20 events for the frequency; ``initial_sparsity`` is the schedule's share
    pruned at the start. An end after ``total_steps`` is allowed (training
    may go on in a later, resumed run); the callback warns about it.

    Raises:
        ValueError: a fraction or default with an unknown length of training, or an end before the
            start.
    """

    def to_step(key: str, value: int | float | None, default: float) -> int:
        value = check_step_spec(key, value)
        if isinstance(value, int):
            return value
        fraction = default if value is None else value
        if fraction == 0.0:
            return 0
        if not is_known_length(total_steps):
            raise ValueError(
                f"{key}={value!r} needs the length of training, but the trainer cannot estimate it "
                "(no max_steps/max_epochs, or an iterable dataset of unknown length); give an int step"
            )
        return round(fraction * total_steps)

    start = to_step("start_step", start_step, 0.0)
    end = to_step("end_step", end_step, DEFAULT_END_FRACTION)
    if end < start:
        raise ValueError(
            f"end_step={end_step!r} (step {end}) is before start_step={start_step!r} (step {start})"
        )
    if frequency is None:
        frequency = max(1, round((end - start) / DEFAULT_EVENTS))
    return Schedule(
        start_step=start, end_step=end, frequency=frequency, curve=curve, initial_sparsity=initial_sparsity
    )

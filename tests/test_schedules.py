"""Schedule formulas at their ends and midpoints, event steps, and window resolution."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_prune.schedules import CURVES, Schedule, resolve_schedule

TARGET = 0.9


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_curves_start_at_initial_and_end_at_target(curve: str) -> None:
    f = CURVES[curve]
    assert f(0.0, 0.0, TARGET) == pytest.approx(0.0, abs=1e-12)
    assert f(1.0, 0.0, TARGET) == pytest.approx(TARGET)
    assert f(0.0, 0.2, TARGET) == pytest.approx(0.2)
    assert f(1.0, 0.2, TARGET) == pytest.approx(TARGET)


def test_curve_midpoints_match_their_definitions() -> None:
    # Values worked out by hand from each definition at p = 1/2, s_0 = 0, a = 0.9.
    assert CURVES["linear"](0.5, 0.0, 0.9) == pytest.approx(0.45)
    assert CURVES["cube"](0.5, 0.0, 0.9) == pytest.approx(0.9 / 8)
    assert CURVES["agp"](0.5, 0.0, 0.9) == pytest.approx(0.9 * (1 - 1 / 8))
    assert CURVES["cos"](0.5, 0.0, 0.9) == pytest.approx(0.9 * (1 - math.sqrt(0.5)))
    # exp keeps a constant density ratio: density at the middle is sqrt(final density).
    assert 1 - CURVES["exp"](0.5, 0.0, 0.9) == pytest.approx(math.sqrt(0.1))
    # with s_0 > 0: 1 - (1 - s0) * ((1 - a) / (1 - s0)) ** p
    assert CURVES["exp"](0.5, 0.5, 0.9) == pytest.approx(1 - 0.5 * math.sqrt(0.1 / 0.5))


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_curves_are_monotone(curve: str) -> None:
    values = [CURVES[curve](k / 50, 0.0, TARGET) for k in range(51)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


def test_event_steps_iterative_and_last_interval_shorter() -> None:
    schedule = Schedule(start_step=5, end_step=27, frequency=10, curve="linear")
    assert schedule.event_steps() == [15, 25, 27]
    assert [schedule.is_event(s) for s in (5, 14, 15, 25, 26, 27, 28, 35)] == [
        False,
        False,
        True,
        True,
        False,
        True,
        False,
        False,
    ]
    # T = ceil(22 / 10) = 3 intervals: 1/3, 2/3, then the target at end_step.
    assert schedule.sparsity_at(15, 0.9) == pytest.approx(0.3)
    assert schedule.sparsity_at(24, 0.9) == pytest.approx(0.3)
    assert schedule.sparsity_at(25, 0.9) == pytest.approx(0.6)
    assert schedule.sparsity_at(27, 0.9) == pytest.approx(0.9)
    assert schedule.sparsity_at(1000, 0.9) == pytest.approx(0.9)
    assert schedule.sparsity_at(4, 0.9) == 0.0


def test_one_shot_is_a_single_event_with_the_full_target() -> None:
    schedule = Schedule(start_step=7, end_step=7)
    assert schedule.one_shot
    assert schedule.event_steps() == [7]
    assert schedule.sparsity_at(6, 0.8) == 0.0
    assert schedule.sparsity_at(7, 0.8) == pytest.approx(0.8)


def test_initial_sparsity_adds_an_event_at_start() -> None:
    schedule = Schedule(start_step=0, end_step=10, frequency=5, curve="linear", initial_sparsity=0.3)
    assert schedule.event_steps() == [0, 5, 10]
    assert schedule.sparsity_at(0, 0.9) == pytest.approx(0.3)
    assert schedule.sparsity_at(5, 0.9) == pytest.approx(0.6)


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 50),
    length=st.integers(1, 300),
    frequency=st.integers(1, 40),
    curve=st.sampled_from(sorted(CURVES)),
)
def test_events_end_at_target_and_rise(start: int, length: int, frequency: int, curve: str) -> None:
    schedule = Schedule(start_step=start, end_step=start + length, frequency=frequency, curve=curve)
    steps = schedule.event_steps()
    assert steps == [s for s in range(start, start + length + 1) if schedule.is_event(s)]
    assert steps[-1] == start + length
    assert len(steps) == math.ceil(length / frequency)
    values = [schedule.sparsity_at(s, TARGET) for s in steps]
    assert values[-1] == pytest.approx(TARGET)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


def test_resolve_defaults_prune_through_nine_tenths_with_about_20_events() -> None:
    schedule = resolve_schedule(None, None, None, "exp", total_steps=1000)
    assert (schedule.start_step, schedule.end_step) == (0, 900)
    assert len(schedule.event_steps()) == 20


def test_resolve_float_fractions_and_ints() -> None:
    schedule = resolve_schedule(0.1, 0.5, 7, "cos", total_steps=200)
    assert (schedule.start_step, schedule.end_step, schedule.frequency, schedule.curve) == (20, 100, 7, "cos")
    schedule = resolve_schedule(3, 3, None, "exp", total_steps=10)
    assert schedule.one_shot and schedule.event_steps() == [3]

"""The curve figure: its legend hides no curve and explains every mark drawn."""

from __future__ import annotations

import math

import pytest
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from lightning_prune.history import EVENT, VALIDATION, PruningHistory
from lightning_prune.plots import curve_figure


def _history(metrics: bool) -> PruningHistory:
    """Events every 46 steps up to 620 and a validation every 23 steps up to 690, like the demo."""
    history = PruningHistory()
    for step in range(0, 700, 23):
        sparsity = 0.9 * (1 - math.exp(-step / 200))
        if step <= 620 and step % 46 == 0:
            history.add(
                step=step, epoch=step // 23, source=EVENT, sparsity=sparsity, target_sparsity=sparsity
            )
        values = {"val_loss": 0.5 * math.exp(-step / 100) + 0.1, "val_acc": 0.95 - 0.1 * math.exp(-step / 50)}
        history.add(
            step=step,
            epoch=step // 23,
            source=VALIDATION,
            sparsity=sparsity,
            target_sparsity=sparsity,
            metrics=values if metrics else None,
        )
    return history


def _legends(figure: Figure) -> list[Legend]:
    found = list(figure.legends)
    found += [axes.get_legend() for axes in figure.axes if axes.get_legend() is not None]
    return found


@pytest.mark.parametrize("metrics", [True, False])
def test_legend_overlaps_no_axes(metrics: bool) -> None:
    figure = curve_figure(_history(metrics), title="MLP")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    legends = _legends(figure)
    assert legends, "the figure has a legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for axes in figure.axes:
            assert not box.overlaps(axes.get_window_extent(renderer)), (legend, axes.get_title())


def test_legend_explains_the_event_ticks_and_the_metric_axis() -> None:
    figure = curve_figure(_history(metrics=True), title="MLP")
    (legend,) = _legends(figure)
    labels = [text.get_text() for text in legend.get_texts()]
    handles = dict(zip(labels, legend.legend_handles, strict=True))
    (event_label,) = [label for label in labels if "event" in label]
    assert handles[event_label].get_marker() == "|", "the tick marks drawn at events are what the entry shows"
    assert any("right axis" in label for label in labels), "the orange curve is read on the right axis"
    assert any("target" in label for label in labels)


def test_title_is_the_one_given() -> None:
    figure = curve_figure(_history(metrics=True), title="digits MLP, 90% 4x1")
    assert figure.get_suptitle() == "digits MLP, 90% 4x1"

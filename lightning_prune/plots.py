"""Drawing the history: sparsity and metrics against the step, and each metric against sparsity.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never ``pyplot``, so that
drawing touches no global state and needs no display.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_prune.history import EVENT, VALIDATION, PruningHistory

#: Figure size: this many inches wide, ``ROW_HEIGHT`` per monitored metric, at ``DPI``.
WIDTH, ROW_HEIGHT, DPI = 11.0, 3.5, 100


def figure_size_px(history: PruningHistory) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`curve_figure` for ``history``."""
    rows = max(1, len(history.metric_names))
    return round(WIDTH * DPI), round(ROW_HEIGHT * rows * DPI)


def curve_figure(history: PruningHistory, title: str = "lightning_prune") -> Figure:
    """One row per monitored metric: left, sparsity (and target) and the metric against the step;
    right, the metric against sparsity at each validation run. Without metrics, sparsity alone.

    One legend for the whole figure sits below the plots, outside every axes, so it never hides a
    curve; it names the dashed target, the measured sparsity, the pruning-event ticks and the metric.
    """
    names = history.metric_names
    figure = Figure(figsize=(WIDTH, ROW_HEIGHT * max(1, len(names))), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    rows = sorted(history.rows, key=lambda r: (r["step"], r["source"] == VALIDATION))
    steps = [r["step"] for r in rows]
    sparsity = [r["sparsity"] for r in rows]
    target = [r["target_sparsity"] for r in rows]
    validations = [r for r in rows if r["source"] == VALIDATION]
    events = [r for r in rows if r["source"] == EVENT]
    grid = figure.subplots(max(1, len(names)), 2 if names else 1, squeeze=False)
    figure.suptitle(title)
    legend: dict[str, Artist] = {}
    for index in range(grid.shape[0]):
        left = grid[index, 0]
        (legend["target sparsity (schedule)"],) = left.step(
            steps, target, where="post", linestyle="--", color="tab:gray"
        )
        (legend["sparsity (zeros in the pruned weights)"],) = left.plot(
            steps, sparsity, marker=".", color="tab:blue"
        )
        if events:
            (legend["pruning event"],) = left.plot(
                [r["step"] for r in events], [r["sparsity"] for r in events], "|", color="tab:blue", ms=10
            )
        left.set_xlabel("optimizer step")
        left.set_ylabel("sparsity")
        left.set_ylim(-0.02, 1.02)
        left.grid(alpha=0.3)
        if not names:
            left.set_title("sparsity against step")
            continue
        name = names[index]
        points = [r for r in validations if name in r["metrics"]]
        twin = left.twinx()
        (legend["metric at each validation (right axis)"],) = twin.plot(
            [r["step"] for r in points],
            [r["metrics"][name] for r in points],
            marker="o",
            ms=3,
            color="tab:orange",
        )
        twin.set_ylabel(name, color="tab:orange")
        left.set_title(f"sparsity and {name} against step")
        right = grid[index, 1]
        xs = np.array([r["sparsity"] for r in points])
        ys = np.array([r["metrics"][name] for r in points])
        scatter = right.scatter(xs, ys, c=[r["step"] for r in points], cmap="viridis", s=18, zorder=2)
        right.plot(xs, ys, color="tab:gray", alpha=0.4, zorder=1)
        figure.colorbar(scatter, ax=right, label="optimizer step")
        right.set_xlabel("sparsity")
        right.set_ylabel(name)
        right.set_title(f"{name} against sparsity")
        right.grid(alpha=0.3)
    # "outside": constrained layout makes room below the axes instead of drawing over them.
    figure.legend(
        list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend), fontsize="small"
    )
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes, at its own size and dpi."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def figure_rgb(figure: Figure) -> np.ndarray:
    """The figure rendered to an ``(H, W, 3)`` uint8 array (what TensorBoard's ``add_image`` takes)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # type: ignore[no-untyped-call]  # matplotlib's Agg canvas has no annotations
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]

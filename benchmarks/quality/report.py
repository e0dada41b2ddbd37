"""Turn the arms' results into the CSV, the plot, the markdown table and the issue-8 target checks."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .arms import Arm, Result

CSV_COLUMNS = (
    "task",
    "seed",
    "arm",
    "method",
    "criterion",
    "pattern",
    "variant",
    "target_sparsity",
    "sparsity",
    "metric",
    "value",
    "val_loss",
    "val_ppl",
    "val_acc",
    "fit_s",
    "event_steps",
    "error",
)
#: A run that ends more than this below its target sparsity did not reach it.
SPARSITY_SLACK = 0.01
METHOD_LABELS = {"dense": "dense", "modelpruning": "ModelPruning", "ours": "ours", "inc": "INC 3.7.1"}


@dataclass(frozen=True)
class Summary:
    """One arm of one task over its seeds (medians).

    Args:
        task: task name.
        arm: the arm.
        metric: name of the compared metric.
        value: median of the metric (``nan`` when every seed failed).
        sparsity: median sparsity reached.
        fit_s: median fit seconds.
        rel: relative change of ``value`` against dense's median (``value / dense - 1``).
        extra: median of the secondary number (perplexity for the GPT, loss for digits).
        seeds: seeds that ran.
        error: the first error, when any seed failed.
    """

    task: str
    arm: Arm
    metric: str
    value: float
    sparsity: float
    fit_s: float
    rel: float
    extra: float
    seeds: int
    error: str | None


def result_rows(task: str, metric: str, results: Sequence[Result]) -> list[dict[str, object]]:
    """CSV rows, one per arm and seed."""
    rows = []
    for r in results:
        rows.append(
            {
                "task": task,
                "seed": r.seed,
                "arm": r.arm.name,
                "method": r.arm.method,
                "criterion": r.arm.criterion,
                "pattern": r.arm.pattern,
                "variant": r.arm.variant,
                "target_sparsity": r.arm.target,
                "sparsity": r.sparsity,
                "metric": metric,
                "value": r.metrics.get(metric, float("nan")),
                "val_loss": r.metrics.get("val_loss", ""),
                "val_ppl": r.metrics.get("val_ppl", ""),
                "val_acc": r.metrics.get("val_acc", ""),
                "fit_s": r.fit_s,
                "event_steps": " ".join(map(str, r.event_steps)),
                "error": r.error or "",
            }
        )
    return rows


def render_csv(rows: Sequence[dict[str, object]]) -> str:
    """The CSV text of ``rows``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def summarize(task: str, metric: str, extra: str, results: Sequence[Result]) -> list[Summary]:
    """Medians over seeds per arm, in the order the arms first appear; dense is the reference."""
    by_arm: dict[Arm, list[Result]] = {}
    for r in results:
        by_arm.setdefault(r.arm, []).append(r)
    dense = [r.metrics.get(metric, float("nan")) for r in by_arm.get(Arm("dense"), [])]
    dense_value = _median(dense)
    out = []
    for arm, runs in by_arm.items():
        value = _median([r.metrics.get(metric, float("nan")) for r in runs])
        errors = [r.error for r in runs if r.error]
        out.append(
            Summary(
                task=task,
                arm=arm,
                metric=metric,
                value=value,
                sparsity=_median([r.sparsity for r in runs]),
                fit_s=_median([r.fit_s for r in runs]),
                rel=value / dense_value - 1.0,
                extra=_median([r.metrics.get(extra, float("nan")) for r in runs]),
                seeds=len(runs),
                error=errors[0] if errors else None,
            )
        )
    return out


def method_label(arm: Arm) -> str:
    """How the table names the arm's method."""
    label = METHOD_LABELS[arm.method]
    return f"{label} +{arm.variant.replace('_', ' ')}" if arm.variant else label


def arm_criterion(arm: Arm) -> str:
    """The criterion cell: the criterion, with the arm's further options when it has any."""
    if not arm.options:
        return arm.criterion
    return arm.criterion + " [" + ", ".join(f"{key}={value}" for key, value in arm.options) + "]"


def render_table(summaries: Sequence[Summary], extra_names: dict[str, str]) -> str:
    """The markdown table: one row per task and arm."""
    lines = [
        "| task | method | criterion | pattern | target | sparsity reached | metric (median) | vs dense | fit s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        a = s.arm
        target = "-" if a.method == "dense" else f"{a.target:.0%}"
        if s.error and math.isnan(s.value):
            metric = f"failed: {s.error[:160]}".replace("|", "/").replace("\n", " ")
            rel = fit = sparsity = "-"
        else:
            extra = extra_names.get(s.task)
            extra_text = f" ({extra} {s.extra:.3f})" if extra and not math.isnan(s.extra) else ""
            metric = f"{s.metric} {s.value:.4f}{extra_text}"
            rel = "-" if a.method == "dense" else f"{s.rel:+.2%}"
            fit = f"{s.fit_s:.1f}"
            sparsity = f"{s.sparsity:.1%}"
        lines.append(
            f"| {s.task} | {method_label(a)} | {arm_criterion(a)} | {a.pattern} | {target} | {sparsity} "
            f"| {metric} | {rel} | {fit} |"
        )
    return "\n".join(lines)


def _better(s: Summary, higher_is_better: bool) -> float:
    """A sort key: smaller is better."""
    if math.isnan(s.value):
        return math.inf
    return -s.value if higher_is_better else s.value


def best_per_pattern(summaries: Sequence[Summary], higher_is_better: dict[str, bool]) -> str:
    """Markdown: for each task and pattern, our arms ranked (best three) and the peers' numbers."""
    lines = [
        "| task | pattern | best of ours | 2nd | 3rd | ModelPruning | best INC |",
        "|---|---|---|---|---|---|---|",
    ]
    tasks = list(dict.fromkeys(s.task for s in summaries))
    for task in tasks:
        rows = [s for s in summaries if s.task == task]
        hib = higher_is_better[task]
        for pattern in dict.fromkeys(s.arm.pattern for s in rows if s.arm.method == "ours"):
            ours = sorted(
                (s for s in rows if s.arm.method == "ours" and s.arm.pattern == pattern),
                key=lambda s: _better(s, hib),
            )
            cells = []
            for s in ours[:3]:
                variant = f" +{s.arm.variant}" if s.arm.variant else ""
                cells.append(f"{arm_criterion(s.arm)}{variant} {s.value:.4f} ({s.rel:+.2%})")
            cells += ["-"] * (3 - len(cells))
            peers = []
            for method in ("modelpruning", "inc"):
                theirs = sorted(
                    (s for s in rows if s.arm.method == method and s.arm.pattern == pattern),
                    key=lambda s: _better(s, hib),
                )
                peers.append(
                    f"{theirs[0].arm.criterion} {theirs[0].value:.4f} ({theirs[0].rel:+.2%})"
                    if theirs and not math.isnan(theirs[0].value)
                    else "-"
                )
            lines.append(f"| {task} | {pattern} | {' | '.join(cells)} | {' | '.join(peers)} |")
    return "\n".join(lines)


def target_checks(summaries: Sequence[Summary]) -> list[str]:
    """Issue 8's targets on the GPT task, each line saying met or missed and by how much."""
    gpt = [s for s in summaries if s.task == "gpt" and not math.isnan(s.value)]
    if not gpt:
        return ["GPT task not run: the issue's targets are not checked."]
    lines = []
    for pattern, limit in (("2:4", 0.05), ("4x1", 0.10)):
        ours = [s for s in gpt if s.arm.method == "ours" and s.arm.pattern == pattern]
        if not ours:
            continue
        best = min(ours, key=lambda s: s.value)
        worst = max(ours, key=lambda s: s.value)
        within = sum(s.rel <= limit for s in ours)
        verdict = "met" if best.rel <= limit else f"missed by {best.rel - limit:.2%} points"
        lines.append(
            f"GPT {pattern} within {limit:.0%} of dense val loss: best of ours {best.arm.name} "
            f"{best.rel:+.2%}: {verdict}; {within}/{len(ours)} of our {pattern} arms within "
            f"(worst {worst.arm.name} {worst.rel:+.2%})."
        )
    for method in ("modelpruning", "inc"):
        for pattern in dict.fromkeys(s.arm.pattern for s in gpt if s.arm.method == method):
            theirs = min(
                (s for s in gpt if s.arm.method == method and s.arm.pattern == pattern),
                key=lambda s: s.value,
            )
            ours = [s for s in gpt if s.arm.method == "ours" and s.arm.pattern == pattern]
            if not ours:
                continue
            best = min(ours, key=lambda s: s.value)
            gap = best.value / theirs.value - 1.0
            if best.value <= theirs.value:
                verdict = "met"
            elif theirs.sparsity < theirs.arm.target - SPARSITY_SLACK <= best.sparsity:
                # A peer that stops short of the target keeps more weights: not a like-for-like loss.
                verdict = (
                    f"not comparable: {METHOD_LABELS[method]} reached {theirs.sparsity:.1%} of the "
                    f"{theirs.arm.target:.0%} target, ours {best.sparsity:.1%} (ours {gap:+.2%} above)"
                )
            else:
                verdict = f"missed: ours is {gap:+.2%} above"
            lines.append(
                f"GPT {pattern}: best of ours {best.arm.name} {best.value:.4f} vs "
                f"{METHOD_LABELS[method]} {theirs.arm.name} {theirs.value:.4f} ({gap:+.2%}): {verdict}."
            )
    return lines


#: Issue 21: at 1x1 90% on the GPT task, ours at least this much below the best peer, on every seed.
LEAD = 0.005


def per_seed_lead(rows: Sequence[dict[str, object]], task: str = "gpt", pattern: str = "1x1") -> str:
    """Markdown: every ``pattern`` arm of ``task`` per seed, and each of ours against the best peer.

    The best peer of a seed is the lowest value any ``ModelPruning`` or INC arm reached on that seed
    (lower is better: the GPT task's loss). An arm of ours meets issue 21's goal on a seed when its
    value is at least :data:`LEAD` below that peer's.
    """
    mine = [r for r in rows if r["task"] == task and r["pattern"] in (pattern, "-") and not r["error"]]
    seeds = sorted({int(str(r["seed"])) for r in mine})
    if not mine or not seeds:
        return f"{task} {pattern}: not run."
    arms = list(dict.fromkeys(str(r["arm"]) for r in mine))
    value = {(str(r["arm"]), int(str(r["seed"]))): float(str(r["value"])) for r in mine}
    method = {str(r["arm"]): str(r["method"]) for r in mine}
    peers = [a for a in arms if method[a] in ("modelpruning", "inc")]
    best_peer = {
        seed: min(((value[(a, seed)], a) for a in peers if (a, seed) in value), default=(math.nan, "-"))
        for seed in seeds
    }
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| arm | {head} | median | vs best peer per seed | lead >= {LEAD:.1%} on |",
        "|---|" + "---:|" * len(seeds) + "---:|---|---|",
    ]
    for arm in arms:
        values = [value.get((arm, s), math.nan) for s in seeds]
        cells = " | ".join(f"{v:.4f}" for v in values)
        if method[arm] == "ours":
            gaps = [v / best_peer[s][0] - 1.0 for v, s in zip(values, seeds, strict=True)]
            met = sum(g <= -LEAD for g in gaps if not math.isnan(g))
            versus = ", ".join(f"{g:+.2%}" for g in gaps)
            verdict = f"{met}/{len(seeds)} seeds"
        else:
            versus = verdict = "-"
        lines.append(f"| `{arm}` | {cells} | {_median(values):.4f} | {versus} | {verdict} |")
    named = ", ".join(f"seed {s}: `{a}` {v:.4f}" for s, (v, a) in best_peer.items())
    lines.append("")
    lines.append(f"Best peer per seed: {named}.")
    return "\n".join(lines)


def plot(summaries: Sequence[Summary], path: Path, titles: dict[str, str]) -> bytes:
    """PNG bytes: the metric against sparsity reached, one subplot per task, one series per method.

    Uses ``matplotlib.figure.Figure`` with the Agg canvas, not pyplot's global state.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(s.task for s in summaries))
    figure = Figure(figsize=(6.5 * len(tasks), 5.5))
    FigureCanvasAgg(figure)
    markers = {"1x1": "o", "4x1": "s", "2:4": "^", "channelx1": "D"}
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), index + 1)
        rows = [s for s in summaries if s.task == task and not math.isnan(s.value)]
        series: dict[str, list[Summary]] = {}
        for s in rows:
            if s.arm.method == "dense":
                axes.axhline(s.value, color="black", linestyle="--", linewidth=1, label="dense")
                continue
            key = f"{method_label(s.arm)} {s.arm.criterion}"
            series.setdefault(key, []).append(s)
        colours = matplotlib.colormaps["tab20"]
        for number, (key, points) in enumerate(series.items()):
            points.sort(key=lambda s: s.sparsity)
            line = axes.plot(
                [100 * p.sparsity for p in points],
                [p.value for p in points],
                linewidth=0.8,
                alpha=0.6,
                color=colours(number % 20),
            )[0]
            for p in points:
                axes.plot(
                    100 * p.sparsity,
                    p.value,
                    marker=markers.get(p.arm.pattern, "x"),
                    color=line.get_color(),
                    markerfacecolor="none" if p.arm.method == "inc" else line.get_color(),
                    linestyle="none",
                )
            line.set_label(key)
        axes.set_title(titles.get(task, task), fontsize=9)
        axes.set_xlabel("sparsity reached over the targeted layers (%)")
        axes.set_ylabel(rows[0].metric if rows else "")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, ncol=2, loc="best")
    figure.text(0.01, 0.005, "markers: o 1x1, s 4x1, ^ 2:4, D channelx1; hollow: INC", fontsize=7, ha="left")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()

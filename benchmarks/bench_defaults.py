"""Which defaults should ``PruningCallback()`` have? Curve, window and group-lasso strength, measured.

Runs arms of ``bench_quality.py``'s GPT task (the task that tells methods apart; digits does not)
with magnitude pruning and one setting changed at a time from the callback's defaults:

- ``sparsity_curve`` exp, cos, linear, cube, agp, at 1x1 90% and 4x1 80%, last event at 0.75 of training;
- the window: ``end_step`` 0.5, 0.75, 0.9 of training, and 1.0 (no fine-tuning at all), exp curve;
- ``regularizer="group_lasso"`` with ``regularizer_coeff`` 1e-4 (default), 1e-2, 1e-1 and 1, at 4x1 80%
  and channelx1 50% (last event at 0.75), next to no regularizer.

Every arm names its curve and window explicitly, so the table stays meaningful when the callback's
defaults change (this sweep is what moved the default ``end_step`` from 0.75 to 0.9).

Every arm trains the same initial weights on the same batch stream with the same Adam and steps
(see ``quality/arms.py``). Seeds run in parallel processes (``--jobs``), one torch thread each. The
table gives, per setting, the median over seeds of the validation loss change from that seed's
dense run. Prints its section and writes it, with ``defaults_results.csv`` beside it, under
``runs/benchmarks/bench_defaults/``; ``--write-results`` updates the tracked ``benchmarks/RESULTS.md``
and ``benchmarks/defaults_results.csv`` instead.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import load_line, machine_line, quiet_lightning
from quality.arms import Arm, run_arm
from quality.tasks import make_task
from results_file import add_output_arguments, output_path, write_section

from lightning_prune.files import write_atomically

START, END = "<!-- bench_defaults:start -->", "<!-- bench_defaults:end -->"
CSV_NAME = "defaults_results.csv"
TARGETS = {"1x1": 0.9, "4x1": 0.8, "channelx1": 0.5}


#: The window every non-window question is asked at (every arm names its window explicitly, so
#: results stay comparable when the callback's default changes; it was 0.75 when this sweep first ran).
BASE_END = 0.75


def sweep_arms() -> list[tuple[str, Arm]]:
    """``(question, arm)`` pairs: magnitude pruning with one setting changed at a time."""
    arms: list[tuple[str, Arm]] = [("reference", Arm("dense"))]
    for pattern in ("1x1", "4x1"):
        target = TARGETS[pattern]
        for curve in ("exp", "cos", "linear", "cube", "agp"):
            options = (("sparsity_curve", curve), ("end_step", BASE_END))
            arms.append(("curve", Arm("ours", "magnitude", pattern, target, options=options)))
        for end in (0.5, 0.9, 1.0):
            options = (("sparsity_curve", "exp"), ("end_step", end))
            arms.append(("window", Arm("ours", "magnitude", pattern, target, options=options)))
    for pattern in ("4x1", "channelx1"):
        target = TARGETS[pattern]
        if pattern != "4x1":
            options = (("sparsity_curve", "exp"), ("end_step", BASE_END))
            arms.append(("no regularizer", Arm("ours", "magnitude", pattern, target, options=options)))
        for coeff in (1e-4, 1e-2, 1e-1, 1.0):
            options = (("regularizer_coeff", coeff), ("end_step", BASE_END))
            arms.append(("group lasso", Arm("ours", "magnitude", pattern, target, "group_lasso", options)))
    return arms


def run_one(task_name: str, size: str, seed: int, arm: Arm) -> dict[str, Any]:
    """Train one arm for one seed in this (worker) process; one row of the CSV."""
    torch.set_num_threads(1)
    quiet_lightning()
    task = make_task(task_name, size, seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        result = run_arm(task, arm, seed, root)
    return {
        "seed": seed,
        "arm": arm.name,
        "sparsity": result.sparsity,
        "val_loss": result.metrics["val_loss"],
        "seconds": time.perf_counter() - started,
    }


def render(
    rows: list[dict[str, Any]],
    arms: list[tuple[str, Arm]],
    seeds: list[int],
    command: str,
    minutes: float | None,
    size: str,
    jobs: int,
) -> str:
    dense = {r["seed"]: r["val_loss"] for r in rows if r["arm"] == "dense"}
    lines = [
        "## Choosing the defaults: curve, window, group-lasso strength (`bench_defaults.py`)",
        "",
        f"Command: `{command}` ({minutes:.1f} min)"
        if minutes is not None
        else f"Rendered by `{command}` from the CSV a run of this script wrote.",
        "",
        f"Machine: {machine_line(1)}; {jobs} worker processes, one torch thread each. "
        f"Load average at the end: {load_line()}.",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Task: `bench_quality.py`'s "
        f"GPT ({size} size), magnitude criterion, seeds {','.join(map(str, seeds))}. Change = validation "
        "loss relative to the same seed's dense run; the table shows the median over seeds and the "
        "per-seed values. Lower is better.",
        "",
        "| question | arm | sparsity | median change | per seed |",
        "|---|---|---:|---:|---|",
    ]
    for question, arm in arms:
        mine = sorted((r for r in rows if r["arm"] == arm.name), key=lambda r: r["seed"])
        if not mine or arm.method == "dense":
            continue
        changes = [r["val_loss"] / dense[r["seed"]] - 1 for r in mine]
        per_seed = ", ".join(f"{c:+.2%}" for c in changes)
        sparsity = statistics.median(r["sparsity"] for r in mine)
        lines.append(
            f"| {question} | `{arm.name}` | {sparsity:.1%} | {statistics.median(changes):+.2%} | {per_seed} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes, one thread each")
    parser.add_argument("--size", default="default", choices=["quick", "default"], help="GPT task size")
    parser.add_argument("--arms", default=None, help="substring of arm names to run (dense always runs)")
    add_output_arguments(parser, "bench_defaults")
    parser.add_argument(
        "--from-csv",
        type=Path,
        default=None,
        help="only render the section from this CSV of an earlier run (give that run's other flags)",
    )
    args = parser.parse_args(argv)
    output = output_path(args, "bench_defaults")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r} must be a comma list of ints")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} must be >= 1")
    arms = [
        (q, a) for q, a in sweep_arms() if a.method == "dense" or args.arms is None or args.arms in a.name
    ]
    command = "python benchmarks/bench_defaults.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_csv is not None:
        with args.from_csv.open() as handle:
            rows = [
                {
                    **r,
                    "seed": int(r["seed"]),
                    "sparsity": float(r["sparsity"]),
                    "val_loss": float(r["val_loss"]),
                }
                for r in csv.DictReader(handle)
            ]
        section = render(rows, arms, seeds, command.strip(), None, args.size, args.jobs)
        write_section(output, START, END, section)
        print(section)
        print(f"wrote {output}")
        return
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, "gpt", args.size, seed, arm) for seed in seeds for _, arm in arms]
        for future in futures:
            row = future.result()
            rows.append(row)
            print(
                f"seed {row['seed']} {row['arm']:<60} val_loss {row['val_loss']:.4f} ({row['seconds']:.0f} s)"
            )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(output.parent / CSV_NAME, buffer.getvalue())
    minutes = (time.perf_counter() - started) / 60
    section = render(rows, arms, seeds, command.strip(), minutes, args.size, args.jobs)
    write_section(output, START, END, section)
    print(section)
    print(f"wrote {output} and {output.parent / CSV_NAME}")


if __name__ == "__main__":
    main()

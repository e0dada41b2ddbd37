"""Quality kept at each sparsity: ``PruningCallback`` against Lightning's ``ModelPruning`` and INC 3.7.1.

Two tasks on data that ships with the packages (``benchmarks/quality/tasks.py``): the digits CNN of
``lightning_prune.demo`` (validation accuracy) and a byte-level GPT trained on the standard library's
own source, judged by validation loss on held-out files. Every arm of a task trains the same
initial weights on the same batch stream with the same Adam for the same number of steps:

- ``dense``: no pruning;
- ``modelpruning/l1/1x1``: Lightning's ``ModelPruning("l1_unstructured", use_global_unstructured=True)``
  to 90%, on the same layers and the same event steps as ours (see ``quality/arms.py``);
- ``ours/<criterion>/<pattern>``: ``PruningCallback`` with every criterion (and INC's decaying
  snip-momentum, ``snip_momentum_decay``) at 1x1 90%, 4x1 80%, 2:4 and channelx1 50%; for magnitude
  and snip_momentum also ``+progressive`` (structured patterns) and ``+group_lasso`` (4x1, channelx1);
- ``inc/<criterion>/<pattern>``: INC 3.7.1's pruner (magnitude, snip_momentum) at the same four
  cases, when ``benchmarks/.venv-inc`` exists (``bash benchmarks/setup_inc.sh``); it runs there in a
  plain loop (``quality/inc_arm.py``).

Every pruning arm uses the callback's default window: about 20 events from step 0 to 9/10 of
training on the ``exp`` curve, then a tenth of fine-tuning at the target.

Run ``python benchmarks/bench_quality.py`` (about 20 minutes on 2 CPU cores; ``--threads 1`` on a
shared machine), ``--quick`` for a few-second smoke run. It writes ``quality_results.csv`` (one row
per arm and seed), ``quality.png`` and its section of ``RESULTS.md``, all in the folder of
``--output``: ``runs/benchmarks/bench_quality/`` unless ``--write-results`` asks for the tracked
``benchmarks/``. A CUDA GPU is used when present; ``--size large`` makes the GPT task larger for it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality/ and bench_overhead beside this file

from bench_overhead import load_line, machine_line, quiet_lightning, write_atomically
from quality.arms import Arm, Result, all_arms, pruning_schedule, quick_arms, run_arm, select_arms
from quality.inc_arm import INC_PYTHON, inc_status, run_inc_arms
from quality.report import (
    best_per_pattern,
    per_seed_lead,
    plot,
    render_csv,
    render_table,
    result_rows,
    summarize,
    target_checks,
)
from quality.tasks import SIZES, TASKS, Task, make_task
from results_file import add_output_arguments, output_path

from lightning_prune.files import write_atomically as write_file_atomically

START_MARKER = "<!-- bench_quality:start -->"
END_MARKER = "<!-- bench_quality:end -->"
CSV_NAME = "quality_results.csv"
PNG_NAME = "quality.png"
#: What ``--label`` may hold: it names a section of its own and the files beside it.
LABEL = re.compile(r"[a-z0-9_]+")


def markers(label: str | None) -> tuple[str, str]:
    """The section's start and end markers: ``bench_quality``'s, or ``bench_quality/<label>``'s."""
    if label is None:
        return START_MARKER, END_MARKER
    return f"<!-- bench_quality/{label}:start -->", f"<!-- bench_quality/{label}:end -->"


def file_names(label: str | None) -> tuple[str, str]:
    """The CSV and plot names: ``quality_results.csv`` and ``quality.png``, or with ``_<label>``."""
    if label is None:
        return CSV_NAME, PNG_NAME
    return f"quality_{label}_results.csv", f"quality_{label}.png"


RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Each section below is written by the script it names; rerun it with `--write-results` to refresh it.\n"
)
EXTRA = {"gpt": "val_ppl", "digits": "val_loss"}
EXTRA_NAMES = {"gpt": "ppl", "digits": "loss"}


# ---------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check the command line; a bad value fails here, naming its argument."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few arms (smoke test)")
    parser.add_argument(
        "--size", choices=SIZES, default=None, help="task sizes (default: default; quick with --quick)"
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {list(TASKS)}")
    parser.add_argument("--arms", default=None, help="regex over arm names (re.search); dense always runs")
    parser.add_argument("--seeds", default="0", help="comma list of seeds; the table shows medians")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own; quick 1)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of the gpt task (default: its size's; 400 at the default size); digits keeps its own",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes for the arms (and INC's seeds), each with --threads torch threads",
    )
    parser.add_argument(
        "--label",
        default=None,
        help="write a section of its own (bench_quality/LABEL) and quality_LABEL_results.csv, quality_LABEL.png, "
        "leaving the default run's section and files alone",
    )
    parser.add_argument("--no-inc", action="store_true", help="skip the INC arm even if its venv exists")
    parser.add_argument("--inc-python", type=Path, default=INC_PYTHON, help="interpreter of INC's venv")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="only redraw the plot beside --output from this quality_results.csv (no training)",
    )
    add_output_arguments(parser, "bench_quality")
    args = parser.parse_args(argv)
    args.output = output_path(args, "bench_quality")
    args.size = args.size or ("quick" if args.quick else "default")
    if args.quick and args.threads is None:
        args.threads = 1
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        parser.error(f"--tasks {args.tasks!r}: unknown {unknown or 'empty'}; choose from {list(TASKS)}")
    args.tasks = list(dict.fromkeys(tasks))
    try:
        args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be a comma list of integers")
    if not args.seeds or any(s < 0 for s in args.seeds):
        parser.error(f"--seeds {args.seeds!r} must name at least one seed >= 0")
    if args.arms is not None:
        try:
            re.compile(args.arms)
        except re.error as error:
            parser.error(f"--arms {args.arms!r} is not a regular expression: {error}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps} must be >= 1")
    if args.label is not None and not LABEL.fullmatch(args.label):
        parser.error(f"--label {args.label!r} must be lower-case letters, digits and '_'")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be >= 1")
    if args.replot is not None and not args.replot.is_file():
        parser.error(f"--replot {args.replot} is not a file")
    if args.output.is_dir():
        parser.error(f"--output {args.output} is a folder; give the markdown file to update")
    return args


# ---------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's chatter off; the "layer left dense" warning is kept once per message."""
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("once", message=r".*leaves .* layer\(s\) dense.*")
        yield


def task_steps(name: str, args: argparse.Namespace) -> int | None:
    """The step budget ``--steps`` gives task ``name`` (``None``: the size's own)."""
    return args.steps if name == "gpt" else None


_TASKS: dict[tuple[str, str, int, int | None], Task] = {}


def train_one(
    name: str, size: str, steps: int | None, seed: int, arm: Arm, threads: int | None
) -> tuple[Result, float]:
    """Train one arm for one seed (in this process or a worker): its result and wall seconds."""
    if threads is not None:
        torch.set_num_threads(threads)
    key = (name, size, seed, steps)
    if key not in _TASKS:
        _TASKS.clear()  # one task at a time: the GPT corpus is a few MB
        _TASKS[key] = make_task(name, size, seed, steps)
    task = _TASKS[key]
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as root, quiet():
            result = run_arm(task, arm, seed, root)
    except Exception as error:  # kept as a failed row; main() exits non-zero after writing
        traceback.print_exc()
        result = Result(arm, seed, error=f"{type(error).__name__}: {error}")
    return result, time.perf_counter() - started


def report_one(name: str, metric: str, result: Result, seconds: float) -> None:
    """One line per finished arm."""
    arm, seed = result.arm, result.seed
    if result.error is not None:
        print(f"{name} seed {seed} {arm.name:<42} FAILED: {result.error}", flush=True)
    else:
        print(
            f"{name} seed {seed} {arm.name:<42} {metric} {result.metrics[metric]:.4f} "
            f"sparsity {result.sparsity:.3f} ({seconds:.1f} s)",
            flush=True,
        )


def run_task(
    name: str, args: argparse.Namespace, arms: list[Arm], inc_arms: list[Arm], notes: list[str]
) -> tuple[Task, list[Result]]:
    """Every arm of task ``name`` for every seed; INC's in one subprocess per seed.

    With ``--jobs`` above 1 the (seed, arm) runs go to that many worker processes (one task each
    at a time), and INC's seeds to as many subprocesses at once; results keep the serial order.
    """
    steps = task_steps(name, args)
    tasks = {seed: make_task(name, args.size, seed, steps) for seed in args.seeds}
    runs = [(seed, arm) for seed in args.seeds for arm in arms]
    results: list[Result] = []
    if args.jobs == 1:
        for seed, arm in runs:
            result, seconds = train_one(name, args.size, steps, seed, arm, None)
            report_one(name, tasks[seed].metric, result, seconds)
            results.append(result)
    else:
        with ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = [
                pool.submit(train_one, name, args.size, steps, seed, arm, args.threads or 1)
                for seed, arm in runs
            ]
            for future, (seed, _) in zip(futures, runs, strict=True):
                result, seconds = future.result()
                report_one(name, tasks[seed].metric, result, seconds)
                results.append(result)
    if inc_arms:
        with ThreadPoolExecutor(max_workers=args.jobs) as threads:
            inc_futures = [
                threads.submit(
                    run_inc, tasks[seed], args, seed, inc_arms, pruning_schedule(tasks[seed]), notes
                )
                for seed in args.seeds
            ]
            for inc_future in inc_futures:
                results += inc_future.result()
    return tasks[args.seeds[-1]], results


def run_inc(
    task: Task, args: argparse.Namespace, seed: int, arms: list[Arm], schedule: object, notes: list[str]
) -> list[Result]:
    """INC's arms for one seed in its venv; a failure is reported on every arm, with its error."""
    layers = target_layer_names(task)
    request = {
        "task": task.name,
        "size": args.size,
        "seed": seed,
        "steps": task.steps,
        "threads": args.threads,
        "layers": layers,
        "schedule": {
            "start": schedule.start_step,  # type: ignore[attr-defined]
            "end": schedule.end_step,  # type: ignore[attr-defined]
            "frequency": schedule.frequency,  # type: ignore[attr-defined]
            "curve": schedule.curve,  # type: ignore[attr-defined]
        },
        "arms": [{"criterion": a.criterion, "pattern": a.pattern, "target": a.target} for a in arms],
    }
    started = time.perf_counter()
    try:
        answer = run_inc_arms(request, args.inc_python)
    except RuntimeError as error:
        print(f"{task.name} seed {seed} INC failed: {error}", flush=True)
        return [Result(arm, seed, error=str(error)) for arm in arms]
    dense = answer["dense"]["metrics"][task.metric]
    notes.append(
        f"{task.name} seed {seed}: dense in INC's plain loop (its venv, torch {answer['versions']['torch']}) "
        f"reached {task.metric} {dense:.4f}, the check that that loop trains like the Lightning one."
    )
    results = []
    for arm, run in zip(arms, answer["arms"], strict=True):
        if run.get("error"):
            result = Result(arm, seed, error=run["error"])
            print(f"{task.name} seed {seed} {arm.name:<42} failed: {run['error'][:200]}", flush=True)
        else:
            result = Result(arm, seed, run["metrics"], run["sparsity"], run["fit_s"], run["event_steps"])
            print(
                f"{task.name} seed {seed} {arm.name:<42} {task.metric} {result.metrics[task.metric]:.4f} "
                f"sparsity {result.sparsity:.3f}",
                flush=True,
            )
        results.append(result)
    print(f"{task.name} seed {seed} INC arms took {time.perf_counter() - started:.1f} s", flush=True)
    return results


def target_layer_names(task: Task) -> list[str]:
    """Module names, relative to the task's network, of the layers every arm prunes."""
    from lightning_prune.targets import select_targets

    return [t.name for t in select_targets(task.build()).targets]


def library_line() -> str:
    """Which lightning_prune was measured: the commit, and whether its folder had local changes."""
    repo = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "lightning_prune: not a git checkout, commit unknown"
    dirty = git("status", "--porcelain", "--", "lightning_prune")
    state = "with uncommitted changes in lightning_prune/" if dirty else "clean lightning_prune/"
    return f"lightning_prune at commit {commit}, {state}"


# ---------------------------------------------------------------------------------------- writing
def replace_section(text: str | None, section: str, label: str | None = None) -> str:
    """``text`` with its bench_quality section replaced by ``section`` (appended when absent)."""
    if text is None:
        return f"{RESULTS_HEADER}\n{section}\n"
    start_marker, end_marker = markers(label)
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end > start:
        return text[:start] + section.rstrip("\n") + text[end + len(end_marker) :]
    return f"{text.rstrip()}\n\n{section.rstrip()}\n"


def update_results(path: Path, section: str, label: str | None = None) -> None:
    """Replace (or add) this script's section of ``path``, keeping everything else.

    The file is read right before the atomic write, so that another script's section written
    meanwhile is kept.
    """
    old = path.read_text(encoding="utf-8") if path.exists() else None
    write_atomically(path, replace_section(old, section, label))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    write_file_atomically(path, data)


def render_section(
    args: argparse.Namespace,
    argv: Sequence[str],
    tasks: list[Task],
    table: str,
    best: str,
    targets: list[str],
    notes: list[str],
    machine: str,
    loads: str,
    minutes: float,
    lead: str = "",
) -> str:
    """The whole delimited section for RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/bench_quality.py", *argv])
    schedule_lines = []
    for task in tasks:
        s = pruning_schedule(task)
        schedule_lines.append(
            f"- `{task.name}`: {task.description}. Pruning events after steps {s.start_step + s.frequency}, "
            f"{s.start_step + 2 * s.frequency}, ... {s.end_step} (every {s.frequency}, exp curve), "
            f"then {task.steps - s.end_step} steps at the target."
        )
    note_lines = "\n".join(f"- {n}" for n in notes)
    target_lines = "\n".join(f"- {t}" for t in targets)
    seeds = ", ".join(map(str, args.seeds))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start_marker, end_marker = markers(args.label)
    csv_name, png_name = file_names(args.label)
    return f"""{start_marker}
## Quality kept at each sparsity (`bench_quality.py`{"" if args.label is None else f", `--label {args.label}`"})

Command: `{command}` ({minutes:.1f} min)

Machine: {machine}; device {device}. Load average (1/5/15 min) at start / end: {loads}.

Date: {now}. Seeds: {seeds} (the table shows medians over seeds; every seed's row is in
`{csv_name}`). Plot: `{png_name}`.

Tasks (every arm: same initial weights, batch stream, Adam and step count):
{chr(10).join(schedule_lines)}

Arms: `dense`; Lightning's `ModelPruning("l1_unstructured", use_global_unstructured=True)` on the
same layers, driven on the same steps: the batch stream is served in epochs of one pruning interval
(a sampler that continues the stream), so its `on_train_epoch_end` falls after the same optimizer
steps as our events, and `amount(epoch)` is the share of the remaining weights that reaches our
schedule's sparsity at that event; `PruningCallback` with the default window, frequency and curve
(`progressive=True` and `regularizer="group_lasso"` variants for magnitude and snip_momentum;
`snip_momentum_decay` is `SnipMomentumCriterion(alpha=0.9, beta=1.0)`, INC's definition); INC
3.7.1's `prepare_pruning(model, WeightPruningConfig(...), optimizer)` with the same layers, targets,
global scope, per-layer bounds, start/end step, frequency and exp curve, in a plain loop (same
network, batches, Adam and steps) in its own venv. Sparsity reached counts exact zeros over the
layers every arm targets (all Linear/Conv weights but the head), so a layer a pattern cannot tile
counts as dense. Fit s is the wall time of training (Lightning loop; INC: plain loop), without
the evaluation.

{table}

Best of ours per pattern (median metric, change vs dense), next to the peers:

{best}

Issue 21 (GPT task, `1x1` at 90%): every arm per seed; ours against the best peer (`ModelPruning`
with and without rewinding, INC) of the same seed, lower is better:

{lead}

Issue 8 targets (GPT task, same step budget):
{target_lines}

Notes:
{note_lines}
{end_marker}
"""


def replot(csv_path: Path, png_path: Path) -> None:
    """Redraw ``png_path`` from the per-seed rows of a ``quality_results.csv`` (no training)."""
    import csv

    by_task: dict[str, tuple[str, list[Result]]] = {}
    with csv_path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            arm = Arm(
                row["method"], row["criterion"], row["pattern"], float(row["target_sparsity"]), row["variant"]
            )
            metrics = {k: float(row[k]) for k in ("val_loss", "val_ppl", "val_acc") if row[k]}
            result = Result(arm, int(row["seed"]), metrics, float(row["sparsity"]), float(row["fit_s"]))
            result.error = row["error"] or None
            by_task.setdefault(row["task"], (row["metric"], []))[1].append(result)
    summaries = [
        s for task, (metric, rows) in by_task.items() for s in summarize(task, metric, EXTRA[task], rows)
    ]
    better = {"val_acc": "higher", "val_loss": "lower"}
    titles = {t: f"{t}: {m} ({better.get(m, '?')} is better)" for t, (m, _) in by_task.items()}
    write_bytes_atomically(png_path, plot(summaries, png_path, titles))
    print(f"wrote {png_path} from {csv_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the CSV, the plot and this script's section of the results file.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.replot is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        replot(args.replot, args.output.parent / file_names(args.label)[1])
        return
    notes: list[str] = []
    inc_ok, inc_line = (False, "INC arm skipped: --no-inc") if args.no_inc else inc_status(args.inc_python)
    notes.append(inc_line)
    notes.append(library_line())
    print(inc_line, flush=True)
    candidates = quick_arms(inc_ok) if args.quick else all_arms(inc_ok)
    arms = select_arms(candidates, args.arms)
    lightning_arms = [a for a in arms if a.method != "inc"]
    inc_arms = [a for a in arms if a.method == "inc"]
    default_threads = torch.get_num_threads()
    loads = load_line()
    started = time.perf_counter()
    tasks: list[Task] = []
    rows: list[dict[str, object]] = []
    summaries = []
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        machine = machine_line(default_threads)
        for name in args.tasks:
            task, results = run_task(name, args, lightning_arms, inc_arms, notes)
            tasks.append(task)
            rows += result_rows(name, task.metric, results)
            summaries += summarize(name, task.metric, EXTRA[name], results)
    finally:
        torch.set_num_threads(default_threads)  # main() may run inside another process (a test)
    minutes = (time.perf_counter() - started) / 60
    loads = f"{loads} / {load_line()}"
    for task in tasks:
        notes.append(f"`{task.name}` facts: " + ", ".join(f"{k} {v}" for k, v in task.info.items()))
    table = render_table(summaries, EXTRA_NAMES)
    higher = {t.name: t.higher_is_better for t in tasks}
    best = best_per_pattern(summaries, higher)
    lead = per_seed_lead(rows)
    targets = target_checks(summaries)
    print(table, best, lead, *targets, sep="\n\n", flush=True)
    folder = args.output.parent
    folder.mkdir(parents=True, exist_ok=True)
    csv_name, png_name = file_names(args.label)
    write_atomically(folder / csv_name, render_csv(rows))
    titles = {
        t.name: f"{t.name}: {t.metric} ({'higher' if t.higher_is_better else 'lower'} is better)"
        for t in tasks
    }
    write_bytes_atomically(folder / png_name, plot(summaries, folder / png_name, titles))
    section = render_section(args, argv, tasks, table, best, targets, notes, machine, loads, minutes, lead)
    update_results(args.output, section, args.label)
    print(f"wrote {args.output}, {folder / csv_name}, {folder / png_name}", flush=True)
    failed = [f"{r['task']} {r['arm']} seed {r['seed']}" for r in rows if r["error"] and r["method"] != "inc"]
    if failed:
        raise SystemExit(f"{len(failed)} arm(s) failed (rows kept in the results): {failed}")


if __name__ == "__main__":
    main()

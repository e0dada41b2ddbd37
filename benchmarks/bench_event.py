"""Time and peak extra memory of one global pruning event, by size, pattern and score distribution.

Each size runs in a fresh subprocess. Its model is a stack of square Linear layers holding about that
many weights, with one Pruner per pattern (``1x1`` to 90%, ``4x1`` to 80%, ``channelx1`` and ``2:4``
to 50%; global magnitude, from dense masks). In every round each (pattern, distribution) pair runs
one event, in a rotated order, from fresh dense masks and the distribution's weights. Reported per
pair: the median event time; the per-round ratios (median over rounds) to the all-distinct event of
the same pattern and to the ``1x1`` event of the same distribution; the event in memory passes (the
time of one ``copy_`` of as many float32 values as there are weights, measured in the same rounds);
and the peak memory the event added, per weight.

Distributions (of the weights, so of the magnitude scores):
  distinct    the layers' initialisation (uniform, practically all distinct)
  zeros60     60% exact zeros (already-zero weights, dead taps): the 50% cuts fall inside the zeros
  zeros90     90% exact zeros (re-pruning a 90%-pruned model): the 1x1 cut at the zeros' very edge
  equal       every weight the same
  bf16x64     64 distinct magnitudes, all bf16-exact (coarse low-precision scores: ties everywhere)
  nonfinite   0.1% NaN, 0.1% +inf and 0.1% -inf weights (NaN scores are pruned first, with a warning)

    python benchmarks/bench_event.py                    # CPU: 1e6 1e7 1e8 (and 1e9 on a GPU); prints
    python benchmarks/bench_event.py --write-results    # ... and writes its section of RESULTS.md
    python benchmarks/bench_event.py --quick            # seconds, for a smoke test
    python benchmarks/bench_event.py --baseline REV --sizes 1e6 1e7   # before/after, interleaved

``--baseline REV`` also times, in the same rounds, the selection (``lightning_prune/thresholds.py``)
and the ``NMPattern`` methods of git revision ``REV`` on the same events.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from results_file import cpu_model
from results_file import write_section as write_results_section
from torch import nn

# The module through which an event calls select_groups (the Pruner goes through allocation.py).
import lightning_prune.allocation as selection_module
from lightning_prune import NMPattern, Pruner, PruningOptions, Schedule

START, END = "<!-- bench_event:start -->", "<!-- bench_event:end -->"
PATTERNS = {"1x1": 0.9, "4x1": 0.8, "channelx1": 0.5, "2:4": 0.5}
DISTRIBUTIONS = ("distinct", "zeros60", "zeros90", "equal", "bf16x64", "nonfinite")
ROOT = Path(__file__).resolve().parent.parent


def build_stack(weights: int, device: str) -> nn.Module:
    """Square Linear layers (width up to 4096) holding about ``weights`` weights, plus a small head."""
    width = min(4096, max(64, int((weights / 4) ** 0.5) // 64 * 64))
    layers = max(1, round(weights / width**2))
    blocks = [nn.Linear(width, width, bias=False) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(width, 8)).to(device)


def distribute(weights: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """``weights`` turned into distribution ``kind`` (a new tensor; deterministic for ``seed``)."""
    generator = torch.Generator(device=weights.device).manual_seed(seed)
    if kind == "distinct":
        return weights.clone()
    if kind in ("zeros60", "zeros90"):
        draw = torch.rand(weights.shape, generator=generator, device=weights.device)
        return weights.masked_fill(draw < int(kind[-2:]) / 100, 0.0)
    if kind == "equal":
        return torch.full_like(weights, 0.01)
    if kind == "bf16x64":
        scale = weights.abs().max()
        return weights.sign() * (weights.abs() / scale * 63).round() / 64  # k/64: exact in bf16
    if kind == "nonfinite":
        draw = torch.rand(weights.shape, generator=generator, device=weights.device)
        out = weights.clone()
        out[draw < 0.001] = float("nan")
        out[(draw >= 0.001) & (draw < 0.002)] = float("inf")
        out[(draw >= 0.002) & (draw < 0.003)] = float("-inf")
        return out
    raise ValueError(f"unknown distribution {kind!r}; known: {DISTRIBUTIONS}")


# ---------------------------------------------------------------------------- memory
def _statm_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_extra(device: str, into: list[int]) -> Iterator[None]:
    """Append to ``into`` the peak memory the block added above what was held before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        into.append(max(0, torch.cuda.max_memory_allocated() - before))
        return
    _trim()  # hand freed heap back, so that "before" is what is held, not what malloc keeps
    exact = _reset_peak()
    before = _statm_rss()
    yield
    into.append(max(0, _peak_rss() - before) if exact else -1)


# ---------------------------------------------------------------------------- the baseline
def load_baseline(revision: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context manager factory that swaps in ``revision``'s selection and NMPattern methods."""

    def source(path: str) -> str:
        command = ["git", "-C", str(ROOT), "show", f"{revision}:{path}"]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def module(path: str) -> types.ModuleType:
        name = f"baseline_{Path(path).stem}"
        loaded = types.ModuleType(name)
        sys.modules[name] = loaded  # dataclasses look their module up while the source runs
        exec(compile(source(path), f"{revision}:{path}", "exec"), loaded.__dict__)
        return loaded

    thresholds = module("lightning_prune/thresholds.py")
    patterns = module("lightning_prune/patterns.py")
    old_nm = patterns.NMPattern
    names = [n for n in ("group_costs", "pruned_elements", "_lowest") if n in vars(old_nm)]

    @contextlib.contextmanager
    def swapped() -> Iterator[None]:
        select, methods = selection_module.select_groups, {n: vars(NMPattern).get(n) for n in names}
        selection_module.select_groups = thresholds.select_groups
        for name in names:
            setattr(NMPattern, name, vars(old_nm)[name])
        try:
            yield
        finally:
            selection_module.select_groups = select
            for name, method in methods.items():
                if method is None:
                    delattr(NMPattern, name)
                else:
                    setattr(NMPattern, name, method)

    return swapped


# ---------------------------------------------------------------------------- one size
def run_size(
    weights: int,
    device: str,
    rounds: int,
    patterns: list[str],
    dists: list[str],
    baseline: str | None = None,
    baseline_limit: float = 30.0,
) -> dict[str, object]:
    """Every (pattern, distribution) event at one size, in this process."""
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*NaN scores.*")
    with torch.no_grad():
        model = build_stack(weights, device)
    pruners = {
        p: Pruner(
            model, Schedule(start_step=1, end_step=1), PruningOptions(target_sparsity=PATTERNS[p], pattern=p)
        )
        for p in patterns
    }
    targets = pruners[patterns[0]].targets
    with torch.no_grad():  # each distribution's weights, made once (a copy per event is cheap)
        by_dist = {d: [distribute(t.param.detach(), d, seed=1) for t in targets] for d in dists}
    count = sum(t.param.numel() for t in targets)
    swap = load_baseline(baseline) if baseline else None
    arms = ["after", "before"] if swap else ["after"]
    source = torch.empty(count, device=device)
    copy = torch.empty_like(source)
    copies: list[float] = []
    times: dict[str, list[float]] = {}
    peaks: dict[str, list[int]] = {}
    reached: dict[str, float] = {}
    slow: set[str] = set()
    failures: dict[str, str] = {}
    pairs = [(p, d, a) for p in patterns for d in dists for a in arms]
    for pattern, pruner in pruners.items():  # untimed: first calls pay for lazy set-up and page faults
        pruner.prune(PATTERNS[pattern])
    for round_ in range(rounds):
        started = time.perf_counter()
        copy.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        copies.append(time.perf_counter() - started)
        shift = round_ % len(pairs)
        for pattern, dist, arm in pairs[shift:] + pairs[:shift]:
            name = f"{pattern}|{dist}|{arm}"
            if name in slow:
                continue
            pruner = pruners[pattern]
            with torch.no_grad():
                for mask, target, weights in zip(pruner.masks, pruner.targets, by_dist[dist], strict=True):
                    mask.fill_(True)
                    target.param.copy_(weights)
            with contextlib.ExitStack() as stack:
                if arm == "before":
                    stack.enter_context(swap())  # type: ignore[misc]
                stack.enter_context(peak_extra(device, peaks.setdefault(name, [])))
                started = time.perf_counter()
                try:
                    pruner.prune(PATTERNS[pattern])
                except (RuntimeError, IndexError) as error:  # the old code could not take this input
                    if arm != "before":
                        raise
                    failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    slow.add(name)
                    continue
                if device == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
            times.setdefault(name, []).append(elapsed)
            reached[name] = pruner.sparsity
            if arm == "before" and elapsed > baseline_limit:
                slow.add(name)  # the old code can take minutes here; one round is enough
    return {
        "weights": count,
        "copy": copies,
        "times": times,
        "peaks": peaks,
        "sparsity": reached,
        "failures": failures,
    }


def summarize(size: dict[str, object], patterns: list[str], dists: list[str]) -> list[dict[str, object]]:
    """Rows for one size: medians and per-round ratios."""
    times: dict[str, list[float]] = size["times"]  # type: ignore[assignment]
    peaks: dict[str, list[int]] = size["peaks"]  # type: ignore[assignment]
    copy = statistics.median(size["copy"])  # type: ignore[arg-type]
    count: int = size["weights"]  # type: ignore[assignment]

    def ratio(a: str, b: str) -> float | None:
        if a not in times or b not in times:
            return None
        pairs = list(zip(times[a], times[b], strict=False))
        return statistics.median(x / y for x, y in pairs) if pairs else None

    rows = []
    for pattern in patterns:
        for dist in dists:
            name = f"{pattern}|{dist}|after"
            before = f"{pattern}|{dist}|before"
            seconds = statistics.median(times[name])
            row: dict[str, object] = {
                "weights": count,
                "pattern": pattern,
                "dist": dist,
                "sparsity": size["sparsity"][name],  # type: ignore[index]
                "seconds": seconds,
                "passes": seconds / copy,
                "vs_distinct": ratio(name, f"{pattern}|distinct|after"),
                "vs_1x1": ratio(name, f"1x1|{dist}|after"),
                "extra_per_weight": max(peaks[name]) / count if min(peaks[name]) >= 0 else None,
                "rounds": len(times[name]),
                "copy": copy,
            }
            if before in times:
                row["before_extra"] = max(peaks[before]) / count if min(peaks[before]) >= 0 else None
                row["before"] = statistics.median(times[before])
                row["before_rounds"] = len(times[before])
                row["speedup"] = ratio(before, name)
            if before in size["failures"]:  # type: ignore[operator]
                row["before_failed"] = size["failures"][before]  # type: ignore[index]
            rows.append(row)
    return rows


def machine() -> str:
    cpu = cpu_model()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def _fmt(value: object, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict[str, object]], baseline: bool) -> list[str]:
    head = "| weights | pattern | scores | sparsity | event s | memory passes | vs distinct | vs 1x1 | extra B/weight |"
    rule = "|---:|---|---|---:|---:|---:|---:|---:|---:|"
    if baseline:
        head += " before s | speedup | before extra B/weight |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['weights']:,} | {r['pattern']} | {r['dist']} | {r['sparsity']:.3f} | {r['seconds']:.3f} | "
            f"{r['passes']:.1f} | {_fmt(r['vs_distinct'], '.2f')} | {_fmt(r['vs_1x1'], '.2f')} | "
            f"{_fmt(r['extra_per_weight'], '.1f')} |"
        )
        if baseline and "before_failed" in r:
            line += " fails | n/a | n/a |"
        elif baseline:
            rounds = r.get("before_rounds")
            note = f" ({rounds} round{'s' * (rounds != 1)})" if rounds != r["rounds"] else ""  # type: ignore[operator]
            line += (
                f" {_fmt(r.get('before'), '.3f')}{note} | {_fmt(r.get('speedup'), '.1f')} | "
                f"{_fmt(r.get('before_extra'), '.1f')} |"
            )
        lines.append(line)
    return lines


def summary(rows: list[dict[str, object]]) -> list[str]:
    """Per size, the worst ratios and the largest memory: what the targets are about."""
    lines = []
    for weights in sorted({r["weights"] for r in rows}):  # type: ignore[type-var]
        size = [r for r in rows if r["weights"] == weights]

        def worst(key: str, size: list[dict[str, object]] = size) -> str:
            found = [r for r in size if r[key] is not None]
            if not found:
                return "n/a"
            top = max(found, key=lambda r: r[key])  # type: ignore[arg-type, return-value]
            return f"{top[key]:.2f} ({top['pattern']}, {top['dist']})"

        extras = [r["extra_per_weight"] for r in size if r["extra_per_weight"] is not None]
        one = [r for r in size if r["pattern"] == "1x1" and r["dist"] == "distinct"]
        lines.append(
            f"- {weights:,} weights: worst *vs distinct* {worst('vs_distinct')}, worst *vs 1x1* "
            f"{worst('vs_1x1')}"
            + (f", `1x1` distinct {one[0]['seconds']:.3f} s" if one else "")
            + (f", most extra memory {max(extras):.1f} B/weight" if extras else "")  # type: ignore[type-var]
            + "."
        )
    return lines


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (atomically), keeping the rest."""
    write_results_section(path, START, END, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="weights per case")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--dists", nargs="+", default=list(DISTRIBUTIONS), choices=list(DISTRIBUTIONS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument(
        "--baseline", metavar="REV", help="also time this git revision's selection and N:M code"
    )
    parser.add_argument(
        "--baseline-limit", type=float, default=30.0, help="seconds after which a baseline pair runs once"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--write-results", action="store_true", help="write the table into --output")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--size", type=float, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rounds = 1 if args.quick else args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size:
        result = run_size(
            int(args.size), device, rounds, args.patterns, args.dists, args.baseline, args.baseline_limit
        )
        print(json.dumps(result))
        return
    sizes = args.sizes or ([1e5] if args.quick else [1e6, 1e7, 1e8] + ([1e9] if device == "cuda" else []))
    load_start = os.getloadavg()
    rows = []
    for size in sizes:
        command = [sys.executable, __file__, "--size", str(size), "--rounds", str(rounds)]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["--patterns", *args.patterns, "--dists", *args.dists]
        if args.baseline:
            command += ["--baseline", args.baseline, "--baseline-limit", str(args.baseline_limit)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode:
            sys.exit(f"size {size:g} failed:\n{finished.stderr}")
        output = finished.stdout
        size_rows = summarize(json.loads(output.splitlines()[-1]), args.patterns, args.dists)
        rows += size_rows
        for line in table(size_rows, bool(args.baseline))[2:]:
            print(line, flush=True)
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    copy_note = ", ".join(
        f"{r['weights']:,}: {r['copy'] * 1e3:.1f} ms"
        for r in rows
        if r["pattern"] == args.patterns[0] and r["dist"] == args.dists[0]
    )
    lines = [
        "## One pruning event (`benchmarks/bench_event.py`)",
        "",
        f"Command: `python benchmarks/bench_event.py {shown}`".rstrip()
        + f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, {device}.",
        "",
        f"Global magnitude event from dense masks; medians over {rounds} round(s), every pair of a size in each "
        "round in a rotated order. *vs distinct* and *vs 1x1*: per-round ratios to the same pattern's "
        "all-distinct event and to the same distribution's `1x1` event (medians). *Memory passes*: event time "
        f"over one float32 `copy_` of as many values as weights, timed in the same rounds ({copy_note}). "
        f"Load average (1 min) at start / end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores (above the core count, other processes shared the CPUs). "
        "*Extra B/weight*: peak memory the event added (scores, costs, masks it builds, temporaries), "
        "largest over rounds.",
        "",
        *summary(rows),
        "",
        *table(rows, bool(args.baseline)),
    ]
    text = "\n".join(lines)
    if args.write_results:
        write_section(args.output, text)
        print(f"wrote {args.output}")
    else:
        print("\n" + text)


if __name__ == "__main__":
    main()

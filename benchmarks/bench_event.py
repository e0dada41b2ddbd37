"""Time and peak extra memory of one global pruning event, 1e5 to 1e8 weights (1e9 on a GPU).

Each case runs in a fresh subprocess so its peak memory is its own. The model is a stack of square
Linear layers holding the given number of weights; the event is a magnitude prune to 90% (``1x1``)
or 80% (``4x1``), global scope, from dense masks. Reported: median wall time over ``--repeats``
events (each from fresh masks) and the peak memory above what the model and masks already held.

    python benchmarks/bench_event.py                 # CPU: 1e5 .. 1e8
    python benchmarks/bench_event.py --quick         # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_file import cpu_model
from results_file import write_section as write_results_section
from torch import nn

from lightning_prune import Pruner, PruningOptions, Schedule

START, END = "<!-- bench_event:start -->", "<!-- bench_event:end -->"
PATTERNS = {"1x1": 0.9, "4x1": 0.8}


def build_stack(weights: int, device: str) -> nn.Module:
    """Square Linear layers (width up to 4096) holding about ``weights`` weights, plus a small head."""
    width = min(4096, max(64, int((weights / 4) ** 0.5) // 64 * 64))
    layers = max(1, round(weights / width**2))
    blocks = [nn.Linear(width, width, bias=False) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(width, 8)).to(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(weights: int, pattern: str, device: str, repeats: int) -> dict[str, float]:
    """One case, in this process: median event seconds and peak extra bytes."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_stack(weights, device)
    pruner = Pruner(
        model,
        Schedule(start_step=1, end_step=1),
        PruningOptions(target_sparsity=PATTERNS[pattern], pattern=pattern),
    )
    originals = [t.param.detach().clone() for t in pruner.targets] if repeats > 1 else []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    for repeat in range(repeats):
        if repeat:  # fresh dense masks and weights, so every event does the full work
            for mask, target, original in zip(pruner.masks, pruner.targets, originals, strict=True):
                mask.fill_(True)
                target.param.data.copy_(original)
        started = time.perf_counter()
        pruner.prune(PATTERNS[pattern])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "weights": sum(t.param.numel() for t in pruner.targets),
        "seconds": statistics.median(times),
        "peak_extra_bytes": max(0, peak),
        "sparsity": pruner.sparsity,
    }


def machine() -> str:
    cpu = cpu_model()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (atomically), keeping the rest."""
    write_results_section(path, START, END, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="weights per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        weights, pattern = args.case.split(":")
        print(json.dumps(run_case(int(float(weights)), pattern, device, args.repeats)))
        return
    sizes = args.sizes or (
        [1e5, 1e6] if args.quick else [1e5, 1e6, 1e7, 1e8] + ([1e9] if device == "cuda" else [])
    )
    repeats = 1 if args.quick else args.repeats
    rows = []
    for size in sizes:
        for pattern in PATTERNS:
            command = [sys.executable, __file__, "--case", f"{size}:{pattern}", "--repeats", str(repeats)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append((pattern, result))
            print(
                f"{result['weights']:>13,} {pattern:>4}: {result['seconds']:.3f} s, "
                f"+{result['peak_extra_bytes'] / 2**20:.0f} MiB, sparsity {result['sparsity']:.3f}"
            )
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## One pruning event (`benchmarks/bench_event.py`)",
        "",
        f"Command: `python benchmarks/bench_event.py {shown}`".rstrip()
        + f" — {time.strftime('%Y-%m-%d')}, {machine()}, {device}.",
        f"Global magnitude event from dense masks; median of {repeats} event(s); peak memory above model + masks.",
        "",
        "| weights | pattern | sparsity | event s | peak extra MiB | extra bytes / weight |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for pattern, r in rows:
        lines.append(
            f"| {r['weights']:,} | {pattern} | {r['sparsity']:.3f} | {r['seconds']:.3f} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['peak_extra_bytes'] / r['weights']:.1f} |"
        )
    write_section(args.output, "\n".join(lines))


if __name__ == "__main__":
    main()

"""Latency of dense vs exported models: slimmed FFN and CNN (CPU or GPU), 2:4 semi-structured Linear (GPU).

Slim: an FFN ``d -> h -> d`` (GELU) with 25/50/75% of its hidden units pruned (whole columns of the
second layer, as ``pattern="channelx1"`` leaves them) is run dense and after
``lightning_prune.export.slim``; a CNN ``conv -> BN -> ReLU -> conv`` likewise with half its middle
channels. 2:4 (CUDA only): ``F.linear`` with a dense weight vs the same weight pruned to 2:4 and
converted by ``lightning_prune.export.to_semi_structured``, for several ``tokens x in x out`` shapes.

Variants of a case are timed in rounds, in a shuffled order each round, so ratios compare runs made
side by side; the table gives medians over rounds and the per-round ratio range.

    python benchmarks/bench_export.py                # CPU: d=512, h=2048, 512 tokens, fp32
    python benchmarks/bench_export.py --threads 1    # on a shared machine
    python benchmarks/bench_export.py --quick        # seconds, for a smoke test

The section is printed and written to runs/benchmarks/bench_export/RESULTS.md; ``--write-results``
updates the tracked benchmarks/RESULTS.md instead.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from results_file import add_output_arguments, cpu_model, output_path
from results_file import write_section as write_results_section
from torch import nn

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.export import slim, to_semi_structured

START, END = "<!-- bench_export:start -->", "<!-- bench_export:end -->"
REMOVED = (0.25, 0.5, 0.75)
#: Reference ratios of the issue (H100, bf16, 8192 tokens).
TARGETS = {0.5: 1.99, 0.75: 4.0}


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one run."""

    dim: int
    hidden: int
    tokens: int
    dtype: torch.dtype
    cnn: tuple[int, int, int, int]  # batch, in channels, middle channels, image side
    rounds: int
    iters: int
    shapes: tuple[tuple[int, int, int], ...]  # 2:4 cases: tokens, in, out


def settings_for(device: str, quick: bool) -> Settings:
    if quick:
        return Settings(64, 256, 64, torch.float32, (2, 8, 16, 8), 2, 2, ((256, 128, 256),))
    if device == "cuda":
        shapes = ((8192, 4096, 14336), (8192, 4096, 4096), (8192, 14336, 4096), (2048, 4096, 4096), (256, 4096, 4096), (512, 1024, 1024))  # fmt: skip
        return Settings(4096, 16384, 8192, torch.bfloat16, (32, 128, 256, 56), 15, 20, shapes)
    return Settings(512, 2048, 512, torch.float32, (4, 32, 64, 32), 31, 10, ())


@dataclass
class Row:
    case: str
    variant: str
    size: str
    params: int
    times: list[float]  # ms per forward, one per round
    ratios: list[float]  # dense time / this time, per round


def forward_ms(fn: Callable[[], object], iters: int, device: str) -> float:
    """Mean milliseconds per call over ``iters`` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - started) * 1000 / iters


def interleave(
    case: str, variants: dict[str, tuple[nn.Module | Callable[[], object], str, int]], x: torch.Tensor | None,
    settings: Settings, device: str, seed: int,
) -> list[Row]:  # fmt: skip
    """Time every variant in each round, in shuffled order; the first variant is the baseline."""
    calls = {
        name: (lambda m=model: m(x)) if isinstance(model, nn.Module) else model
        for name, (model, _, _) in variants.items()
    }
    with torch.inference_mode():
        for call in calls.values():  # warm-up: allocator, kernels, caches
            forward_ms(call, max(2, settings.iters // 2), device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        shuffle = random.Random(seed)
        for _ in range(settings.rounds):
            shuffle.shuffle(order)
            for name in order:
                times[name].append(forward_ms(calls[name], settings.iters, device))
    baseline = times[next(iter(variants))]
    return [
        Row(
            case, name, size, params, times[name], [b / t for b, t in zip(baseline, times[name], strict=True)]
        )
        for name, (_, size, params) in variants.items()
    ]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def ffn_rows(settings: Settings, device: str) -> list[Row]:
    torch.manual_seed(0)
    factory = {"device": device, "dtype": settings.dtype}
    dense = nn.Sequential(
        nn.Linear(settings.dim, settings.hidden, **factory),
        nn.GELU(),
        nn.Linear(settings.hidden, settings.dim, **factory),
    ).eval()
    x = torch.randn(settings.tokens, settings.dim, **factory)
    variants: dict[str, tuple[nn.Module | Callable[[], object], str, int]] = {
        "dense": (dense, f"{settings.dim}->{settings.hidden}->{settings.dim}", count(dense))
    }
    order = dense[2].weight.float().norm(dim=0).argsort()  # lowest-norm units first, like a pruner
    for removed in REMOVED:
        pruned = copy.deepcopy(dense)
        pruned[2].weight[:, order[: int(removed * settings.hidden)]] = 0  # what channelx1 on fc2 leaves
        small = slim(pruned, (x,), round_to=8).model
        del pruned
        hidden = small[0].out_features
        variants[f"slim {removed:.0%} removed"] = (
            small,
            f"{settings.dim}->{hidden}->{settings.dim}",
            count(small),
        )
    return interleave("FFN", variants, x, settings, device, seed=1)


@torch.no_grad()
def cnn_rows(settings: Settings, device: str) -> list[Row]:
    torch.manual_seed(0)
    batch, channels, middle, side = settings.cnn
    factory = {"device": device, "dtype": settings.dtype}
    dense = nn.Sequential(
        nn.Conv2d(channels, middle, 3, padding=1, **factory),
        nn.BatchNorm2d(middle, **factory),
        nn.ReLU(),
        nn.Conv2d(middle, channels, 3, padding=1, **factory),
    ).eval()
    x = torch.randn(batch, channels, side, side, **factory)
    pruned = copy.deepcopy(dense)
    pruned[3].weight[:, : middle // 2] = 0  # channelx1 on the second conv
    small = slim(pruned, (x,), round_to=8).model
    shape = f"{batch}x{channels}x{side}x{side}, {channels}->{{}}->{channels}"
    variants: dict[str, tuple[nn.Module | Callable[[], object], str, int]] = {
        "dense": (dense, shape.format(middle), count(dense)),
        "slim 50% removed": (small, shape.format(small[0].out_channels), count(small)),
    }
    return interleave("CNN", variants, x, settings, device, seed=2)


@torch.no_grad()
def semi_structured_rows(settings: Settings, device: str) -> list[Row]:
    rows: list[Row] = []
    for tokens, in_size, out_size in settings.shapes:
        torch.manual_seed(0)
        layer = nn.Linear(in_size, out_size, bias=False, device=device, dtype=settings.dtype)
        Pruner(
            layer, Schedule(0, 0), PruningOptions(target_sparsity=0.5, pattern="2:4", skip_last_layer=False)
        ).prune(0.5)
        sparse = to_semi_structured(nn.Sequential(layer)).model[0]
        x = torch.randn(tokens, in_size, device=device, dtype=settings.dtype)
        shape = f"{tokens}x{in_size}x{out_size}"
        variants: dict[str, tuple[nn.Module | Callable[[], object], str, int]] = {
            "dense": (lambda w=layer.weight, x=x: F.linear(x, w), shape, layer.weight.numel()),
            "2:4": (lambda w=sparse.weight, x=x: F.linear(x, w), shape, layer.weight.numel() // 2),
        }
        rows.extend(interleave("Linear 2:4", variants, None, settings, device, seed=3))
    return rows


def machine(device: str) -> str:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; GPU: {gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (atomically), keeping the rest."""
    write_results_section(path, START, END, text)


def table(rows: list[Row], baseline_per_size: bool) -> list[str]:
    lines = [
        "| case | variant | size | params | median ms | speedup (of medians) | median per-round speedup | per-round range |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    baseline: dict[str, float] = {}
    for row in rows:
        median = statistics.median(row.times)
        key = f"{row.case}:{row.size}" if baseline_per_size else row.case
        baseline.setdefault(key, median)
        lines.append(
            f"| {row.case} | {row.variant} | {row.size} | {row.params:,} | {median:.3f} | "
            f"{baseline[key] / median:.2f}x | {statistics.median(row.ratios):.2f}x | "
            f"{min(row.ratios):.2f}-{max(row.ratios):.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke test")
    add_output_arguments(parser, "bench_export")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    settings = settings_for(device, args.quick)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds={args.rounds} must be >= 1")
        settings = Settings(**{**vars(settings), "rounds": args.rounds})
    started = time.time()
    slim_rows = ffn_rows(settings, device) + cnn_rows(settings, device)
    sparse_rows: list[Row] = []
    sparse_note = (
        "not measured here (no GPU): 2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0+."
    )
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 0) and settings.shapes:
        sparse_rows = semi_structured_rows(settings, device)
    elif device == "cuda":
        sparse_note = f"not measured: {torch.cuda.get_device_name()} is older than compute capability 8.0."
    elapsed = time.time() - started
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    dtype = str(settings.dtype).removeprefix("torch.")
    lines = [
        "## Exported models: slim and 2:4 (`benchmarks/bench_export.py`)",
        "",
        f"Command: `python benchmarks/bench_export.py {shown}`".rstrip()
        + f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s.",
        "",
        f"Machine: {machine(device)}; device {device}, {dtype}. Load average at end: "
        + "/".join(f"{v:.2f}" for v in os.getloadavg())
        + (
            " (above the core count: other processes shared the CPU)."
            if os.getloadavg()[0] > (os.cpu_count() or 1)
            else "."
        ),
        "",
        f"Forward passes under `torch.inference_mode()`; {settings.rounds} rounds, each variant of a case timed "
        f"for {settings.iters} forwards per round in a shuffled order. Speedup = dense time / variant time: "
        "of the medians over rounds, and per round (median, min-max). Slimmed with `slim(..., round_to=8)` "
        "after zeroing the lowest-norm hidden units' columns in the second layer.",
        "",
        f"Slim (FFN: {settings.tokens} tokens; CNN: batch x channels x side, middle channels):",
        "",
        *table(slim_rows, baseline_per_size=False),
        "",
    ]
    if device == "cpu":
        lines.append(
            "GPU rows (FFN 4096->16384->4096 in bf16 with 8192 tokens; 2:4 Linear shapes) are not measured "
            "here (no GPU). Issue reference on an H100: half the hidden units kept 1.99x, a quarter kept "
            "4.0x; 2:4 on 8192x4096x14336 1.36x, slower than dense on small shapes."
        )
    else:
        lines.append(
            "Issue reference on an H100 (bf16, 8192 tokens): half kept 1.99x, a quarter kept 4.0x; 2:4 on "
            "8192x4096x14336 1.36x. Targets: slim within 10% of those."
        )
    lines.append("")
    if sparse_rows:
        lines += ["2:4 semi-structured Linear (size = tokens x in x out; `F.linear`, no bias):", ""]
        lines += table(sparse_rows, baseline_per_size=True)
    else:
        lines.append(f"2:4 semi-structured: {sparse_note}")
    output = output_path(args, "bench_export")
    write_section(output, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

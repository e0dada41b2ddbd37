"""Heads and FFN units: speed after slim on a Llama-style model, and quality against Torch-Pruning.

Speed: a Hugging Face Llama built from config (8 layers, d 512, 8 query heads over 4 key/value heads
of 64, FFN 1408, random init) is pruned one-shot with ``pattern="head+ffn", scope="local"`` to 25% and
50% (a quarter/half of each layer's key/value groups with their query heads, and of its FFN units),
then ``slim``-med. Dense and slim models are timed in interleaved rounds (shuffled order per round):
prefill tokens/s (one forward of a 512-token sequence) and decode tokens/s (``generate`` with the KV
cache, 32 new tokens after a 16-token prompt, greedy).

Quality: the GPT task of ``bench_quality.py`` (``benchmarks/quality/tasks.py``: byte-level GPT on the
stdlib's source, same model, batches, Adam and steps), pruned during training to 25% and 50% of its
heads and FFN units in every block, by ours (``pattern="head+ffn"``, local scope, magnitude, the
callback's default window and exp curve) and by Torch-Pruning's ``MetaPruner`` with
``GroupMagnitudeImportance`` (p=2), ``prune_num_heads=True``, ``prune_head_dims=False``, pruning at
the same steps to the same per-event ratios. Validation loss on held-out files, lower is better;
seeds 0, 1 and 2 (initialisation and batch order).

    python benchmarks/bench_structures.py --threads 1     # about 5 minutes on 2 CPU cores
    python benchmarks/bench_structures.py --quick         # seconds, for a smoke test

The section is printed and written to runs/benchmarks/bench_structures/RESULTS.md;
``--write-results`` updates the tracked benchmarks/RESULTS.md instead.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_file import add_output_arguments, cpu_model, output_path
from results_file import write_section as write_results_section
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality.tasks import CausalSelfAttention, GptTask

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.couplings import heads, register_coupling
from lightning_prune.export import slim
from lightning_prune.schedules import resolve_schedule

START, END = "<!-- bench_structures:start -->", "<!-- bench_structures:end -->"
LEVELS = (0.25, 0.5)


@dataclass(frozen=True)
class Sizes:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prefill: int
    prompt: int
    new_tokens: int
    rounds: int
    gpt: str


FULL = Sizes(8, 512, 8, 4, 1408, 4096, 512, 16, 32, 7, "default")
QUICK = Sizes(2, 64, 4, 4, 128, 256, 32, 4, 4, 2, "quick")


# ---------------------------------------------------------------------------------------- speed
def llama(sizes: Sizes) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=sizes.layers,
        hidden_size=sizes.hidden,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.hidden // sizes.heads,
        intermediate_size=sizes.intermediate,
        vocab_size=sizes.vocab,
        max_position_embeddings=2 * sizes.prefill,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def speed(sizes: Sizes) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    dense = llama(sizes)
    ids = torch.randint(0, sizes.vocab, (1, sizes.prefill), generator=torch.Generator().manual_seed(0))
    models: dict[str, nn.Module] = {"dense": dense}
    shapes = {"dense": describe(dense)}
    for level in LEVELS:
        model = copy.deepcopy(dense)
        options = PruningOptions(target_sparsity=level, pattern="head+ffn", scope="local")
        Pruner(model, Schedule(0, 0), options).prune(level)
        name = f"{level:.0%} removed"
        models[name] = slim(model, (ids[:, :32],)).model.eval()
        shapes[name] = describe(models[name])
    prompt = ids[:, : sizes.prompt]

    def prefill(model: nn.Module) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            model(ids, use_cache=False)
            return sizes.prefill / (time.perf_counter() - started)

        return run

    def decode(model: nn.Module) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            out = model.generate(
                prompt, max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
            assert out.shape[1] == sizes.prompt + sizes.new_tokens
            return sizes.new_tokens / (time.perf_counter() - started)

        return run

    timings: dict[str, dict[str, list[float]]] = {}
    for what, make in (("prefill", prefill), ("decode", decode)):
        runs = {name: make(model) for name, model in models.items()}
        for run in runs.values():
            run()  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        shuffle = random.Random(0)
        for _ in range(sizes.rounds):
            shuffle.shuffle(order)
            for name in order:
                rates[name].append(runs[name]())
        timings[what] = rates
    lines = [
        "| model | layers (q heads / kv heads / FFN per layer) | params | prefill tok/s | of dense | decode tok/s | of dense | decode per-round ratio range |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model in models.items():
        pre, dec = timings["prefill"][name], timings["decode"][name]
        base_pre, base_dec = timings["prefill"]["dense"], timings["decode"]["dense"]
        ratios = [d / b for d, b in zip(dec, base_dec, strict=True)]
        lines.append(
            f"| {name} | {shapes[name]} | {count(model):,} | {statistics.median(pre):,.0f} | "
            f"{statistics.median(pre) / statistics.median(base_pre):.2f}x | {statistics.median(dec):,.1f} | "
            f"{statistics.median(dec) / statistics.median(base_dec):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |"
        )
    return lines, timings


def describe(model: nn.Module) -> str:
    layer = model.model.layers[0]
    attn = layer.self_attn
    q, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
    return f"{len(model.model.layers)} x ({q} / {kv} / {layer.mlp.down_proj.in_features})"


# ---------------------------------------------------------------------------------------- quality
class HeadDimAttention(CausalSelfAttention):
    """The task's attention, splitting heads by ``head_dim`` (same weights, same math), so that a
    model with heads removed (Torch-Pruning's, or ours after slim) still runs."""

    head_dim: int

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, seq, -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.out(out.transpose(1, 2).reshape(batch, seq, -1))


@register_coupling("HeadDimAttention")
def _task_attention(module: nn.Module) -> list[Any]:
    # The task's own attention (q, k, v, out): a coupling of our own in one line.
    assert isinstance(module, HeadDimAttention)
    return [heads(module.q, module.k, module.v, module.out, head_dim=module.head_dim)]


def build(task: GptTask, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = task.build()
    for module in net.modules():
        if isinstance(module, CausalSelfAttention):
            module.__class__ = HeadDimAttention
            module.head_dim = module.q.out_features // module.heads
    return net


def train(
    task: GptTask,
    net: nn.Module,
    after_step: Callable[[int], bool] | None = None,
    on_optimizer: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> dict[str, float]:
    """The task's run: its batches, Adam and steps. ``after_step(step)`` returning True means the
    parameters were replaced (Torch-Pruning): a fresh Adam is made over them."""
    optimizer = task.optimizer(net)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    for step in range(task.steps):
        task.loss(net, task.batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None and after_step(step + 1):
            optimizer = task.optimizer(net)
    net.eval()
    return task.evaluate(net)


def widths(net: nn.Module) -> str:
    shown = []
    for block in net.blocks:
        shown.append(f"{block.attn.q.out_features // block.attn.head_dim}h/{block.fc1.out_features}")
    return ", ".join(shown)


def ours(task: GptTask, level: float, schedule: Schedule, seed: int) -> tuple[float, str, int]:
    net = build(task, seed)
    pruner = Pruner(net, schedule, PruningOptions(target_sparsity=level, pattern="head+ffn", scope="local"))
    metrics = train(task, net, on_optimizer=pruner.attach)  # the Pruner counts steps, prunes on schedule
    pruner.detach()
    small = slim(net, (task.batch(0)[0][:2],)).model  # what the pruned heads and units leave
    return metrics["val_loss"], widths(small), count(small)


def torch_pruning(task: GptTask, level: float, schedule: Schedule, seed: int) -> tuple[float, str, int] | str:
    try:
        import torch_pruning as tp
    except ImportError as error:
        return f"not run: {error} (pip install --no-deps torch-pruning)"
    net = build(task, seed)
    example = task.batch(0)[0][:2]
    events = schedule.event_steps()
    ratios = [schedule.sparsity_at(step, level) for step in events]
    num_heads = {}
    for block in net.blocks:
        for layer in (block.attn.q, block.attn.k, block.attn.v):
            num_heads[layer] = block.attn.heads
    # The residual stream stays: the layers writing to it are ignored (their output channels).
    ignored = [net.head, *(b.attn.out for b in net.blocks), *(b.fc2 for b in net.blocks)]
    # MetaPruner asks its scheduler for channel ratios, then for head ratios. Channels: our per-event
    # targets. Heads: with local pruning it removes ceil(ratio * heads left) at every step, which over
    # our ~20 events empties a layer and divides by zero; so each event gets the ratio of the heads
    # left that makes its count ours (round(target * heads), as our local scope counts).
    first = net.blocks[0].attn.heads
    removed = [0] + [round(r * first) for r in ratios]
    head_ratios = [0.0] + [
        (now - before - 0.5) / (first - before) if now > before else 0.0
        for before, now in itertools.pairwise(removed)
    ]
    answers = iter(([0.0, *ratios], head_ratios))
    pruner = tp.pruner.MetaPruner(
        net, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=level,
        iterative_steps=len(events), iterative_pruning_ratio_scheduler=lambda ratio, steps: next(answers),
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=level, global_pruning=False,
    )  # fmt: skip
    due = set(events)

    def after_step(step: int) -> bool:
        if step not in due:
            return False
        pruner.step()
        return True

    metrics = train(task, net, after_step)
    return metrics["val_loss"], widths(net), count(net)


def quality(sizes: Sizes, seeds: list[int]) -> list[str]:
    """Validation loss per seed (batch order and initialisation), and the change vs dense of each."""
    methods = (
        ("ours: head+ffn, local, magnitude", ours),
        ("Torch-Pruning MetaPruner, group magnitude", torch_pruning),
    )
    dense_losses: list[float] = []
    rows: dict[tuple[float, str], list[tuple[float, str, int] | str]] = {}
    for seed in seeds:
        task = GptTask(seed, sizes.gpt)
        schedule = resolve_schedule(None, None, None, "exp", task.steps)
        dense = build(task, seed)
        dense_losses.append(train(task, dense)["val_loss"])
        for level in LEVELS:
            for method, run in methods:
                rows.setdefault((level, method), []).append(run(task, level, schedule, seed))
    shown = ", ".join(map(str, seeds))
    lines = [
        f"Task: {task.description}. Schedule: events at steps {schedule.start_step}-{schedule.end_step} every "
        f"{schedule.frequency} ({len(schedule.event_steps())} events, exp curve), the callback's default window. "
        f"Seeds {shown} (initialisation and batch order).",
        "",
        f"Dense: val loss {', '.join(f'{v:.4f}' for v in dense_losses)} (seeds {shown}), {count(dense):,} "
        f"parameters, {widths(dense)} (heads/FFN units per block).",
        "",
        f"| removed (heads and FFN units, every block) | method | val loss (seeds {shown}) | change vs dense | "
        "median change | kept per block (heads/units) | params |",
        "|---|---|---|---|---:|---|---:|",
    ]
    for (level, method), results in rows.items():
        failed = [r for r in results if isinstance(r, str)]
        if failed:
            lines.append(f"| {level:.0%} | {method} | {failed[0]} | | | | |")
            continue
        runs = [r for r in results if not isinstance(r, str)]
        changes = [(loss - d) / d for (loss, _, _), d in zip(runs, dense_losses, strict=True)]
        lines.append(
            f"| {level:.0%} | {method} | {', '.join(f'{loss:.4f}' for loss, _, _ in runs)} | "
            f"{', '.join(f'{c:+.2%}' for c in changes)} | {statistics.median(changes):+.2%} | {runs[0][1]} | "
            f"{runs[0][2]:,} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="override the number of timing rounds")
    parser.add_argument("--parts", default="speed,quality", help="comma-separated: speed, quality")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds of the quality part (default 0,1,2; --quick: 0)"
    )
    add_output_arguments(parser, "bench_structures")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds={args.rounds} must be >= 1")
        sizes = Sizes(**{**vars(sizes), "rounds": args.rounds})
    parts = set(args.parts.split(","))
    if not parts <= {"speed", "quality"}:
        parser.error(f"--parts={args.parts!r}: each must be 'speed' or 'quality'")
    started = time.time()
    load_start = os.getloadavg()
    speed_lines = speed(sizes)[0] if "speed" in parts else ["(not run: --parts)"]
    try:
        seeds = [int(seed) for seed in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r} must be comma-separated integers")
    quality_lines = quality(sizes, seeds) if "quality" in parts else ["(not run: --parts)"]
    elapsed = time.time() - started
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    load_end = os.getloadavg()
    lines = [
        "## Heads and FFN units: slim speed and quality against Torch-Pruning (`benchmarks/bench_structures.py`)",
        "",
        f"Command: `python benchmarks/bench_structures.py {shown}`".rstrip()
        + f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, Python {platform.python_version()}. Load average at start "
        + "/".join(f"{v:.2f}" for v in load_start)
        + ", at end "
        + "/".join(f"{v:.2f}" for v in load_end)
        + ".",
        "",
        f"Speed: Llama-style model ({sizes.layers} layers, d {sizes.hidden}, {sizes.heads} query heads over "
        f"{sizes.kv_heads} key/value heads, FFN {sizes.intermediate}, vocab {sizes.vocab}, fp32, random init), "
        f"pruned one-shot with `pattern='head+ffn', scope='local'` and slimmed; medians of {sizes.rounds} "
        f"interleaved rounds. Prefill: one forward of {sizes.prefill} tokens; decode: `generate` of "
        f"{sizes.new_tokens} tokens after a {sizes.prompt}-token prompt with the KV cache.",
        "",
        *speed_lines,
        "",
        "Quality:",
        "",
        *quality_lines,
    ]
    output = output_path(args, "bench_structures")
    write_results_section(output, START, END, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

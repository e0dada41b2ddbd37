"""Training-step time between pruning events: ``PruningCallback`` against ``ModelPruning`` and none.

Every arm trains a fresh LightningModule from the same initial weights on the same synthetic data.
The first ``--warmup`` steps of each fit form epoch 0: they are not timed, and the pruning arms prune
inside them (ours one-shot at step 0 or 1, Lightning's ``ModelPruning`` at the end of epoch 0), so
every timed step is a step *between events* with the masks in force. Arms are interleaved: each
round runs every arm of every model for ``--steps`` timed steps, in a shuffled order, so machine
noise hits all arms alike. The results section is printed and written to
``runs/benchmarks/bench_overhead/RESULTS.md``; ``--write-results`` updates the tracked
``benchmarks/RESULTS.md`` instead (its own delimited section only).

Run ``python benchmarks/bench_overhead.py`` (defaults: about 4 minutes on 2 CPU cores) or
``--quick`` for a few-second smoke run. On a CUDA machine every model runs on the GPU and a
GPT-style block stack (bf16 autocast) is added; on CPU that model is skipped with a note.

``torch.set_num_threads`` is left at its default unless ``--threads`` is given; the results report
it. On a small machine that other processes keep busy, pass ``--threads 1``: with an intra-op pool
as large as the core count, each parallel kernel waits at its barrier for a thread the scheduler has
preempted, and step times then measure scheduling rather than compute (on 2 busy cores a 256x256
matmul took 16 ms with 2 threads against 0.35 ms with 1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from results_file import add_output_arguments, cpu_model, output_path
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune.pruner as pruner_module
from lightning_prune import PruningCallback
from lightning_prune.demo import build_network
from lightning_prune.files import write_atomically as write_file_atomically
from lightning_prune.targets import select_targets

START_MARKER = "<!-- bench_overhead:start -->"
END_MARKER = "<!-- bench_overhead:end -->"
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Each section below is written by the script it names; rerun it with `--write-results` to refresh it.\n"
)
ARMS = ("none", "ours", "ours_float_mask", "modelpruning", "ours_snip_momentum")
TARGET_SPARSITY = 0.9
SNIP_EVENT_STEP = 1  # the gradient criterion prunes after one scored step, before timing starts
QUICK_MODELS = ("mlp", "cnn")  # the wide MLP's one-shot events alone take seconds on a small CPU


# ---------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked network and its synthetic data.

    Args:
        name: key used on the command line and in the table.
        description: one line for the results.
        build: makes the network (called under a fixed seed).
        make_data: ``(samples, generator) -> (inputs, targets)``.
        batch_size: samples per step.
        precision: Lightning ``precision`` (``"bf16-mixed"`` is bf16 autocast).
        gpu_only: skipped, with a note, when CUDA is not available.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    make_data: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    batch_size: int
    precision: str = "32-true"
    gpu_only: bool = False


class Block(nn.Module):
    """A pre-norm GPT block: causal self-attention and a GELU FFN, all projections ``nn.Linear``.

    Args:
        d_model: width of the residual stream.
        heads: attention heads (``d_model`` must divide evenly).
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, seq, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPTStack(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks, final norm and a linear LM head.

    Args:
        vocab: vocabulary size.
        d_model: width of the residual stream.
        heads: attention heads per block.
        layers: number of blocks.
    """

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(tokens))))


def wide_mlp() -> nn.Module:
    """A 1024 -> 2048 -> 2048 -> 10 MLP, large enough that a CPU step is not all Python overhead."""
    return nn.Sequential(
        nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )


def image_data(
    shape: tuple[int, ...], classes: int
) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    """Random inputs of ``shape`` per sample with random class labels."""

    def make(samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(samples, *shape, generator=generator)
        return x, torch.randint(0, classes, (samples,), generator=generator)

    return make


def token_data(seq: int, vocab: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    """Random token sequences with random next-token targets."""

    def make(samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(0, vocab, (samples, seq + 1), generator=generator)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return make


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mlp",
            "digits MLP 64->256->256->10 (`build_network('mlp')`), batch 64",
            lambda: build_network("mlp"),
            image_data((1, 8, 8), 10),
            batch_size=64,
        ),
        ModelSpec(
            "mlp_wide",
            "MLP 1024->2048->2048->10, batch 128",
            wide_mlp,
            image_data((1024,), 10),
            batch_size=128,
        ),
        ModelSpec(
            "cnn",
            "digits CNN conv32-conv64-fc128-fc10 (`build_network('cnn')`), 1x8x8 inputs, batch 64",
            lambda: build_network("cnn"),
            image_data((1, 8, 8), 10),
            batch_size=64,
        ),
        ModelSpec(
            "gpt",
            "GPT-style stack: 4 pre-norm blocks, d_model 1024, 16 heads, seq 512, vocab 8192, "
            "batch 8, bf16 autocast",
            lambda: GPTStack(vocab=8192, d_model=1024, heads=16, layers=4),
            token_data(seq=512, vocab=8192),
            batch_size=8,
            precision="bf16-mixed",
            gpu_only=True,
        ),
    )
}


class BenchModule(pl.LightningModule):
    """Cross-entropy on ``net``'s output with Adam; logs nothing, so the step is all training.

    Args:
        net: the network.
        lr: Adam learning rate.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------------------- timing
class StepTimer(Callback):
    """Records the wall time of each training step after the first ``skip`` ones.

    A step runs from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, the
    optimizer step and every callback hook in between. Put this callback last so that its
    ``on_train_batch_end`` runs after the other callbacks'. On CUDA it synchronizes at both ends.

    Args:
        skip: leading steps (the warm-up) not recorded.
        sync_cuda: call ``torch.cuda.synchronize()`` before reading the clock.
    """

    def __init__(self, skip: int, sync_cuda: bool) -> None:
        super().__init__()
        self.skip = skip
        self.sync_cuda = sync_cuda
        self.times: list[float] = []
        self._start = 0.0

    def _now(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = self._now()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = self._now() - self._start
        if trainer.global_step > self.skip:  # global_step already counts this step
            self.times.append(elapsed)


def prune_only_first_epoch(epoch: int) -> bool:
    """``ModelPruning(apply_pruning=...)``: prune at the end of epoch 0 only, then keep the masks."""
    return epoch == 0


def arm_callbacks(arm: str, module: BenchModule) -> list[Callback]:
    """The pruning callbacks of ``arm`` for ``module`` (``[]`` for ``none``).

    ``ModelPruning`` gets exactly the weights our callback targets (Linear/Conv weights but the
    head), pruned globally by L1 magnitude, and keeps its forward pre-hooks as it does in training.
    """
    if arm == "none":
        return []
    if arm in ("ours", "ours_float_mask"):
        return [
            PruningCallback(  # no report: a benchmark's fits write nothing where it runs
                target_sparsity=TARGET_SPARSITY,
                pattern="1x1",
                start_step=0,
                end_step=0,
                verbose=False,
                save_report=False,
            )
        ]
    if arm == "ours_snip_momentum":
        return [
            PruningCallback(
                target_sparsity=TARGET_SPARSITY,
                pattern="1x1",
                criterion="snip_momentum",
                save_report=False,
                start_step=SNIP_EVENT_STEP,
                end_step=SNIP_EVENT_STEP,
                verbose=False,
            )
        ]
    if arm == "modelpruning":
        targets = select_targets(module).targets
        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=[(t.module, t.param_name) for t in targets],
                amount=TARGET_SPARSITY,
                apply_pruning=prune_only_first_epoch,
                use_global_unstructured=True,
                make_pruning_permanent=False,
                use_lottery_ticket_hypothesis=False,
            )
        ]
    raise ValueError(f"unknown arm {arm!r}; known: {list(ARMS)}")


@contextlib.contextmanager
def float_masking(enabled: bool) -> Iterator[None]:
    """The per-step masking of lightning_prune 0.1, for a side-by-side cost: CPU masks kept as float
    copies and a float multiply (which leaves ``NaN * 0 = NaN`` in a pruned weight), instead of the
    integer multiply of the weights' bits that gives exact zeros."""
    if not enabled:
        yield
        return

    def float_step_mask(param: Tensor, mask: Tensor) -> Tensor:
        return mask if param.device.type != "cpu" else torch.ones_like(param).copy_(mask)

    @torch.no_grad()
    def float_multiply(params: list[Tensor], masks: list[Tensor]) -> None:
        if params:
            torch._foreach_mul_(params, masks)

    saved = pruner_module.step_mask, pruner_module.zero_pruned
    pruner_module.step_mask, pruner_module.zero_pruned = float_step_mask, float_multiply
    try:
        yield
    finally:
        pruner_module.step_mask, pruner_module.zero_pruned = saved


def run_arm(
    spec: ModelSpec, arm: str, data: TensorDataset, warmup: int, steps: int, seed: int
) -> list[float]:
    """Train a fresh module for ``warmup + steps`` steps under ``arm``; the timed step seconds.

    The data loader yields ``warmup`` batches per epoch, so epoch 0 is the warm-up.
    """
    torch.manual_seed(seed)
    module = BenchModule(spec.build())
    layers = [t.module for t in select_targets(module).targets]  # before ModelPruning renames the weights
    cuda = torch.cuda.is_available()
    timer = StepTimer(skip=warmup, sync_cuda=cuda)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=spec.precision,  # type: ignore[arg-type]
        max_steps=warmup + steps,
        callbacks=[*arm_callbacks(arm, module), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(data, batch_size=spec.batch_size, shuffle=False)
    with float_masking(arm == "ours_float_mask"):
        trainer.fit(module, train_dataloaders=loader)
    if len(timer.times) != steps:
        raise RuntimeError(f"{spec.name}/{arm}: timed {len(timer.times)} steps, expected {steps}")
    check_sparsity(f"{spec.name}/{arm}", layers, expected=0.0 if arm == "none" else TARGET_SPARSITY)
    return timer.times


def check_sparsity(label: str, layers: Sequence[nn.Module], expected: float) -> None:
    """Raise unless the targeted weights ended at ``expected`` sparsity (masks were in force).

    ``ModelPruning``'s layers are read through their ``weight_mask`` buffer, ours through the weights.
    """
    zeros = total = 0
    for layer in layers:
        mask = getattr(layer, "weight_mask", None)
        kept = mask != 0 if mask is not None else layer.weight != 0
        zeros += int((~kept).sum())
        total += kept.numel()
    if abs(zeros / total - expected) > 0.01:
        raise RuntimeError(f"{label}: sparsity {zeros / total:.3f} after training, expected {expected}")


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class Measurements:
    """Step times per ``(model, arm)``, one list per round."""

    rounds: dict[tuple[str, str], list[list[float]]] = field(default_factory=dict)

    def add(self, model: str, arm: str, times: list[float]) -> None:
        self.rounds.setdefault((model, arm), []).append(times)

    def all_times(self, model: str, arm: str) -> list[float]:
        return [t for times in self.rounds[(model, arm)] for t in times]

    def median(self, model: str, arm: str) -> float:
        return statistics.median(self.all_times(model, arm))

    def round_ratios(self, model: str, arm: str) -> list[float]:
        """Per round, the arm's median step time over ``none``'s in the same round."""
        pairs = zip(self.rounds[(model, arm)], self.rounds[(model, "none")], strict=True)
        return [statistics.median(a) / statistics.median(b) for a, b in pairs]


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    model: str
    arm: str
    median_ms: float
    ratio: float
    round_ratio: float
    round_min: float
    round_max: float


def summarize(measurements: Measurements, models: Sequence[str]) -> list[Row]:
    """Table rows: median step time, ratio of medians to ``none`` and per-round ratio statistics."""
    rows = []
    for model in models:
        base = measurements.median(model, "none")
        for arm in ARMS:
            ratios = measurements.round_ratios(model, arm)
            median = measurements.median(model, arm)
            rows.append(
                Row(
                    model,
                    arm,
                    1e3 * median,
                    median / base,
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                )
            )
    return rows


# ---------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer info lines and its small-data warnings, restoring them after."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


def runnable_models(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``names`` into the models to run here and notes on those skipped."""
    cuda = torch.cuda.is_available()
    run, notes = [], []
    for name in names:
        if MODELS[name].gpu_only and not cuda:
            notes.append(f"`{name}` skipped: it needs a CUDA GPU and `torch.cuda.is_available()` is False.")
        else:
            run.append(name)
    return run, notes


def run_rounds(models: Sequence[str], rounds: int, warmup: int, steps: int, seed: int) -> Measurements:
    """Run every arm of every model once per round, arm order shuffled per round and model."""
    datasets = {}
    for name in models:
        spec = MODELS[name]
        inputs, targets = spec.make_data(warmup * spec.batch_size, torch.Generator().manual_seed(seed))
        datasets[name] = TensorDataset(inputs, targets)
    order_rng = random.Random(seed)
    measurements = Measurements()
    for index in range(rounds):
        for name in models:
            order = list(ARMS)
            order_rng.shuffle(order)
            for arm in order:
                measurements.add(name, arm, run_arm(MODELS[name], arm, datasets[name], warmup, steps, seed))
            medians = "  ".join(
                f"{a} {1e3 * statistics.median(measurements.rounds[(name, a)][-1]):.2f}ms" for a in ARMS
            )
            print(f"round {index + 1}/{rounds} {name}: {medians}", flush=True)
    return measurements


# ---------------------------------------------------------------------------------------- reporting


def machine_line(default_threads: int) -> str:
    """CPU, cores, threads, torch/lightning versions and the GPU, in one line.

    Args:
        default_threads: torch's intra-op thread count before ``--threads`` changed it.
    """
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    threads = torch.get_num_threads()
    if threads == default_threads:
        threads_text = f"torch threads {threads} (torch's default)"
    else:
        threads_text = (
            f"torch threads {threads} (set for this run; torch's default here is {default_threads})"
        )
    return (
        f"{cpu_model()}, {os.cpu_count()} logical cores, {threads_text}; "
        f"torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}; "
        f"GPU: {gpu}"
    )


def load_line() -> str:
    """The 1/5/15-minute load averages, to judge whether other work shared the machine."""
    with contextlib.suppress(OSError, AttributeError):
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    return "n/a"


def render_table(rows: Sequence[Row]) -> str:
    """The markdown results table."""
    lines = [
        "| model | arm | median step ms | ratio to none (of medians) | median per-round ratio | per-round range |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.arm} | {r.median_ms:.3f} | {r.ratio:.3f} | {r.round_ratio:.3f} "
            f"| {r.round_min:.3f}-{r.round_max:.3f} |"
        )
    return "\n".join(lines)


def render_section(
    command: str,
    settings: str,
    models: Sequence[str],
    rows: Sequence[Row],
    notes: Sequence[str],
    machine: str,
    loads: str,
) -> str:
    """The whole delimited section for RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model_lines = "\n".join(
        f"- `{name}`: {MODELS[name].description} ({'cuda' if torch.cuda.is_available() else 'cpu'})"
        for name in models
    )
    note_lines = "".join(f"\n- {note}" for note in notes)
    return f"""{START_MARKER}
## Step time between pruning events (`bench_overhead.py`)

Command: `{command}`

Machine: {machine}. Load average (1/5/15 min) at start / end: {loads}; a load above the core count
means other processes shared the CPU, and their noise shows in the per-round range.

Date: {now}. {settings}

Models:
{model_lines}

Arms (fresh module per fit, same seed, same synthetic data, Adam, every timed step between events):
- `none`: no pruning callback.
- `ours`: `PruningCallback(target_sparsity=0.9, pattern="1x1", start_step=0, end_step=0)`, one-shot
  before the first step; masks re-applied after each optimizer step with one `torch._foreach_mul_` of
  the weights' bits (as integers of their width) by 0/1 masks: exact zeros, also over NaN.
- `ours_float_mask`: as `ours` with the per-step masking of lightning_prune 0.1 (float mask copies on
  CPU, a float multiply that leaves NaN in a pruned weight), to price the exact-zero integer multiply.
- `modelpruning`: Lightning's `ModelPruning("l1_unstructured", amount=0.9, use_global_unstructured=True,
  apply_pruning=epoch == 0, make_pruning_permanent=False, use_lottery_ticket_hypothesis=False)` on the
  same weights as ours (Linear/Conv weights but the head); prunes at the end of epoch 0 (the warm-up),
  then keeps its forward pre-hooks (`weight = weight_orig * mask` every forward).
- `ours_snip_momentum`: as `ours` with `criterion="snip_momentum"`, one-shot at step {SNIP_EVENT_STEP};
  after that last event it scores nothing (no event would use the scores).

{render_table(rows)}

Step time is `on_train_batch_start` to `on_train_batch_end` (forward, backward, optimizer step, hooks).
Ratio to none is the ratio of the medians over all rounds; the per-round ratio compares each arm with
`none` in the same round (median over rounds, then min-max).{note_lines}
{END_MARKER}
"""


def replace_section(text: str | None, section: str) -> str:
    """``text`` with its bench_overhead section replaced by ``section`` (appended when absent)."""
    if text is None:
        return f"{RESULTS_HEADER}\n{section}"
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start != -1 and end > start:
        after = text[end + len(END_MARKER) :]
        return text[:start] + section.rstrip("\n") + after
    return f"{text.rstrip()}\n\n{section}"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    write_file_atomically(path, text)


def update_results(path: Path, section: str) -> None:
    """Replace (or add) the bench_overhead section of ``path``, keeping the rest of the file."""
    old = path.read_text(encoding="utf-8") if path.exists() else None
    write_atomically(path, replace_section(old, section))


# ---------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; ``--quick`` changes the defaults of rounds, steps and warm-up."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all arms (default 9; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 40; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per fit (default 5; quick 2)")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=None,
        help=f"models to run (default {' '.join(MODELS)}; quick {' '.join(QUICK_MODELS)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and arm order")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: torch's own; quick 1); see the module docstring",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few-second smoke run; its timings mean little"
    )
    add_output_arguments(parser, "bench_overhead")
    args = parser.parse_args(argv)
    quick = {"rounds": 2, "steps": 3, "warmup": 2, "models": list(QUICK_MODELS), "threads": 1}
    full = {"rounds": 9, "steps": 40, "warmup": 5, "models": list(MODELS), "threads": None}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.warmup <= SNIP_EVENT_STEP:
        parser.error(
            f"--warmup must be > {SNIP_EVENT_STEP}, so that every pruning event falls in the warm-up"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its section of the results file.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    models, notes = runnable_models(args.models)
    for note in notes:
        print(note, flush=True)
    if not models:
        raise SystemExit("no model to run on this machine")
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        section = run_and_render(args, models, notes, argv, default_threads=threads)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the smoke test)
    output = output_path(args, "bench_overhead")
    update_results(output, section)
    print(f"wrote {output}")


MASKING_REPEATS = 50  # calls per arm and round in the masking-alone table


def masking_rows(models: Sequence[str], rounds: int, seed: int) -> list[tuple[str, float, float, float]]:
    """The per-step masking alone on each model's targets (90% pruned): ``(model, float us, integer us,
    median per-round ratio integer / float)``; arms interleaved in a shuffled order every round."""
    rows = []
    order_rng = random.Random(seed)
    cuda = torch.cuda.is_available()
    for name in models:
        torch.manual_seed(seed)
        net = MODELS[name].build().to("cuda" if cuda else "cpu")
        params = [t.param for t in select_targets(net).targets]
        masks = [torch.rand_like(p) > 0.9 for p in params]
        integer = [pruner_module.step_mask(p, m) for p, m in zip(params, masks, strict=True)]
        floats = [m if cuda else m.to(p.dtype) for p, m in zip(params, masks, strict=True)]
        arms: dict[str, Callable[[], None]] = {
            "integer": lambda params=params, masks=integer: pruner_module.zero_pruned(params, masks),
            "float": lambda params=params, masks=floats: _float_multiply(params, masks),
        }
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(rounds):
            order = list(arms)
            order_rng.shuffle(order)
            for arm in order:
                times[arm].append(_median_call(arms[arm], cuda))
        ratios = [i / f for i, f in zip(times["integer"], times["float"], strict=True)]
        rows.append(
            (
                name,
                1e6 * statistics.median(times["float"]),
                1e6 * statistics.median(times["integer"]),
                statistics.median(ratios),
            )
        )
    return rows


@torch.no_grad()
def _float_multiply(params: list[Tensor], masks: list[Tensor]) -> None:
    torch._foreach_mul_(params, masks)


def _median_call(call: Callable[[], None], cuda: bool) -> float:
    call()  # warm
    samples = []
    for _ in range(MASKING_REPEATS):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def render_masking(rows: Sequence[tuple[str, float, float, float]]) -> str:
    lines = [
        "| model | float multiply (0.1) us | integer multiply (now) us | median per-round ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {f:.1f} | {i:.1f} | {ratio:.3f} |" for name, f, i, ratio in rows]
    return "\n".join(lines)


def run_and_render(
    args: argparse.Namespace, models: list[str], notes: list[str], argv: list[str], default_threads: int
) -> str:
    """Measure ``models`` as ``args`` say, print the table and return the results section."""
    load_start = load_line()
    with quiet_lightning():
        measurements = run_rounds(models, args.rounds, args.warmup, args.steps, args.seed)
    rows = summarize(measurements, models)
    print(render_table(rows))
    masking = render_masking(masking_rows(models, args.rounds, args.seed))
    print(masking)
    settings = (
        f"{args.rounds} rounds; per round, each arm of each model (order shuffled, seed {args.seed}) runs "
        f"{args.warmup} untimed warm-up steps (epoch 0) and {args.steps} timed steps."
    )
    command = shlex.join(["python", "benchmarks/bench_overhead.py", *argv])
    loads = f"{load_start} / {load_line()}"
    section = render_section(command, settings, models, rows, notes, machine_line(default_threads), loads)
    masking_text = (
        "\n\nThe per-step masking alone, on each model's targets with 90% of weights pruned (the same "
        f"rounds, {MASKING_REPEATS} calls per arm and round, median): the 0.1 float multiply against the "
        "integer multiply of the weights' bits that keeps pruned weights exact zeros over NaN and inf.\n\n"
        f"{masking}\n"
    )
    return section.replace(f"\n{END_MARKER}", f"{masking_text}{END_MARKER}")


if __name__ == "__main__":
    main()

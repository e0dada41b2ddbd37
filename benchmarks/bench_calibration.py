"""One-shot pruning of a trained language model from calibration data: magnitude, Wanda, SparseGPT.

A small Llama-style byte-level model (``transformers.LlamaConfig``, built from config: nothing is
downloaded) is trained on the standard library's own source (``benchmarks/quality/tasks.py``'s
corpus) until its loss flattens, then pruned once, from the same trained weights, to 50%
unstructured and to 2:4 by each method:

- ``magnitude``: ``|W|``, compared within each layer (``scope="local"``, the papers' baseline);
- ``wanda``: ``|W| * ||X||_2``, compared within each output row (``scope="row"``, the paper's);
  for 50% unstructured also within each layer (``scope="local"``, torchao's comparison);
- ``sparsegpt``: layer by layer from the inputs' Hessian, with the kept weights corrected;
- torchao's ``WandaSparsifier`` as shipped, when ``torchao`` is installed (``pip install --no-deps
  torchao``); its masks are compared with ours.

Calibration: 128 windows of the model's context from the training text, in batches. Every method is
judged by held-out perplexity (per byte) on windows of held-out files, right after pruning and after
a short fine-tune with the masks held (the same batches, steps and Adam for every arm, the dense
model included). The time of each pruning (calibration included) is reported.

    python benchmarks/bench_calibration.py --threads 1   # about 15 minutes on 2 CPU cores
    python benchmarks/bench_calibration.py --quick       # seconds: a smoke test

``--cache`` keeps the trained model under ``runs/benchmarks/bench_calibration/`` and reuses it when
the settings match. The section is printed and written to ``runs/benchmarks/bench_calibration/
RESULTS.md``; ``--write-results`` updates the tracked ``benchmarks/RESULTS.md`` instead.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality/ and results_file beside this file

from quality.tasks import load_corpus
from results_file import SCRATCH, add_output_arguments, cpu_model, output_path, write_section

from lightning_prune import Pruner, PruningOptions, Schedule, prune_once

START, END = "<!-- bench_calibration:start -->", "<!-- bench_calibration:end -->"
SPARSITY = 0.5


@dataclass(frozen=True)
class Settings:
    """Model, data and step counts of one run."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    context: int
    batch: int
    steps: int
    lr: float
    warmup: int
    corpus_bytes: int
    val_windows: int
    calibration_windows: int
    calibration_batch: int
    finetune_steps: int
    finetune_lr: float
    curve_points: int


SETTINGS = {
    "default": Settings(hidden=128, layers=4, intermediate=384, heads=4, context=128, batch=16, steps=1800,
                        lr=3e-3, warmup=50, corpus_bytes=4_000_000, val_windows=256, calibration_windows=128,
                        calibration_batch=16, finetune_steps=100, finetune_lr=3e-4, curve_points=12),
    "quick": Settings(hidden=32, layers=1, intermediate=64, heads=2, context=32, batch=4, steps=12, lr=3e-3,
                      warmup=2, corpus_bytes=200_000, val_windows=8, calibration_windows=8, calibration_batch=4,
                      finetune_steps=3, finetune_lr=3e-4, curve_points=3),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ data
class Data:
    """Training windows at seeded random offsets, calibration windows likewise (another seed), and
    evenly spaced held-out windows."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self.corpus = load_corpus(settings.corpus_bytes)
        span = len(self.corpus.val) - settings.context - 1
        starts = torch.linspace(0, span, settings.val_windows).long().tolist()
        self.val = torch.stack([self.corpus.val[i : i + settings.context + 1] for i in starts])
        generator = torch.Generator().manual_seed(seed + 7919)
        calibration = self.windows(settings.calibration_windows, generator)[:, :-1]
        self.calibration = list(calibration.split(settings.calibration_batch))

    def windows(self, count: int, generator: torch.Generator) -> Tensor:
        high = len(self.corpus.train) - self.settings.context - 1
        starts = torch.randint(0, high, (count,), generator=generator).tolist()
        return torch.stack([self.corpus.train[i : i + self.settings.context + 1] for i in starts])

    def batch(self, index: int) -> Tensor:
        """Training batch ``index`` (windows of context + 1 bytes): the same for every arm."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.windows(self.settings.batch, generator)


def lm_loss(model: nn.Module, windows: Tensor, reduction: str = "mean") -> Tensor:
    logits = model(windows[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> float:
    """Held-out loss in nats per byte."""
    was_training = model.training
    model.eval()
    total = sum(float(lm_loss(model, chunk, "sum")) for chunk in data.val.split(64))
    model.train(was_training)
    return total / (data.val.shape[0] * (data.val.shape[1] - 1))


# ------------------------------------------------------------------------------------------ model
def build(settings: Settings, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=settings.context,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model: nn.Module, data: Data, settings: Settings) -> tuple[list[tuple[int, float]], float]:
    """Adam with linear warm-up and cosine decay to a tenth; held-out loss at evenly spaced steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)

    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    every = max(1, settings.steps // settings.curve_points)
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        lm_loss(model, data.batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            curve.append((step + 1, evaluate(model, data)))
            print(
                f"  step {step + 1}: held-out loss {curve[-1][1]:.4f} ({time.perf_counter() - started:.0f} s)"
            )
    return curve, time.perf_counter() - started


def trained_model(settings: Settings, data: Data, seed: int, cache: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model and how it was trained (from the cache when asked and present)."""
    key = hashlib.sha256(json.dumps([dataclasses.asdict(settings), seed]).encode()).hexdigest()[:12]
    path = SCRATCH / "bench_calibration" / f"trained-{key}.pt"
    model = build(settings, seed)
    if cache and path.is_file():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state_dict"])
        return model, {**saved["info"], "cached": str(path.relative_to(SCRATCH.parent.parent))}
    curve, seconds = train(model, data, settings)
    info = {"curve": curve, "seconds": seconds, "threads": torch.get_num_threads(), "load": load_text()}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return model, info


# ------------------------------------------------------------------------------------------ arms
@dataclass(frozen=True)
class Arm:
    """One way to prune: a method, the pattern and where its weights are compared."""

    method: str
    pattern: str
    compared: str
    scope: str = "local"


def arms(pattern: str, with_torchao: bool) -> list[Arm]:
    within = "each 2:4 group" if pattern == "2:4" else None
    chosen = [
        Arm("magnitude", pattern, within or "each layer", "local"),
        Arm("wanda", pattern, within or "each output row", "row"),
    ]
    if pattern == "1x1":
        chosen.append(Arm("wanda", pattern, "each layer", "local"))
    chosen.append(Arm("sparsegpt", pattern, within or "each block of 128 columns"))
    if with_torchao:
        chosen.append(Arm("torchao WandaSparsifier", pattern, within or "each layer"))
    return chosen


def prune_ours(model: nn.Module, arm: Arm, data: Data) -> Pruner:
    criterion = arm.method
    return prune_once(
        model,
        data.calibration,
        criterion=criterion,
        pattern=arm.pattern,
        target_sparsity=SPARSITY,
        scope=arm.scope,
        calibration_batches=len(data.calibration),
    )


def target_names(model: nn.Module) -> list[str]:
    """The Linear layers our defaults prune: every one but the head (``lm_head``)."""
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"
    ]


def prune_torchao(model: nn.Module, arm: Arm, data: Data, paper_norm: bool = False) -> dict[str, Tensor]:
    """torchao's WandaSparsifier at 50% (``semi_structured_block_size=4`` for 2:4); its keep masks.

    ``paper_norm``: square-root its per-channel statistic before it ranks (the paper's ``||X||_2``;
    torchao 0.18 ranks by the sum of squares).
    """
    from torchao.sparsity import WandaSparsifier

    names = target_names(model)
    block = 4 if arm.pattern == "2:4" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsifier = WandaSparsifier(sparsity_level=SPARSITY, semi_structured_block_size=block)
        sparsifier.prepare(model, config=[{"tensor_fqn": f"{name}.weight"} for name in names])
    model.eval()
    with torch.no_grad():
        for batch in data.calibration:
            model(batch)
    if paper_norm:
        for name in names:
            model.get_submodule(name).activation_post_process.norm.sqrt_()
    sparsifier.step()
    keeps = {name: model.get_submodule(name).parametrizations.weight[0].mask.bool().clone() for name in names}
    sparsifier.squash_mask()
    model.train()
    return keeps


def hold(model: nn.Module, keeps: dict[str, Tensor]) -> Pruner:
    """A Pruner holding ``keeps`` (masks chosen elsewhere) on the same layers as ours."""
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(pattern="1x1", target_sparsity=SPARSITY))
    assert [t.name for t in pruner.targets] == list(keeps)
    pruner.commit_masks([keeps[t.name] for t in pruner.targets], SPARSITY)
    return pruner


def finetune(model: nn.Module, pruner: Pruner | None, data: Data, settings: Settings) -> None:
    """``finetune_steps`` of Adam on the training batches after the training run's, masks held."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.finetune_lr)
    if pruner is not None:
        pruner.attach(optimizer)
    model.train()
    for step in range(settings.finetune_steps):
        lm_loss(model, data.batch(settings.steps + step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if pruner is not None:
        pruner.detach()


@dataclass
class Row:
    arm: Arm | None
    seconds: float
    loss: float
    loss_tuned: float
    sparsity: float
    spread: list[float] = dataclasses.field(default_factory=list)


def run_arm(trained: nn.Module, arm: Arm, data: Data, settings: Settings) -> tuple[Row, dict[str, Tensor]]:
    model = copy.deepcopy(trained)
    started = time.perf_counter()
    if arm.method.startswith("torchao"):
        keeps = prune_torchao(model, arm, data)
        seconds = time.perf_counter() - started
        pruner = hold(model, keeps)
    else:
        pruner = prune_ours(model, arm, data)
        seconds = time.perf_counter() - started
        keeps = {t.name: mask.clone() for t, mask in zip(pruner.targets, pruner.masks, strict=True)}
    loss = evaluate(model, data)
    sparsity = pruner.weight_sparsity()[0]
    # Wanda's statistic: how far the largest input-channel norm of each layer is from its median.
    norms = [b.view(-1).sqrt() for b in pruner.buffers if b is not None]
    spread = [float(n.max() / n.median()) for n in norms]
    finetune(model, pruner, data, settings)
    assert all(bool((t.param[~m] == 0).all()) for t, m in zip(pruner.targets, pruner.masks, strict=True))
    row = Row(arm, seconds, loss, evaluate(model, data), sparsity, spread)
    label = f"{arm.method} {arm.pattern} ({arm.compared})"
    print(
        f"  {label}: {seconds:.1f} s, ppl {math.exp(loss):.3f} -> {math.exp(row.loss_tuned):.3f} after fine-tune"
    )
    return row, keeps


# ------------------------------------------------------------------------------------------ report
def load_text() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        return "n/a"


def torchao_status() -> str | None:
    """torchao's version when it imports, else ``None``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.sparsity import WandaSparsifier  # noqa: F401
    except Exception:  # any import failure means: no peer column
        return None
    return str(torchao.__version__)


def ppl(loss: float) -> str:
    return f"{math.exp(loss):.3f}"


def verdicts(rows: list[Row]) -> list[str]:
    """The paper's expected ordering, checked on these numbers."""

    def find(method: str, pattern: str, scope: str | None = None) -> Row:
        return next(
            r
            for r in rows
            if r.arm is not None
            and r.arm.method == method
            and r.arm.pattern == pattern
            and (scope is None or r.arm.scope == scope)
        )

    lines = []
    for pattern in ("1x1", "2:4"):
        magnitude, wanda, gpt = (
            find("magnitude", pattern),
            find("wanda", pattern, "row"),
            find("sparsegpt", pattern),
        )
        below = wanda.loss < magnitude.loss and gpt.loss < magnitude.loss
        gaps = (
            f"magnitude {ppl(magnitude.loss)}, Wanda {ppl(wanda.loss)}, SparseGPT {ppl(gpt.loss)} "
            f"(dense {ppl(rows[0].loss)})"
        )
        name = "50% unstructured" if pattern == "1x1" else "2:4"
        lines.append(
            f"- {name}, one-shot: Wanda and SparseGPT {'below' if below else 'NOT both below'} magnitude: {gaps}."
        )
        if pattern == "2:4":
            holds = gpt.loss <= wanda.loss
            lines.append(
                f"- 2:4: SparseGPT {'at or below' if holds else 'ABOVE'} Wanda ({ppl(gpt.loss)} vs {ppl(wanda.loss)})."
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model for seconds: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", action="store_true", help="keep and reuse the trained model (runs/)")
    parser.add_argument("--no-torchao", action="store_true", help="leave torchao's arm out even if installed")
    add_output_arguments(parser, "bench_calibration")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines as they come, also into a file
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # our per-layer lines: off here
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    settings = SETTINGS["quick" if args.quick else "default"]
    started = time.perf_counter()
    load_start = load_text()
    data = Data(settings, args.seed)
    print("training" + (" (or loading the cached model)" if args.cache else ""))
    trained, info = trained_model(settings, data, args.seed, args.cache)
    torchao_version = None if args.no_torchao else torchao_status()
    dense_loss = evaluate(trained, data)
    dense = copy.deepcopy(trained)
    finetune(dense, None, data, settings)
    rows = [Row(None, 0.0, dense_loss, evaluate(dense, data), 0.0)]
    print(f"  dense: ppl {ppl(dense_loss)} -> {ppl(rows[0].loss_tuned)} after the same fine-tune")
    keeps: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for pattern in ("1x1", "2:4"):
        for arm in arms(pattern, torchao_version is not None):
            row, keep = run_arm(trained, arm, data, settings)
            rows.append(row)
            keeps[(arm.method, pattern, arm.scope)] = keep
    peer = []
    if torchao_version is not None:
        for pattern in ("1x1", "2:4"):
            ours = keeps[("wanda", pattern, "local" if pattern == "1x1" else "row")]
            shipped = keeps[("torchao WandaSparsifier", pattern, "local")]
            rooted = prune_torchao(copy.deepcopy(trained), Arm("torchao", pattern, ""), data, paper_norm=True)
            differ = sum(int((ours[n] != shipped[n]).sum()) for n in ours)
            total = sum(m.numel() for m in ours.values())
            same = all(torch.equal(ours[n], rooted[n]) for n in ours)
            peer.append(
                f"- {pattern}: our Wanda masks ({'per layer' if pattern == '1x1' else '2:4'}) and torchao's as "
                f"shipped differ in {differ:,} of {total:,} weights ({differ / total:.2%}); with torchao's "
                f"statistic square-rooted first they are {'identical' if same else 'NOT identical'}."
            )
    elapsed = time.perf_counter() - started

    shown = " ".join(argv if argv is not None else sys.argv[1:])
    params = sum(p.numel() for p in trained.parameters())
    pruned = sum(trained.get_submodule(n).weight.numel() for n in target_names(trained))
    curve = info["curve"]
    tail = ", ".join(f"{step}: {loss:.4f}" for step, loss in curve[-4:])
    threads = torch.get_num_threads()
    lines = [
        "## One-shot pruning of a trained LM from calibration data (`benchmarks/bench_calibration.py`)",
        "",
        f"Command: `python benchmarks/bench_calibration.py {shown}`".rstrip()
        + f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s in all.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {threads}"
        + ("" if threads == default_threads else f" (torch's default here: {default_threads})")
        + f"; torch {torch.__version__}, Python {platform.python_version()}. Load average at start "
        f"{load_start}, at end {load_text()} (other work shared the machine: times are indicative).",
        "",
        f"Model: Llama-style (`LlamaConfig`: hidden {settings.hidden}, {settings.layers} layers, "
        f"{settings.heads} heads, SwiGLU {settings.intermediate}, context {settings.context}, byte vocabulary), "
        f"{params:,} parameters, of which {pruned:,} in the {len(target_names(trained))} Linear layers pruned "
        f"(embeddings and head dense). Trained on the stdlib source ({len(data.corpus.train):,} train bytes) for "
        f"{settings.steps} steps of {settings.batch} windows, Adam lr {settings.lr} with warm-up and cosine decay, "
        f"in {info['seconds']:.0f} s at torch threads {info['threads']}"
        + (f" (loaded from `{info['cached']}`)" if "cached" in info else "")
        + f"; held-out loss (nats/byte) at the last curve points: {tail}.",
        "",
        f"Calibration: {settings.calibration_windows} windows of {settings.context} bytes of the training text "
        f"({len(data.calibration)} batches of {settings.calibration_batch}). Perplexity per byte on "
        f"{settings.val_windows} windows of held-out files; fine-tune: {settings.finetune_steps} steps of Adam "
        f"lr {settings.finetune_lr} on the next training batches with the masks held (the dense row: the same "
        "steps without masks). Prune time includes calibration.",
        "",
        "| pattern | method | compared within | prune time (s) | sparsity | perplexity one-shot | after fine-tune |",
        "|---|---|---|---:|---:|---:|---:|",
        f"| dense | - | - | - | 0% | {ppl(rows[0].loss)} | {ppl(rows[0].loss_tuned)} |",
    ]
    for row in rows[1:]:
        assert row.arm is not None
        pattern = "50% unstructured" if row.arm.pattern == "1x1" else "2:4"
        lines.append(
            f"| {pattern} | {row.arm.method} | {row.arm.compared} | {row.seconds:.2f} | {row.sparsity:.1%} | "
            f"{ppl(row.loss)} | {ppl(row.loss_tuned)} |"
        )
    lines += ["", "Against the paper's ordering (one-shot):", "", *verdicts(rows), ""]
    spread = next((r.spread for r in rows if r.spread), [])
    if spread:
        ordered = sorted(spread)
        lines += [
            "Wanda's premise is the few input features of far larger magnitude that emerge in large LLMs "
            "(Sun et al. 2023, after Dettmers et al. 2022). Here the largest input-channel norm of a layer is "
            f"{ordered[len(ordered) // 2]:.1f}x its median (median over the {len(ordered)} layers; "
            f"{ordered[0]:.1f}x to {ordered[-1]:.1f}x).",
            "",
        ]
    if torchao_version is not None:
        lines += [
            f"torchao {torchao_version} (`WandaSparsifier`, per layer; 2:4 with `semi_structured_block_size=4`):",
            "",
            *peer,
        ]
    else:
        lines.append(
            "torchao: not installed or does not import here, so no peer rows (`pip install --no-deps torchao`)."
        )
    output = output_path(args, "bench_calibration")
    write_section(output, START, END, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

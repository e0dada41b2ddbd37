"""Pruning under FSDP2 on 1 and 2 ranks: the per-step cost between events and the time of an event.

The same MLP (``--layers`` Linear layers of ``--width``, about 8.4M weights by default) trains under
Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` with
``fully_shard`` on every Linear, on ``N = 1`` and ``N = 2`` CPU processes (gloo), with and without
``PruningCallback`` (1x1 to 90%, global magnitude, events at steps 20 and 40). Every (ranks,
pruning) arm is one fresh run; the four arms run in turn, ``--rounds`` times (interleaved, in
reverse order every other round, so the machine's load falls on all alike), and the tables show
medians over rounds.

- step time: rank 0's wall time from ``on_train_batch_start`` to ``on_train_batch_end`` over the
  steps that hold no event (the first 5 steps of a run are warm-up and left out); the ratio of
  pruned to dense is the per-step overhead of holding masks on the local rows;
- event time: rank 0's wall time inside ``Pruner.prune`` (scoring, the selection with its
  all-reduced histograms, building and applying the masks), per event.

Run ``python benchmarks/bench_sharded.py --threads 1`` (about 4 minutes on 2 CPU cores; ``--quick``
for a seconds-long smoke run). With ``--write-results`` it updates its section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from results_file import add_output_arguments, cpu_model, output_path  # noqa: E402
from results_file import write_section as write_results_section  # noqa: E402

START, END = "<!-- bench_sharded:start -->", "<!-- bench_sharded:end -->"
WARMUP = 5
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


# ------------------------------------------------------------------------------- one run (a worker)
def worker(args: argparse.Namespace) -> None:
    """Train one arm; rank 0 writes its step and event times to ``args.out`` (JSON)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune import PruningCallback
    from lightning_prune.pruner import Pruner

    torch.set_num_threads(args.threads)
    events: list[float] = []
    original = Pruner.prune

    def timed_prune(self: Pruner, sparsity: float) -> Any:
        started = time.perf_counter()
        event = original(self, sparsity)
        events.append(time.perf_counter() - started)
        return event

    Pruner.prune = timed_prune  # type: ignore[method-assign]

    class Mlp(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for _ in range(args.layers):
                layers += [nn.Linear(args.width, args.width), nn.ReLU()]
            layers.append(nn.Linear(args.width, 10))
            self.net = nn.Sequential(*layers)

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for module in self.net:
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[tuple[int, float]] = []
            self.started = 0.0

        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            self.times.append((trainer.global_step, time.perf_counter() - self.started))

    torch.manual_seed(0)
    model = Mlp()
    generator = torch.Generator().manual_seed(0)
    per_rank = args.steps * args.batch_size
    x = torch.randn(per_rank * args.ranks, args.width, generator=generator)
    y = torch.randint(0, 10, (per_rank * args.ranks,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    event_steps: list[int] = []
    if args.pruned:
        event_steps = [args.steps // 3, 2 * args.steps // 3]
        frequency = event_steps[1] - event_steps[0]
        callbacks.append(
            PruningCallback(
                target_sparsity=0.9,
                start_step=0,
                end_step=event_steps[1],
                frequency=frequency,
                verbose=False,
                save_report=False,
            )
        )
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=args.ranks, tensor_parallel_size=1),
        accelerator="cpu",
        devices=args.ranks,
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.gettempdir(),
    )
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        # A step that ran an event (its global_step after the step) is not a between-events step.
        steps = [t for step, t in timer.times if step > WARMUP and step not in event_steps]
        result = {
            "step": statistics.median(steps),
            "events": events,
            "weights": sum(p.numel() for p in model.parameters()),
        }
        Path(args.out).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_arm(args: argparse.Namespace, ranks: int, pruned: bool) -> dict[str, Any]:
    """One fresh run of an arm in child processes; what its rank 0 measured."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--out",
            str(out),
            "--ranks",
            str(ranks),
            "--layers",
            str(args.layers),
            "--width",
            str(args.width),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        if pruned:
            command.append("--pruned")
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"})
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return dict(json.loads(out.read_text()))


# ------------------------------------------------------------------------------------------- report
def machine(threads: int) -> str:
    import torch

    return (
        f"{cpu_model()}, {os.cpu_count()} logical cores, torch threads {threads} per rank; torch "
        f"{torch.__version__}, Python {platform.python_version()}"
    )


def section(
    args: argparse.Namespace,
    argv: list[str],
    results: dict[tuple[int, bool], list[dict[str, Any]]],
    seconds: float,
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    weights = results[(1, False)][0]["weights"]
    lines = [
        "## Pruning under FSDP2: 1 vs 2 ranks (`benchmarks/bench_sharded.py`)",
        "",
        f"Command: `python benchmarks/bench_sharded.py {shlex.join(argv)}` — {when}, {seconds:.0f} s.",
        "",
        f"Machine: {machine(args.threads)}. Load average at the end {load} (a shared machine: times are indicative).",
        "",
        f"Model: {args.layers} Linear layers of {args.width} (and a 10-way head), {weights:,} parameters, every "
        f"Linear `fully_shard`ed; Adam, batch {args.batch_size} per rank, {args.steps} steps. Pruning: 1x1 to 90%, "
        f"global magnitude, events at steps {args.steps // 3} and {2 * args.steps // 3}. Medians over "
        f"{args.rounds} interleaved rounds of fresh runs.",
        "",
        "| ranks | step, dense (ms) | step, pruned (ms) | per-step overhead | per-round overheads | event (ms) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for ranks in (1, 2):
        dense = [r["step"] for r in results[(ranks, False)]]
        pruned = [r["step"] for r in results[(ranks, True)]]
        ratios = [p / d for p, d in zip(pruned, dense, strict=True)]
        events = [e for r in results[(ranks, True)] for e in r["events"]]
        lines.append(
            f"| {ranks} | {statistics.median(dense) * 1e3:.1f} | {statistics.median(pruned) * 1e3:.1f} | "
            f"{statistics.median(ratios):.3f} | {', '.join(f'{r:.3f}' for r in ratios)} | "
            f"{statistics.median(events) * 1e3:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pruned", action="store_true", help=argparse.SUPPRESS)
    add_output_arguments(parser, "bench_sharded")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.layers, args.width, args.steps, args.rounds, args.batch_size = 2, 64, 15, 1, 8
    output = output_path(args, "bench_sharded")
    started = time.perf_counter()
    results: dict[tuple[int, bool], list[dict[str, Any]]] = {
        (n, p): [] for n in (1, 2) for p in (False, True)
    }
    for round_index in range(args.rounds):
        arms = list(results)
        for ranks, pruned in arms if round_index % 2 == 0 else reversed(arms):  # no arm always first
            result = run_arm(args, ranks, pruned)
            results[(ranks, pruned)].append(result)
            print(
                f"round {round_index + 1}: {ranks} rank(s), {'pruned' if pruned else 'dense'}: step "
                f"{result['step'] * 1e3:.1f} ms, events {[round(e * 1e3) for e in result['events']]} ms",
                flush=True,
            )
    text = section(args, argv, results, time.perf_counter() - started)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_results_section(output, START, END, text)
    print(text)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

"""Train a tiny MLP (or one-layer transformer) under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` with pruning.

Run by ``tests/test_ddp.py`` as ``python tests/ddp_worker.py --out DIR ...``; Lightning's ``ddp``
launcher re-executes the same command line for rank 1. Every rank writes what it saw to
``DIR/rank<N>.json``:

- ``records``: one per pruning event, taken in ``on_train_batch_end`` of the batch whose optimizer
  step held the event: the step, the batch index, sha256 of every mask, every pruned weight and every
  criterion score buffer, and the event as the pruner logged it;
- ``steps``: per optimizer step, the hashes of the masks and score buffers (gradient criteria read
  DDP-synchronised gradients, so buffers agree across ranks although each rank sees other batches);
- ``first_batch``: hash of the rank's first training batch (the DistributedSampler gives each rank
  its own samples);
- ``broadcasts``: hashes of the tensors handed to ``broadcast_from_rank_zero``,
  before (rank-local choice) and after (rank 0's) the collective;
- ``final``: masks, weights, the whole ``state_dict``, the event history and the zero fraction.

Not a test module (no ``test_`` prefix); it only runs under ``__main__``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune.callback as callback_module
import lightning_prune.pruner as pruner_module
from lightning_prune import Criterion, Progressive, PruningCallback

IN_FEATURES, HIDDEN, CLASSES = 16, 32, 4


def digest(tensor: Tensor) -> str:
    """sha256 of the tensor's bytes (bitwise equality across ranks)."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:24]


class TinyMLP(pl.LightningModule):
    """16 -> 32 -> 32 -> 4, Adam; the two hidden Linear layers are pruned, the head stays dense."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TinyTransformer(TinyMLP):
    """The 16 inputs as 4 tokens of 4 features, one ``nn.TransformerEncoderLayer`` (4 heads, FFN 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (4, 4)),
            nn.Linear(4, HIDDEN // 2),
            nn.TransformerEncoderLayer(
                HIDDEN // 2, nhead=4, dim_feedforward=HIDDEN, batch_first=True, dropout=0.0
            ),
            nn.Flatten(),
            nn.Linear(4 * HIDDEN // 2, CLASSES),
        )


class RankNoiseCriterion(Criterion):
    """Test only: ``|W|`` plus noise that differs by rank, so each rank alone would pick other masks.

    The noise is as large as the weights themselves; it is drawn from a generator seeded by
    (rank, call number). Records the hash of the scores it returned on this rank.
    """

    name: ClassVar[str] = "rank_noise"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(1000 * rank + self.calls)
        self.calls += 1
        magnitude = param.detach().abs().float()
        noise = torch.rand(param.shape, generator=generator) * float(magnitude.max())
        scores = magnitude + noise.to(param.device)
        SCORE_LOG.append(digest(scores))
        return scores


SCORE_LOG: list[str] = []
BROADCAST_LOG: list[dict[str, list[str]]] = []


def spy_on_broadcast() -> None:
    """Wrap the library's broadcast to record what each rank had before and after it."""
    original = pruner_module.broadcast_from_rank_zero
    if getattr(original, "is_spy", False):
        return

    def spy(tensors: list[Tensor]) -> None:
        before = [digest(t) for t in tensors]
        original(tensors)
        BROADCAST_LOG.append({"before": before, "after": [digest(t) for t in tensors]})

    spy.is_spy = True  # type: ignore[attr-defined]
    pruner_module.broadcast_from_rank_zero = spy


#: Names of the report files this rank wrote (the callback promises: rank 0 only).
WRITTEN: list[str] = []


def spy_on_report_files() -> None:
    original = callback_module.write_atomically
    if getattr(original, "is_spy", False):
        return

    def spy(path: Any, data: Any) -> None:
        WRITTEN.append(Path(path).name)
        original(path, data)

    spy.is_spy = True  # type: ignore[attr-defined]
    callback_module.write_atomically = spy
    for cls, attribute in (
        (callback_module.PruningHistory, "to_csv"),
        (callback_module.SparsityReport, "to_csv"),
    ):
        method = getattr(cls, attribute)

        def recorded(self: Any, path: str, _method: Any = method) -> None:
            WRITTEN.append(Path(path).name)
            _method(self, path)

        setattr(cls, attribute, recorded)


class Recorder(pl.Callback):
    """Hashes masks, pruned weights and score buffers after every pruning event, on every rank."""

    def __init__(self, pruning: PruningCallback, out: Path) -> None:
        self.pruning = pruning
        self.out = out
        self.seen = 0
        self.records: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.first_batch: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        spy_on_broadcast()  # here, in the rank's own process (ddp_spawn starts fresh ones)
        spy_on_report_files()

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # After a resume the restored events are not new (an event at step 0 of a fresh run is).
        assert self.pruning.pruner is not None
        self.seen = len(self.pruning.pruner.events) if trainer.ckpt_path is not None else 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = digest(batch[0])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pruner = self.pruning.pruner
        assert pruner is not None
        buffers = [digest(b) if b is not None else None for b in pruner.buffers]
        if not self.steps or self.steps[-1]["step"] != pruner.step:
            masks = [digest(m) for m in pruner.masks]
            self.steps.append({"step": pruner.step, "masks": masks, "buffers": buffers})
        if len(pruner.events) == self.seen:
            return
        for event in pruner.events[self.seen :]:
            self.records.append(
                {
                    "event_step": event.step,
                    "pruner_step": pruner.step,
                    "global_step": trainer.global_step,
                    "batch_idx": batch_idx,
                    "epoch": trainer.current_epoch,
                    "target_sparsity": event.target_sparsity,
                    "sparsity": event.sparsity,
                    "masks": [digest(m) for m in pruner.masks],
                    "weights": [digest(t.param) for t in pruner.targets],
                    "buffers": buffers,
                }
            )
        self.seen = len(pruner.events)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pruner = self.pruning.pruner
        assert pruner is not None
        targets = [t.param.detach() for t in pruner.targets]
        zeros = sum(int((w == 0).sum()) for w in targets) / sum(w.numel() for w in targets)
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "process_group_backend": getattr(trainer.strategy, "process_group_backend", None),
            "global_step": trainer.global_step,
            "first_batch": self.first_batch,
            "records": self.records,
            "steps": self.steps,
            "scores": SCORE_LOG,
            "broadcasts": BROADCAST_LOG,
            "written": WRITTEN,
            "final": {
                "step": pruner.step,
                "targets": [t.name for t in pruner.targets],
                "events": [
                    {"step": e.step, "target_sparsity": e.target_sparsity, "sparsity": e.sparsity}
                    for e in pruner.events
                ],
                "masks": [digest(m) for m in pruner.masks],
                "weights": [digest(w) for w in targets],
                "state_dict": {k: digest(v) for k, v in pl_module.state_dict().items()},
                "zero_fraction": zeros,
                "mask_sparsity": pruner.sparsity,
                "units": unit_counts(pruner),
            },
        }
        path = self.out / f"rank{trainer.global_rank}.json"
        temporary = path.with_suffix(f".json.tmp{os.getpid()}")
        temporary.write_text(json.dumps(result, indent=1))
        os.replace(temporary, path)


def unit_counts(pruner: Any) -> list[str] | None:
    """A coupled pattern's heads and units per layer (after checking every mask holds whole units)."""
    if pruner.coupled is None:
        return None
    pruner.coupled.check_masks(pruner.masks)
    return [str(row) for row in pruner.coupled.report(pruner.masks).rows]


class DenseRecorder(pl.Callback):
    """Writes rank<N>.json with the run's facts when no pruning callback runs (a dense checkpoint)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "process_group_backend": getattr(trainer.strategy, "process_group_backend", None),
            "global_step": trainer.global_step,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def step_spec(text: str) -> int | float:
    """``"12"`` is step 12, ``"0.8"`` is 80% of ``trainer.estimated_stepping_batches``."""
    return float(text) if "." in text else int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for rank<N>.json")
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--pattern", default="4x1")
    parser.add_argument("--sparsity", type=float, default=0.75, help="target_sparsity")
    parser.add_argument("--start", type=step_spec, default=0, help="start_step: a step, or a fraction")
    parser.add_argument("--end", type=step_spec, default=12, help="end_step: a step, or a fraction")
    parser.add_argument("--frequency", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10, help="batches per rank per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ckpt-dir", default=None, help="save a checkpoint at every epoch end here")
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn"])
    parser.add_argument("--progressive", type=int, default=0, help="fade steps (0: off)")
    parser.add_argument("--rank-noise", action="store_true", help="score |W| + rank-dependent noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense", action="store_true", help="train without the pruning callback")
    parser.add_argument("--model", default="mlp", choices=["mlp", "transformer"])
    parser.add_argument("--scope", default="global", choices=["global", "local"])
    parser.add_argument("--allocation", default="scope", choices=["scope", "erk"])
    parser.add_argument("--regrow", type=float, default=0.0, help="regrowth share (0: off)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a small machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(args.seed, verbose=False)
    model = TinyTransformer() if args.model == "transformer" else TinyMLP()
    generator = torch.Generator().manual_seed(args.seed)
    samples = 2 * args.batches * args.batch_size  # two ranks
    x = torch.randn(samples, IN_FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    # Lightning swaps in a DistributedSampler: rank r gets samples r, r+2, r+4, ...
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)

    criterion: str | Criterion = args.criterion
    if args.rank_noise:
        criterion = RankNoiseCriterion()
    pruning = PruningCallback(
        target_sparsity=args.sparsity,
        pattern=args.pattern,
        criterion=criterion,
        start_step=args.start,
        end_step=args.end,
        frequency=args.frequency,
        progressive=Progressive(steps=args.progressive) if args.progressive else False,
        scope=args.scope,
        allocation=args.allocation,
        regrow=args.regrow,
        verbose=False,
    )
    recorder = Recorder(pruning, out)
    callbacks: list[pl.Callback] = [DenseRecorder(out)] if args.dense else [pruning, recorder]
    if args.ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        )
    trainer = pl.Trainer(
        strategy=args.strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    trainer.fit(model, loader, ckpt_path=args.ckpt_path)  # each rank writes rank<N>.json
    # Each rank has written its file; skip the interpreter's slow teardown of torch (~2 s a run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Train an 8-layer MLP under FSDP2 (``ModelParallelStrategy``, ``fully_shard``) on 2 CPU ranks with pruning.

Run by ``tests/test_fsdp.py`` as ``python tests/fsdp_worker.py --out DIR ...``; Lightning re-executes
the command line for rank 1. Four callbacks prune four pairs of hidden layers with ``1x1``, ``4x1``,
``2:4`` and ``channelx1`` (one criterion for all), each pair ranked globally. Every pruning event is
recorded with what one process needs to replay it: the whole weights, the whole pruning state before
it (masks and score buffers gathered from both ranks), the sparsity asked for, and the whole masks
after it. Rank 0 writes them to ``DIR/events.pt``; every rank writes ``DIR/rank<N>.json`` with
hashes of its gathered masks and its own local rows, the logged sparsities and the final zeros.

Not a test module (no ``test_`` prefix); it only runs under ``__main__``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback
from lightning_prune.pruner import Pruner

IN_FEATURES, HIDDEN, CLASSES, LAYERS = 16, 32, 4, 8
#: (callback name, pattern, hidden layers it prunes): net.<2i> is the i-th Linear.
GROUPS = (
    ("unstructured", "1x1", (0, 1)),
    ("blocks", "4x1", (2, 3)),
    ("nm", "2:4", (4, 5)),
    ("channels", "channelx1", (6, 7)),
)


def digest(tensor: Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:24]


def full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # type: ignore[no-any-return]


class DeepMLP(pl.LightningModule):
    """16 -> 32 (x8 hidden Linear layers) -> 4, each Linear sharded by rows over the ranks."""

    def __init__(self, lr: float, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.lr = lr
        layers: list[nn.Module] = [nn.Linear(IN_FEATURES, hidden), nn.ReLU()]
        for _ in range(LAYERS - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, CLASSES))
        self.net = nn.Sequential(*layers)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


EVENTS: list[dict[str, Any]] = []


def spy_on_events() -> None:
    """Wrap Pruner.prune: the whole inputs of each event (a collective: every rank runs it) and its masks."""
    original = Pruner.prune
    if getattr(original, "is_spy", False):
        return

    def prune(self: Pruner, sparsity: float) -> Any:
        before = self.state_dict()  # gathers masks and buffers from every rank
        weights = {t.name: full(t.param.detach()).clone() for t in self.targets}
        event = original(self, sparsity)
        after = {
            t.name: m
            for t, m in zip(self.targets, self._whole(self.masks, [True] * len(self.masks)), strict=True)
        }
        EVENTS.append(
            {
                "targets": [t.name for t in self.targets],
                "step": self.step,
                "sparsity": sparsity,
                "weights": weights,
                "state": before,
                "masks": after,
                "local_rows": {t.name: tuple(m.shape) for t, m in zip(self.targets, self.masks, strict=True)},
                "event_sparsity": event.sparsity,
            }
        )
        return event

    prune.is_spy = True  # type: ignore[attr-defined]
    Pruner.prune = prune  # type: ignore[method-assign]


class Recorder(pl.Callback):
    """Logged sparsities per event, and at the end the whole masks, weights and zeros."""

    def __init__(self, prunings: list[PruningCallback], out: Path) -> None:
        self.prunings = prunings
        self.out = out
        self.logged: list[float] = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        spy_on_events()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith("sparsity/"):
                self.logged.append(float(value))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        masks, weights, zeros, sparsity = {}, {}, 0, {}
        numel = 0
        for pruning in self.prunings:
            pruner = pruning.pruner
            assert pruner is not None
            for target, mask in zip(
                pruner.targets, pruner._whole(pruner.masks, [True] * len(pruner.masks)), strict=True
            ):
                assert mask is not None
                weight = full(target.param.detach())
                masks[target.name] = digest(mask)
                weights[target.name] = digest(weight)
                zeros += int((weight == 0).sum())
                numel += weight.numel()
            sparsity[pruning.name] = {"masks": pruner.sparsity, "weights": pruner.weight_sparsity()[0]}
        report = self.prunings[0].layer_report(pl_module)
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "events": len(EVENTS),
            "event_steps": [e["step"] for e in EVENTS],
            "local_rows": [e["local_rows"] for e in EVENTS],
            "event_masks": [{k: digest(v) for k, v in e["masks"].items()} for e in EVENTS],
            "final_masks": masks,
            "final_weights": weights,
            "zero_fraction": zeros / numel,
            "sparsity": sparsity,
            "logged": self.logged,
            "report": {layer.name: layer.sparsity for layer in report.layers},
        }
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(result, indent=1))
        if trainer.global_rank == 0:
            torch.save(EVENTS, self.out / "events.pt")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--scope", default="global")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10, help="batches per rank per epoch")
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--patterns", default=None, help="override every group's pattern (refusal tests)")
    parser.add_argument("--full-state", action="store_true", help="checkpoints as one file, not sharded")
    parser.add_argument("--one-shot", action="store_true", help="one event at step 0 (calibration criteria)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="rows of every hidden layer")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, verbose=False)
    model = DeepMLP(args.lr, args.hidden)
    generator = torch.Generator().manual_seed(args.seed)
    samples = 2 * args.batches * 8
    x = torch.randn(samples, IN_FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    prunings = [
        PruningCallback(
            target_sparsity=args.sparsity,
            pattern=args.patterns or pattern,
            criterion=args.criterion,
            scope=args.scope,
            include=[f"net.{2 * i}" for i in layers],
            start_step=0 if args.criterion == "magnitude" or args.one_shot else 1,
            end_step=0 if args.one_shot else 12,
            frequency=3,
            calibration_batches=4 if args.one_shot else None,
            name=name,
            verbose=False,
        )
        for name, pattern, layers in GROUPS
    ]
    callbacks: list[pl.Callback] = [*prunings, Recorder(prunings, out)]
    if args.ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        )
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not args.full_state
        ),
        accelerator="cpu",
        devices=2,
        max_epochs=args.max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    trainer.fit(model, loader, ckpt_path=args.ckpt_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

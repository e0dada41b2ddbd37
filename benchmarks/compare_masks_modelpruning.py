"""Do ``PruningCallback`` (magnitude, 1x1) and Lightning's ``ModelPruning`` (global l1) pick the same weights?

Trains ``bench_quality.py``'s GPT task (seed 0, ``--steps`` steps) twice on the same weights, batches
and event steps, once with each, and prints after every step how many targeted weights are kept by
one and pruned by the other. ``ModelPruning`` prunes at its epoch end, one batch after our event, so
compare the step after an event. This is the diagnostic behind the README's note on the 1x1 gap.

Run: ``OMP_NUM_THREADS=1 python benchmarks/compare_masks_modelpruning.py --steps 60``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import quiet_lightning
from quality.arms import (
    Arm,
    ContinuingSampler,
    StreamBatches,
    TaskModule,
    modelpruning_amounts,
    modelpruning_callback,
    ours_callback,
    pruning_schedule,
    target_layers,
)
from quality.tasks import make_task


class KeptWeights(Callback):
    """After every batch: which targeted weights are non-zero (through ModelPruning's mask if on)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.kept: dict[int, list[Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.kept[trainer.global_step] = [
            (layer.weight_orig * layer.weight_mask if hasattr(layer, "weight_mask") else layer.weight).ne(0)
            for layer in self.layers
        ]


def train(kind: str, steps: int) -> tuple[list[int], dict[int, list[Tensor]]]:
    task = make_task("gpt", "default", 0, steps=steps)
    schedule = pruning_schedule(task)
    torch.manual_seed(0)
    net = task.build()
    layers = target_layers(net)
    recorder = KeptWeights(layers)
    if kind == "ours":
        pruning: Callback = ours_callback(Arm("ours", "magnitude", "1x1", 0.9))
    else:
        pruning = modelpruning_callback(layers, modelpruning_amounts(schedule, 0.9))
    loader = DataLoader(StreamBatches(task), batch_size=None, sampler=ContinuingSampler(schedule.frequency))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            default_root_dir=root,
            callbacks=[pruning, recorder],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(TaskModule(task, net), train_dataloaders=loader)
    return schedule.event_steps(), recorder.kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps of each run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    if args.steps < 45:
        parser.error(f"--steps={args.steps}: needs >= 45, so that events are at least 2 steps apart")
    events, ours = train("ours", args.steps)
    _, theirs = train("modelpruning", args.steps)
    print(f"event steps: {events}")
    print("step | kept by ours | kept by ModelPruning | kept by one only")
    for step in sorted(set(ours) & set(theirs)):
        if step - 1 in events:  # ModelPruning has pruned too by the end of the next batch
            mine, other = ours[step], theirs[step]
            only = sum(int((a ^ b).sum()) for a, b in zip(mine, other, strict=True))
            print(f"{step} | {sum(int(a.sum()) for a in mine)} | {sum(int(b.sum()) for b in other)} | {only}")


if __name__ == "__main__":
    main()

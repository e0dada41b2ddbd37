"""One rank of ``prune_once`` under plain ``torch.distributed`` (gloo, CPU), each rank on its own batches.

Run by ``tests/test_calibration_ddp.py`` as two processes with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set: ``python tests/calibration_ddp_worker.py --out DIR``.
Each rank writes ``DIR/rank<N>.pt`` with, for Wanda and SparseGPT, the statistics, masks and
weights it ended with. The data are :func:`model_and_shards`: the test builds the same to prune
the union of both ranks' batches in one process.

Not a test module (no ``test_`` prefix); it only runs under ``__main__``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_prune import prune_once

BATCHES_PER_RANK = 3


def model_and_shards() -> tuple[nn.Module, list[list[Tensor]]]:
    """A small MLP and, per rank, its own calibration batches (the ranks' inputs differ in scale)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 2))
    generator = torch.Generator().manual_seed(1)
    shards = [
        [torch.randn(8, 16, generator=generator) * (1.0 + 3.0 * rank) for _ in range(BATCHES_PER_RANK)]
        for rank in range(2)
    ]
    return model, shards


def run(criterion: str, batches: list[Tensor]) -> dict[str, Any]:
    """Prune a fresh copy of the model on ``batches``; what it ended with."""
    model, _ = model_and_shards()
    pattern = "1x1" if criterion == "wanda" else "2:4"
    pruner = prune_once(model, batches, criterion=criterion, pattern=pattern, target_sparsity=0.5)
    return {
        "buffers": [b.clone() if b is not None else None for b in pruner.buffers],
        "masks": [m.clone() for m in pruner.masks],
        "weights": [t.param.detach().clone() for t in pruner.targets],
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _, shards = model_and_shards()
    result = {"world_size": dist.get_world_size(), "rank": rank}
    for criterion in ("wanda", "sparsegpt"):
        result[criterion] = run(criterion, shards[rank])
    path = Path(args.out) / f"rank{rank}.pt"
    torch.save(result, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the slow interpreter teardown of torch


if __name__ == "__main__":
    main(sys.argv[1:])

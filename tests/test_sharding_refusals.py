"""What sharded weights cannot serve is refused before training, naming the option or the layer.

One process with a gloo group of one rank: ``fully_shard`` on a 1-rank mesh makes real FSDP2
``DTensor`` weights, so the checks run in-process (the 2-rank runs are in ``tests/test_fsdp.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.callback import check_strategy

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor


@pytest.fixture(scope="module")
def one_rank() -> Iterator[Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded_mlp(mesh: Any) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


SCHEDULE = Schedule(start_step=0, end_step=10, frequency=5)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pattern": "head"}, "pattern: 'head' couples rows and columns"),
        ({"progressive": True, "pattern": "4x1"}, "progressive: a fade"),
        ({"regularizer": "group_lasso", "pattern": "4x1"}, "regularizer: group lasso"),
        ({"rewind": 0}, "rewind: the rewind snapshot"),
        ({"criterion": "sparsegpt", "pattern": "2:4"}, "criterion: 'sparsegpt' reconstructs"),
        ({"allocation": "erk"}, "allocation: 'erk' shares"),
        ({"regrow": 0.1}, "regrow: regrowth"),
    ],
)
def test_options_that_need_whole_weights_are_refused_under_fsdp2(
    one_rank: Any, options: dict[str, Any], named: str
) -> None:
    model = sharded_mlp(one_rank)
    if options.get("pattern") == "head":  # heads to couple: an encoder layer
        model = nn.TransformerEncoderLayer(16, nhead=4, dim_feedforward=32, batch_first=True)
        fully_shard(model, mesh=one_rank)
    with pytest.raises(ValueError, match="cannot prune these sharded") as error:
        Pruner(model, SCHEDULE, PruningOptions(target_sparsity=0.5, **options))
    assert named in str(error.value)


def test_tensor_parallel_placements_are_refused_naming_the_layer(one_rank: Any) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), one_rank, [Shard(1)]))
    with pytest.raises(
        ValueError, match=r"0: placements \(Shard\(dim=1\),\) on a 1-D mesh.*not tensor parallelism"
    ):
        Pruner(model, SCHEDULE, PruningOptions(target_sparsity=0.5))


def test_a_transposed_layout_is_refused_naming_the_layer(one_rank: Any) -> None:
    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(16, 8), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(model[0], mesh=one_rank)
    fully_shard(model, mesh=one_rank)
    with pytest.raises(ValueError, match=r"0: layout \(in, out\) stores inputs first"):
        Pruner(model, SCHEDULE, PruningOptions(target_sparsity=0.5))


def test_one_rank_sharded_pruning_equals_unsharded(one_rank: Any) -> None:
    # The sharded code path on one rank: the same masks as the plain model's, for every pattern.
    for pattern in ("1x1", "4x1", "2:4", "channelx1"):
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        sharded = sharded_mlp(one_rank)
        options = PruningOptions(target_sparsity=0.5, pattern=pattern)
        expected, got = Pruner(reference, SCHEDULE, options), Pruner(sharded, SCHEDULE, options)
        expected.prune(0.45)
        got.prune(0.45)
        assert got.shards is not None
        for a, b in zip(expected.masks, got.masks, strict=True):
            assert torch.equal(a, b), pattern
        assert got.sparsity == expected.sparsity
        state = got.state_dict()
        assert all(not hasattr(m, "placements") for m in state["masks"].values())


def test_fsdp1_deepspeed_are_refused_and_model_parallel_accepted() -> None:
    with pytest.raises(ValueError, match=r"FSDPStrategy \(FSDP1\).*ModelParallelStrategy"):
        check_strategy(FSDPStrategy())
    with pytest.raises(ValueError, match="does not support strategy DeepSpeedStrategy"):
        check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))

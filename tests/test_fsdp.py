"""PruningCallback under FSDP2 on 2 CPU processes (gloo): exact global masks over sharded weights.

Each run is ``tests/fsdp_worker.py`` under ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with ``fully_shard`` on every Linear of an 8-layer MLP: each rank holds
16 of each layer's 32 rows. Four callbacks prune four pairs of layers with 1x1, 4x1, 2:4 and channelx1.

The oracle is one process: every event the ranks ran is replayed here by a plain ``Pruner`` on the
whole weights and the whole state the ranks held before it (gathered by the worker), and its masks
must equal the ranks' gathered masks bit for bit. So the sharded scoring, the costs summed over
ranks (channelx1), the selection from summed histograms and the ties by position are all checked
against the single-process code path, for a magnitude and a gradient criterion.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_ddp import LAUNCH_VARIABLES, free_port, launch
from torch import nn
from torch.utils.data import DistributedSampler

from lightning_prune import Pruner, PruningOptions, Schedule

pytestmark = pytest.mark.ddp

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORKER = Path("tests") / "fsdp_worker.py"
GROUPS = {
    "unstructured": ("1x1", (0, 1)),
    "blocks": ("4x1", (2, 3)),
    "nm": ("2:4", (4, 5)),
    "channels": ("channelx1", (6, 7)),
}
Result = dict[str, Any]


def run_worker(out: Path, *args: str, expect_failure: bool = False) -> tuple[Result, Result] | str:
    """Run the worker on 2 ranks; what each rank wrote (or, expecting failure, its stderr)."""
    command = [sys.executable, str(WORKER), "--out", str(out), *args]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update({"MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"})
    for _ in range(2):
        env["MASTER_PORT"] = str(free_port())
        returncode, _, stderr = launch(command, env)
        if "address already in use" not in stderr.lower():
            break
    if expect_failure:
        assert returncode != 0, "the worker was expected to fail"
        return stderr
    assert returncode == 0, f"{' '.join(command)}\n--- stderr ---\n{stderr[-6000:]}"
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return ranks[0], ranks[1]


class Whole(nn.Module):
    """The worker's MLP, unsharded: the replay's model."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(16, 32), nn.ReLU()]
        for _ in range(7):
            layers += [nn.Linear(32, 32), nn.ReLU()]
        layers.append(nn.Linear(32, 4))
        self.net = nn.Sequential(*layers)


def replay(event: dict[str, Any], criterion: str, scope: str = "global") -> dict[str, torch.Tensor]:
    """One process's masks for the event: the whole weights and state the ranks had before it."""
    group = next(name for name, (_, layers) in GROUPS.items() if f"net.{2 * layers[0]}" in event["targets"])
    pattern, layers = GROUPS[group]
    model = Whole()
    with torch.no_grad():
        for name, weight in event["weights"].items():
            model.get_submodule(name).weight.copy_(weight)
    state = event["state"]
    options = PruningOptions(
        target_sparsity=0.5,
        pattern=pattern,
        criterion=criterion,
        scope=scope,
        include=[f"net.{2 * i}" for i in layers],
    )
    pruner = Pruner(model, Schedule(**state["schedule"]), options)
    pruner.load_state_dict(state)
    pruner.prune(event["sparsity"])
    return {t.name: m for t, m in zip(pruner.targets, pruner.masks, strict=True)}


def check_run(rank0: Result, rank1: Result, out: Path, criterion: str) -> None:
    for rank, result in enumerate((rank0, rank1)):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["strategy"] == "ModelParallelStrategy"
    # Each rank pruned its own 16 rows of every layer, and both gathered the same whole masks.
    assert rank0["local_rows"][0] == {"net.0": [16, 16], "net.2": [16, 32]}
    assert rank0["event_masks"] == rank1["event_masks"] and rank0["final_masks"] == rank1["final_masks"]
    assert rank0["final_weights"] == rank1["final_weights"]
    events = torch.load(out / "events.pt", weights_only=False)
    assert len(events) == 16  # 4 callbacks x events at steps 3, 6, 9, 12
    for event in events:
        expected = replay(event, criterion)
        for name, mask in event["masks"].items():
            assert torch.equal(mask, expected[name]), (
                f"{name} at step {event['step']}: not one process's mask"
            )
    # The target is reached: masks, weights, logged values and the report (not a stale 0.0).
    for group in GROUPS:
        assert rank0["sparsity"][group] == {"masks": 0.5, "weights": 0.5}
    assert rank0["zero_fraction"] == pytest.approx(0.5)
    assert rank0["logged"][-4:] == [0.5] * 4
    sizes = [16 * 32] + [32 * 32] * 7
    zeros = sum(rank0["report"][f"net.{2 * i}"] * size for i, size in enumerate(sizes))
    assert zeros / sum(sizes) == pytest.approx(0.5) and rank0["report"]["net.16"] == 0.0


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result, Path]:
    out = tmp_path_factory.mktemp("fsdp_magnitude")
    checkpoints = out / "checkpoints"
    rank0, rank1 = run_worker(out, "--criterion", "magnitude", "--ckpt-dir", str(checkpoints))  # type: ignore[misc]
    return rank0, rank1, out


def test_magnitude_masks_over_shards_equal_one_process_at_every_event(
    magnitude_run: tuple[Result, Result, Path],
) -> None:
    rank0, rank1, out = magnitude_run
    check_run(rank0, rank1, out, "magnitude")


def test_snip_momentum_on_sharded_gradients_equals_one_process_at_every_event(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    args = ["--criterion", "snip_momentum", "--full-state", "--ckpt-dir", str(checkpoints)]
    rank0, rank1 = run_worker(tmp_path, *args)  # type: ignore[misc]
    check_run(rank0, rank1, tmp_path, "snip_momentum")
    # A full-state checkpoint (one file) holds the whole masks and score buffers too.
    saved = torch.load(checkpoints / "epoch=0.ckpt", weights_only=False)
    events = torch.load(tmp_path / "events.pt", weights_only=False)
    state = saved["callbacks"]["PruningCallback[blocks]"]
    last = [e for e in events if e["step"] <= saved["global_step"] and "net.4" in e["targets"]][-1]
    for name in ("net.4", "net.6"):
        assert torch.equal(state["masks"][name], last["masks"][name])
        assert state["buffers"][name].shape == (32, 32) and state["buffers"][name].abs().sum() > 0


def test_resume_from_a_distributed_checkpoint_matches_the_uninterrupted_run(
    magnitude_run: tuple[Result, Result, Path], tmp_path: Path
) -> None:
    straight0, _, out = magnitude_run
    checkpoint = out / "checkpoints" / "epoch=0.ckpt"
    assert checkpoint.is_dir(), "ModelParallelStrategy saves a distributed (sharded) checkpoint"
    rank0, rank1 = run_worker(tmp_path, "--criterion", "magnitude", "--ckpt-path", str(checkpoint))  # type: ignore[misc]
    # Epoch 0 ended at step 10 (events 3, 6, 9 done): only the event of step 12 is left.
    assert rank0["event_steps"] == [12] * 4
    for resumed in (rank0, rank1):
        assert resumed["global_step"] == straight0["global_step"] == 20
        assert resumed["final_masks"] == straight0["final_masks"]
        assert resumed["final_weights"] == straight0["final_weights"]


def test_a_state_saved_on_two_ranks_loads_whole_into_one_process(
    magnitude_run: tuple[Result, Result, Path],
) -> None:
    # The callback's state in the distributed checkpoint holds whole masks, whatever the world size.
    _, _, out = magnitude_run
    saved = torch.load(out / "checkpoints" / "epoch=0.ckpt" / "meta.pt", weights_only=False)
    events = torch.load(out / "events.pt", weights_only=False)
    for group, (pattern, layers) in GROUPS.items():
        state = saved["callbacks"][f"PruningCallback[{group}]"]
        options = PruningOptions(
            target_sparsity=0.5, pattern=pattern, include=[f"net.{2 * i}" for i in layers]
        )
        pruner = Pruner(Whole(), Schedule(**state["schedule"]), options)
        pruner.load_state_dict(state)
        (at_nine,) = [
            e for e in events if e["step"] == 9 and e["targets"] == [t.name for t in pruner.targets]
        ]
        for target, mask in zip(pruner.targets, pruner.masks, strict=True):
            assert torch.equal(mask, at_nine["masks"][target.name]), target.name


def test_row_blocks_that_straddle_a_shard_cut_are_refused_naming_the_layer(tmp_path: Path) -> None:
    # 24 rows over 2 ranks: 12 each, so an 8x1 block (rows 8-15) would straddle the cut at row 12.
    # Both ranks refuse before the first step (neither waits in a collective).
    stderr = run_worker(tmp_path, "--hidden", "24", "--patterns", "8x1", expect_failure=True)
    assert isinstance(stderr, str)
    assert "net.0 has 24 rows, cut between ranks at rows [12]: row 12 is inside a group of 8 rows" in stderr


def test_wanda_statistics_are_summed_over_the_ranks_and_its_masks_equal_one_process(tmp_path: Path) -> None:
    # One-shot at step 0 from 4 calibration batches per rank (the first 64 samples between them).
    rank0, rank1 = run_worker(tmp_path, "--criterion", "wanda", "--one-shot")  # type: ignore[misc]
    assert rank0["event_steps"] == [0] * 4 and rank0["event_masks"] == rank1["event_masks"]
    events = torch.load(tmp_path / "events.pt", weights_only=False)
    first = next(e for e in events if "net.0" in e["targets"])
    # net.0 reads the data itself: its statistic is the squared inputs of both ranks' batches, the
    # first 32 samples each of Lightning's DistributedSampler (shuffled, seed 0) over the worker's data.
    x = torch.randn(160, 16, generator=torch.Generator().manual_seed(0))
    seen = [
        index
        for rank in (0, 1)
        for index in list(DistributedSampler(range(160), num_replicas=2, rank=rank, shuffle=True, seed=0))[
            :32
        ]
    ]
    assert len(set(seen)) == 64
    expected = x[seen].square().sum(0, keepdim=True)
    torch.testing.assert_close(first["state"]["buffers"]["net.0"], expected)
    for event in events:
        expected = replay(event, "wanda")
        for name, mask in event["masks"].items():
            assert torch.equal(mask, expected[name]), name
    assert rank0["zero_fraction"] == pytest.approx(0.5)


def test_a_layer_with_fewer_rows_than_ranks_is_refused_naming_it(tmp_path: Path) -> None:
    # One row per hidden layer: rank 1 holds no row of any of them.
    stderr = run_worker(tmp_path, "--hidden", "1", "--patterns", "1x1", expect_failure=True)
    assert isinstance(stderr, str)
    assert "net.0 has 1 rows for 2 ranks, so some rank holds none" in stderr

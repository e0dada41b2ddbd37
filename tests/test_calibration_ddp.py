"""One-shot pruning from calibration data under 2-process DDP (gloo, CPU): every rank calibrates on
its own batches, the statistics are summed over the ranks, and the ranks end alike.

Two ways in: ``prune_once`` under plain ``torch.distributed`` (``tests/calibration_ddp_worker.py``),
compared with one process pruning the union of both ranks' batches; and the callback's one-shot at
step 0 under ``Trainer(strategy="ddp")`` (``tests/ddp_worker.py``, Lightning's DistributedSampler
giving each rank its own batches).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from calibration_ddp_worker import model_and_shards, run
from test_ddp import LAUNCH_VARIABLES, REPO_ROOT, assert_ranks_agree, assert_reaches, free_port, run_worker

pytestmark = pytest.mark.ddp

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def plain_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("calibration_ddp")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"})
    command = [sys.executable, str(Path("tests") / "calibration_ddp_worker.py"), "--out", str(out)]
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    logs = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"calibration_ddp_worker.py ran over {TIMEOUT_S} s")
        logs.append(stderr[-4000:])
        assert proc.returncode == 0, "\n".join(logs)
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    return ranks[0], ranks[1]


def test_wanda_under_ddp_scores_from_every_rank_s_batches(
    plain_ranks: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    rank0, rank1 = (r["wanda"] for r in plain_ranks)
    _, shards = model_and_shards()
    union = run("wanda", shards[0] + shards[1])  # one process, both ranks' batches
    alone = run("wanda", shards[0])
    for got0, got1, expected, own in zip(
        rank0["buffers"], rank1["buffers"], union["buffers"], alone["buffers"], strict=True
    ):
        assert torch.equal(got0, got1)
        torch.testing.assert_close(got0, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(own, expected), "rank 0's batches alone give other statistics"
    for got0, got1, expected in zip(rank0["masks"], rank1["masks"], union["masks"], strict=True):
        assert torch.equal(got0, got1) and torch.equal(got0, expected)


def test_sparsegpt_under_ddp_matches_one_process_on_all_batches(
    plain_ranks: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    rank0, rank1 = (r["sparsegpt"] for r in plain_ranks)
    _, shards = model_and_shards()
    union = run("sparsegpt", shards[0] + shards[1])
    for got0, got1, expected in zip(rank0["weights"], rank1["weights"], union["weights"], strict=True):
        assert torch.equal(got0, got1), "the same corrected weights on every rank"
        torch.testing.assert_close(got0, expected, rtol=1e-4, atol=1e-5)
    for got0, got1, expected in zip(rank0["masks"], rank1["masks"], union["masks"], strict=True):
        assert torch.equal(got0, got1) and torch.equal(got0, expected)
        assert (got0.view(got0.shape[0], -1, 4).sum(dim=-1) == 2).all()


ONE_SHOT = ["--start", "0", "--end", "0", "--sparsity", "0.5", "--max-epochs", "1"]


def test_the_callback_s_wanda_at_step_zero_sums_each_rank_s_statistics(tmp_path: Path) -> None:
    # Each rank calibrates on its own batches (DistributedSampler): the scores, and so the masks,
    # agree only because the statistics are summed over the ranks (the buffers are compared).
    rank0, rank1 = run_worker(tmp_path, "--criterion", "wanda", "--pattern", "1x1", *ONE_SHOT)
    assert_ranks_agree(rank0, rank1, [0])
    # And each rank alone already chose rank 0's masks, before the broadcast made sure.
    assert rank0["broadcasts"] and len(rank0["broadcasts"]) == len(rank1["broadcasts"])
    assert all(
        a["before"] == b["before"] for a, b in zip(rank0["broadcasts"], rank1["broadcasts"], strict=True)
    )
    assert_reaches(rank0, 0.5)


def test_the_callback_s_sparsegpt_at_step_zero_ends_alike_on_every_rank(tmp_path: Path) -> None:
    rank0, rank1 = run_worker(tmp_path, "--criterion", "sparsegpt", "--pattern", "2:4", *ONE_SHOT)
    assert_ranks_agree(rank0, rank1, [0])
    assert_reaches(rank0, 0.5)

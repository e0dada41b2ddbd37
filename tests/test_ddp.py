"""PruningCallback under real 2-process DDP on CPU (gloo): every rank ends with the same masks.

Each test runs ``tests/ddp_worker.py`` (``Trainer(strategy="ddp", accelerator="cpu", devices=2)``) in
a subprocess and compares what the two ranks wrote. Each rank trains on its own batches (Lightning's
DistributedSampler), so gradient criteria only agree if they read DDP-reduced gradients; masks agree
whatever the scores because rank 0's are broadcast after each event; the worker records the
tensors handed to that broadcast on each rank, before and after it. The runs are module-scoped
fixtures shared by the tests that look at them (7 runs, about 7-15 s each).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.ddp

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path("tests") / "ddp_worker.py"
# Variables that would make Lightning believe the processes were launched already.
LAUNCH_VARIABLES = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "SLURM_NTASKS",
    "SLURM_JOB_NAME",
)

TIMEOUT_S = 300
Result = dict[str, Any]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``command`` in its own session; on timeout kill the session (rank 1 is rank 0's child)."""
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(command)} ran over {TIMEOUT_S} s\n{stderr[-6000:]}")
    return proc.returncode, stdout, stderr


def run_worker(out: Path, *args: str) -> tuple[Result, Result]:
    """Run the worker on 2 ranks; return what rank 0 and rank 1 wrote."""
    command = [sys.executable, str(WORKER), "--out", str(out), *args]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update({"MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"})
    for _ in range(2):  # a second try if another process took the free port meanwhile
        env["MASTER_PORT"] = str(free_port())
        returncode, stdout, stderr = launch(command, env)
        if "address already in use" not in stderr.lower():
            break
    log = f"{' '.join(command)}\n--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-6000:]}"
    assert returncode == 0, log
    ranks = []
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no results\n{log}"
        ranks.append(json.loads(path.read_text()))
    return ranks[0], ranks[1]


def assert_real_ddp(rank0: Result, rank1: Result) -> None:
    for rank, result in enumerate((rank0, rank1)):
        assert result["rank"] == rank
        assert result["world_size"] == 2
        assert result["strategy"] == "DDPStrategy"
        assert result["process_group_backend"] == "gloo"
    assert rank0["first_batch"] != rank1["first_batch"], "both ranks trained on the same batches"


def assert_ranks_agree(rank0: Result, rank1: Result, event_steps: list[int]) -> None:
    """Same events at the same steps, and bitwise the same masks, weights and scores at each."""
    assert_real_ddp(rank0, rank1)
    for result in (rank0, rank1):
        assert [r["event_step"] for r in result["records"]] == event_steps, result["rank"]
        for record in result["records"]:  # seen on the batch of the event's own optimizer step
            assert record["pruner_step"] == record["global_step"]
            # (an event at step 0 comes before training and is seen after the first step)
            assert record["global_step"] == max(record["event_step"], 1)
    for a, b in zip(rank0["records"], rank1["records"], strict=True):
        step = a["event_step"]
        assert a["masks"] == b["masks"], f"masks differ between ranks at the event of step {step}"
        assert a["weights"] == b["weights"], f"pruned weights differ between ranks at step {step}"
        assert a["buffers"] == b["buffers"], f"criterion scores differ between ranks at step {step}"
        assert a == b, f"records differ between ranks at step {step}"
    assert len(rank0["steps"]) == len(rank1["steps"])
    for a, b in zip(rank0["steps"], rank1["steps"], strict=True):
        assert a == b, f"masks or scores differ between ranks after step {a['step']}"
    assert rank0["final"] == rank1["final"]


def assert_ranks_chose_alike(rank0: Result, rank1: Result) -> None:
    """Before the broadcast, each rank's own masks were already rank 0's (no noise in the scores)."""
    assert rank0["broadcasts"], "the pruner never called broadcast_from_rank_zero"
    for a, b in zip(rank0["broadcasts"], rank1["broadcasts"], strict=True):
        assert a["before"] == b["before"]


def assert_reaches(result: Result, target: float) -> None:
    final = result["final"]
    assert final["mask_sparsity"] == pytest.approx(target, abs=1e-9)
    assert final["zero_fraction"] == pytest.approx(target, abs=1e-9)
    assert final["events"][-1]["sparsity"] == pytest.approx(target, abs=1e-9)
    assert final["targets"] == ["net.0", "net.2"]


# ---------------------------------------------------------------------------------------------- runs
# 10 batches of 8 per rank and epoch (160 samples, split by the DistributedSampler).
WINDOW = ["--start", "0", "--end", "12", "--frequency", "3"]  # events at steps 3, 6, 9, 12


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result]:
    out = tmp_path_factory.mktemp("ddp_magnitude")
    args = ["--criterion", "magnitude", "--pattern", "4x1", "--sparsity", "0.75", *WINDOW]
    return run_worker(out, *args, "--max-epochs", "2")


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result]:
    # accumulate_grad_batches=2: 5 optimizer steps per epoch and rank, 15 in 3 epochs; the end is
    # given as a fraction of Lightning's step estimate: 0.8 * 15 = step 12 (events 3, 6, 9, 12).
    out = tmp_path_factory.mktemp("ddp_snip_momentum")
    args = ["--criterion", "snip_momentum", "--pattern", "2:4", "--sparsity", "0.5"]
    window = ["--start", "0", "--end", "0.8", "--frequency", "3"]
    return run_worker(out, *args, *window, "--accumulate", "2", "--max-epochs", "3")


RESUME_ARGS = ["--criterion", "movement", "--pattern", "4x1", "--sparsity", "0.75"]
RESUME_WINDOW = ["--start", "0", "--end", "15", "--frequency", "5", "--max-epochs", "2"]  # 5, 10, 15


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result, Path]:
    """Movement pruning, 20 steps without a stop, saving a checkpoint at each epoch end."""
    out = tmp_path_factory.mktemp("ddp_movement")
    checkpoints = out / "checkpoints"
    rank0, rank1 = run_worker(out, *RESUME_ARGS, *RESUME_WINDOW, "--ckpt-dir", str(checkpoints))
    return rank0, rank1, checkpoints


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result]:
    out = tmp_path_factory.mktemp("ddp_rank_noise")
    return run_worker(out, "--rank-noise", "--pattern", "4x1", "--sparsity", "0.75", *WINDOW)


@pytest.fixture(scope="module")
def progressive_noise_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result]:
    # Progressive pruning plans each fade from the rank's own scores: the stages are broadcast too.
    out = tmp_path_factory.mktemp("ddp_rank_noise_progressive")
    args = ["--rank-noise", "--progressive", "3", "--pattern", "4x1", "--sparsity", "0.75", *WINDOW]
    return run_worker(out, *args)


# --------------------------------------------------------------------------------------------- tests
def test_magnitude_4x1_masks_agree_on_every_rank(magnitude_run: tuple[Result, Result]) -> None:
    rank0, rank1 = magnitude_run
    assert_ranks_agree(rank0, rank1, [3, 6, 9, 12])
    assert_ranks_chose_alike(rank0, rank1)
    assert rank0["global_step"] == 20
    assert_reaches(rank0, 0.75)
    # The end-of-fit report is written once, by rank 0.
    assert sorted(rank0["written"]) == ["curve.csv", "curve.png", "layers.csv"]
    assert rank1["written"] == []


def test_snip_momentum_2_4_scores_come_from_reduced_gradients(
    accumulated_run: tuple[Result, Result],
) -> None:
    rank0, rank1 = accumulated_run
    assert_ranks_agree(rank0, rank1, [3, 6, 9, 12])
    # Scores accumulate |W * G| with G all-reduced: equal on both ranks after every step (checked in
    # assert_ranks_agree), non-zero, and each rank alone already picks rank 0's masks.
    assert all(b is not None for step in rank0["steps"] for b in step["buffers"])
    assert rank0["steps"][-1]["buffers"] != rank0["steps"][0]["buffers"]
    assert_ranks_chose_alike(rank0, rank1)
    assert_reaches(rank0, 0.5)


def test_gradient_accumulation_under_ddp_prunes_at_optimizer_steps(
    accumulated_run: tuple[Result, Result],
) -> None:
    rank0, rank1 = accumulated_run
    batches_per_epoch = 10
    for result in (rank0, rank1):
        assert result["global_step"] == 15
        assert result["final"]["step"] == 15
        # Scores were folded in once per optimizer step, not per micro-batch.
        assert [s["step"] for s in result["steps"]] == list(range(16))
        for record in result["records"]:
            # The event of step s comes on the batch that completes the s-th accumulation: batch 2s.
            batch_number = record["epoch"] * batches_per_epoch + record["batch_idx"] + 1
            assert batch_number == 2 * record["event_step"], record
    assert [(r["epoch"], r["batch_idx"]) for r in rank0["records"]] == [(0, 5), (1, 1), (1, 7), (2, 3)]


def assert_noise_overridden(rank0: Result, rank1: Result, broadcasts_per_event: int) -> list[Any]:
    """Scores differ by rank, each rank alone chose other tensors, and all got rank 0's."""
    # The noise is real: every score the criterion returned differs between the ranks ...
    assert len(rank0["scores"]) == len(rank1["scores"]) == 2 * 4  # 2 layers x 4 events
    for a, b in zip(rank0["scores"], rank1["scores"], strict=True):
        assert a != b
    # ... so each rank on its own chose other masks, and the broadcast replaced rank 1's by rank 0's.
    sent = [(a, b) for a, b in zip(rank0["broadcasts"], rank1["broadcasts"], strict=True) if a["before"]]
    assert len(sent) == broadcasts_per_event * 4
    for a, b in sent:
        assert all(x != y for x, y in zip(a["before"], b["before"], strict=True))
        assert a["after"] == a["before"] == b["after"]
    return sent


def test_rank_dependent_scores_still_give_rank_zero_masks_everywhere(
    noise_run: tuple[Result, Result],
) -> None:
    rank0, rank1 = noise_run
    keeps = assert_noise_overridden(rank0, rank1, broadcasts_per_event=1)
    # Hence identical masks and weights on both ranks at every event and step.
    assert_ranks_agree(rank0, rank1, [3, 6, 9, 12])
    assert [r["masks"] for r in rank0["records"]] == [a["after"] for a, _ in keeps]
    assert_reaches(rank0, 0.75)


def test_rank_dependent_scores_give_the_same_progressive_fade_everywhere(
    progressive_noise_run: tuple[Result, Result],
) -> None:
    rank0, rank1 = progressive_noise_run
    # Per event: the structured masks, then the fade stages (ordered by each rank's own scores).
    assert_noise_overridden(rank0, rank1, broadcasts_per_event=2)
    # The same masks on both ranks after every step of every fade (checked in assert_ranks_agree),
    # and the masks do move during the fades: 3 steps each, from the event's step.
    assert_ranks_agree(rank0, rank1, [3, 6, 9, 12])
    changes = [b["step"] for a, b in itertools.pairwise(rank0["steps"]) if a["masks"] != b["masks"]]
    assert changes == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert_reaches(rank0, 0.75)


def test_rank_dependent_scores_with_erk_and_regrowth_give_rank_zero_masks_everywhere(
    tmp_path: Path,
) -> None:
    # Regrowth picks from the (reduced) gradients after each rank's own selection: rank 0's wins.
    options = ["--allocation", "erk", "--regrow", "0.3"]
    rank0, rank1 = run_worker(
        tmp_path, "--rank-noise", "--pattern", "4x1", "--sparsity", "0.75", *options, *WINDOW
    )
    assert_noise_overridden(rank0, rank1, broadcasts_per_event=1)
    assert_ranks_agree(rank0, rank1, [3, 6, 9, 12])
    assert_reaches(rank0, 0.75)


def test_movement_masks_agree_and_reach_target(straight_run: tuple[Result, Result, Path]) -> None:
    rank0, rank1, _ = straight_run
    assert_ranks_agree(rank0, rank1, [5, 10, 15])
    assert_ranks_chose_alike(rank0, rank1)
    assert rank0["global_step"] == 20
    assert_reaches(rank0, 0.75)


def test_resume_under_ddp_matches_uninterrupted_run(
    straight_run: tuple[Result, Result, Path], tmp_path: Path
) -> None:
    straight0, straight1, checkpoints = straight_run
    # The checkpoint at the end of epoch 0 is mid-schedule: events 5 and 10 done, 15 to come.
    checkpoint = checkpoints / "epoch=0.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("PruningCallback")]
    assert state["step"] == 10 and [e["step"] for e in state["events"]] == [5, 10]
    assert all(buffer.abs().sum() > 0 for buffer in state["buffers"].values())  # movement scores

    # The uninterrupted run's own epoch-end checkpoint is what a run stopped there would have saved;
    # everything after it is thrown away and trained again from it.
    resumed0, resumed1 = run_worker(tmp_path, *RESUME_ARGS, *RESUME_WINDOW, "--ckpt-path", str(checkpoint))
    assert_ranks_agree(resumed0, resumed1, [15])
    assert [s["step"] for s in resumed0["steps"]] == list(range(11, 21))
    for resumed, straight in ((resumed0, straight0), (resumed1, straight1)):
        assert resumed["global_step"] == straight["global_step"] == 20
        (new_event,) = resumed["records"]
        (same_event,) = [r for r in straight["records"] if r["event_step"] == 15]
        for key in ("masks", "weights", "buffers", "sparsity", "target_sparsity"):
            assert new_event[key] == same_event[key], key
        assert resumed["steps"] == straight["steps"][-10:]
        assert resumed["final"] == straight["final"]


def test_snip_at_init_scores_on_reduced_gradients(tmp_path: Path) -> None:
    # One-shot at step 0: the callback scores one batch per rank through the DDP-wrapped
    # training_step before the first optimizer step; the backward all-reduces the gradients.
    args = ["--criterion", "snip", "--pattern", "4x1", "--sparsity", "0.75", "--start", "0", "--end", "0"]
    rank0, rank1 = run_worker(tmp_path, *args, "--max-epochs", "1")
    assert_ranks_agree(rank0, rank1, [0])
    assert_ranks_chose_alike(rank0, rank1)
    assert_reaches(rank0, 0.75)


def test_callback_added_to_a_dense_checkpoint_catches_up_alike_on_every_rank(tmp_path: Path) -> None:
    # A dense run's epoch-0 checkpoint (step 10), resumed with a gradient criterion: the catch-up event
    # at step 10 scores on reduced gradients before the first step, then the schedule goes on.
    checkpoints = tmp_path / "dense" / "checkpoints"
    run_worker(tmp_path / "dense", *RESUME_WINDOW, "--dense", "--ckpt-dir", str(checkpoints))
    args = ["--criterion", "snip_momentum", "--pattern", "4x1", "--sparsity", "0.75", *RESUME_WINDOW]
    rank0, rank1 = run_worker(tmp_path / "pruned", *args, "--ckpt-path", str(checkpoints / "epoch=0.ckpt"))
    assert_real_ddp(rank0, rank1)
    for result in (rank0, rank1):
        assert [e["step"] for e in result["final"]["events"]] == [10, 15]
        assert result["global_step"] == result["final"]["step"] == 20
    assert rank0["final"]["masks"] == rank1["final"]["masks"]
    assert rank0["final"]["weights"] == rank1["final"]["weights"]
    assert_reaches(rank0, 0.75)


def test_heads_and_ffn_units_under_ddp_are_rank_zeros_whole_units_everywhere(tmp_path: Path) -> None:
    # One nn.TransformerEncoderLayer (4 heads, 32 FFN units), head+ffn pattern, local scope, scores
    # |W| plus rank-dependent noise: each rank alone would remove other heads and units.
    args = ["--model", "transformer", "--rank-noise", "--pattern", "head+ffn", "--scope", "local"]
    rank0, rank1 = run_worker(tmp_path, *args, "--sparsity", "0.5", *WINDOW)
    assert_ranks_agree(rank0, rank1, [3, 6, 9, 12])
    sent = [(a, b) for a, b in zip(rank0["broadcasts"], rank1["broadcasts"], strict=True) if a["before"]]
    assert len(sent) == 4  # one per event
    for a, b in sent:
        assert a["before"] != b["before"]
        assert a["after"] == a["before"] == b["after"]
    # Whole units (the worker checks every mask with the coupling's own check): half of each kind.
    assert rank0["final"]["units"] == rank1["final"]["units"]
    heads, units = sorted(rank0["final"]["units"])  # "net.2.self_attn" sorts before "net.2:"
    assert units == "net.2: 32 -> 16 units (16 pruned)"
    assert heads.startswith("net.2.self_attn: 4 -> 2 heads")

"""Intel Neural Compressor 3.7.1's pruner on the benchmark's tasks, in its own virtual environment.

INC 3.7.1 needs numpy<2, so it lives in ``benchmarks/.venv-inc`` (``bash benchmarks/setup_inc.sh``)
and this file runs there as a subprocess, with the repository and ``benchmarks/`` on ``PYTHONPATH``
so that it imports the same task code (``quality.tasks``). INC drives pruning from a plain loop:
``prepare_pruning(model, WeightPruningConfig(...), optimizer=opt)`` hooks the model's forward
(``on_step_begin``) and wraps ``opt.step`` (``on_before_optimizer_step`` / ``on_after_optimizer_step``).
The loop here is the Lightning arms' loop written out: the same network built under the same seed,
batch ``i`` of the same stream at step ``i``, the task's Adam, ``zero_grad`` / ``backward`` /
``step`` and the same number of steps. A dense run in this loop comes first, as a check that the
plain loop trains like the Lightning one.

The parent (``bench_quality.py``) calls :func:`run_inc_arms`; the subprocess entry point is
``main``, which reads a JSON request and writes a JSON answer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
INC_PYTHON = REPO / "benchmarks" / ".venv-inc" / "bin" / "python"
INC_VERSION = "3.7.1"


# ---------------------------------------------------------------------------------------- parent side
def inc_status(python: Path = INC_PYTHON) -> tuple[bool, str]:
    """Whether INC's venv exists and has INC 3.7.1 installed, and a line that says so or why not."""
    if not python.exists():
        return (
            False,
            f"INC arm skipped: {python.relative_to(REPO)} does not exist (run `bash benchmarks/setup_inc.sh`)",
        )
    # Metadata only: importing INC takes seconds; an import failure shows as a failed arm instead.
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, importlib.util as u; "
            "assert u.find_spec('neural_compressor'), 'neural_compressor is not installed'; "
            "print(m.version('neural-compressor'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"INC arm skipped: its venv has no neural_compressor: {last}"
    version = probe.stdout.strip().splitlines()[-1]
    if version != INC_VERSION:
        return False, f"INC arm skipped: the venv has neural_compressor {version}, not {INC_VERSION}"
    return True, f"INC arm: neural_compressor {version} in {python.relative_to(REPO)}"


def run_inc_arms(request: dict[str, Any], python: Path = INC_PYTHON) -> dict[str, Any]:
    """Run the INC arms of ``request`` in INC's venv and return its answer.

    Args:
        request: ``task``, ``size``, ``seed``, ``steps``, ``threads``, ``layers`` (module names
            to prune), ``schedule`` (``start``, ``end``, ``frequency``, ``curve``) and ``arms``
            (dicts with ``criterion``, ``pattern``, ``target``).
        python: the venv's interpreter.

    Returns:
        ``{"dense": {...}, "arms": [{"metrics", "sparsity", "fit_s", "event_steps", "error"}, ...]}``.

    Raises:
        RuntimeError: when the subprocess fails as a whole, with its stderr's tail.
    """
    with tempfile.TemporaryDirectory() as folder:
        request_path, answer_path = Path(folder) / "request.json", Path(folder) / "answer.json"
        request_path.write_text(json.dumps(request))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks")])
        if request.get("threads"):
            env["OMP_NUM_THREADS"] = str(request["threads"])
        done = subprocess.run(
            [str(python), str(Path(__file__).resolve()), str(request_path), str(answer_path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0 or not answer_path.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"INC subprocess exited with {done.returncode}:\n{tail}")
        return json.loads(answer_path.read_text())


# ---------------------------------------------------------------------------------------- subprocess side
def train(task: Any, seed: int, device: torch.device, config: Any | None) -> dict[str, Any]:
    """Train ``task`` under ``seed`` in a plain loop, pruned by INC when ``config`` is given."""
    from torch import nn

    torch.manual_seed(seed)
    net: nn.Module = task.build().to(device)
    optimizer = task.optimizer(net)
    pruning = None
    if config is not None:
        from neural_compressor.training import prepare_pruning

        pruning = prepare_pruning(net, config, optimizer=optimizer)
        pruner = pruning.pruners[0]
    events: list[int] = []
    started = time.perf_counter()
    for step in range(task.steps):
        x, y = task.batch(step)
        optimizer.zero_grad()
        before = None if pruning is None else float(pruner.current_sparsity_ratio)
        loss = task.loss(net, (x.to(device), y.to(device)))  # the forward runs INC's on_step_begin
        if pruning is not None and float(pruner.current_sparsity_ratio) != before:
            events.append(step)  # INC pruned before this step's forward: after `step` optimizer steps
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - started
    if pruning is not None:
        net.inc_hook_handle.remove()  # evaluation forwards must not step INC's pruner
    net.eval()
    return {"net": net, "metrics": task.evaluate(net), "fit_s": fit_s, "event_steps": events}


def sparsity_of(net: Any, layers: list[str]) -> float:
    """Fraction of exact zeros over the ``weight`` of the named modules."""
    modules = dict(net.named_modules())
    zeros = sum(int((modules[name].weight == 0).sum()) for name in layers)
    return zeros / sum(modules[name].weight.numel() for name in layers)


def main(argv: list[str]) -> None:
    """Subprocess entry: ``inc_arm.py REQUEST.json ANSWER.json``."""
    import re

    from neural_compressor.training import WeightPruningConfig

    from quality.tasks import make_task

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("request", type=Path)
    parser.add_argument("answer", type=Path)
    args = parser.parse_args(argv)
    request = json.loads(args.request.read_text())
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    task = make_task(request["task"], request["size"], request["seed"], request["steps"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    schedule = request["schedule"]
    dense = train(task, request["seed"], device, None)
    answer: dict[str, Any] = {
        "dense": {"metrics": dense["metrics"], "fit_s": dense["fit_s"]},
        "arms": [],
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    for arm in request["arms"]:
        try:
            # Fresh lists every time: INC appends the head's name to excluded_op_names in place.
            config = WeightPruningConfig(
                pruning_configs=[{}],
                target_sparsity=arm["target"],
                pruning_type=arm["criterion"],
                pattern=arm["pattern"],
                op_names=[f"^{re.escape(name)}$" for name in request["layers"]],
                excluded_op_names=[],
                start_step=schedule["start"],
                end_step=schedule["end"],
                pruning_frequency=schedule["frequency"],
                sparsity_decay_type=schedule["curve"],
                pruning_scope="global",
                min_sparsity_ratio_per_op=0.0,
                max_sparsity_ratio_per_op=0.98,
                pruning_op_types=["Conv", "Linear"],
            )
            run = train(task, request["seed"], device, config)
            answer["arms"].append(
                {
                    "metrics": run["metrics"],
                    "sparsity": sparsity_of(run["net"], request["layers"]),
                    "fit_s": run["fit_s"],
                    "event_steps": run["event_steps"],
                    "error": None,
                }
            )
        except Exception as error:  # reported per arm, with its traceback's last lines, not hidden
            lines = traceback.format_exception(error)
            answer["arms"].append(
                {"error": f"{type(error).__name__}: {error} | {''.join(lines[-3:]).strip()}"}
            )
    tmp = args.answer.with_suffix(".tmp")
    tmp.write_text(json.dumps(answer))
    os.replace(tmp, args.answer)


if __name__ == "__main__":
    main(sys.argv[1:])

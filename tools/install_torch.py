"""Install torch for ``make`` only when none is installed, preferring the CPU build on a machine without
an NVIDIA GPU.

    python tools/install_torch.py --torch "torch==2.13.0" [--cpu-index URL] [--dry-run]

What it does, in order:

1. torch is already installed (any build, GPU included): nothing; it is kept.
2. Linux without an NVIDIA GPU (no ``nvidia-smi``, no ``/proc/driver/nvidia/gpus``): if the CPU wheel
   index (``--cpu-index``, default the PyTorch project's) answers within ``--probe-timeout`` seconds,
   ``pip install --index-url <cpu-index> <torch>``; if it does not answer, or that install fails,
   ``pip install <torch>`` from pip's configured index (on Linux x86_64 PyPI's torch is the CUDA build).
3. Otherwise (an NVIDIA GPU, macOS, Windows; or ``--cpu-index ''``): ``pip install <torch>`` from
   pip's configured index.

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Seconds to wait for the CPU index before falling back (pip's own default here is 180 s with retries).
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Attempt:
    """One pip command and why it is tried."""

    why: str
    command: list[str]


def torch_installed() -> bool:
    """Whether ``import torch`` would find a package, without importing it (that takes seconds)."""
    return importlib.util.find_spec("torch") is not None


def nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU with its driver loaded."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether ``url`` answers with any HTTP status within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # URLError, refused, DNS failure, timeout; a malformed URL
        return False


def plan(
    torch: str,
    *,
    installed: bool,
    system: str,
    gpu: bool,
    cpu_index: str,
    probe: Callable[[str], bool],
    python: str = sys.executable,
) -> tuple[str, list[Attempt]]:
    """What to say and which pip commands to try, first success wins; ``probe`` runs only if needed."""
    pip = [python, "-m", "pip", "install"]
    if installed:
        return "torch is installed: kept, nothing to do", []
    default = Attempt(f"{torch} from pip's configured index", [*pip, torch])
    if system != "Linux" or gpu or not cpu_index:
        reason = (
            "an NVIDIA GPU"
            if gpu
            else ("no CPU index asked for" if not cpu_index else f"{system}: PyPI's build has no CUDA")
        )
        return f"no torch installed; {reason}", [default]
    if not probe(cpu_index):
        return (
            f"no torch installed, no NVIDIA GPU; {cpu_index} could not be reached (gave up after at most {PROBE_TIMEOUT:g} s)",
            [default],
        )
    cpu = Attempt(f"{torch} (CPU build) from {cpu_index}", [*pip, "--index-url", cpu_index, torch])
    return f"no torch installed, no NVIDIA GPU; {cpu_index} answers", [cpu, default]


def main(argv: Sequence[str] | None = None, run: Callable[[list[str]], int] | None = None) -> int:
    """Print the decision, run the attempts until one succeeds; the exit status of the last one."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--torch", default="torch", help="pip requirement, e.g. torch==2.13.0")
    parser.add_argument("--cpu-index", default=CPU_INDEX, help="CPU wheel index; '' to use pip's index only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args(argv)
    run = run or (lambda command: subprocess.run(command, check=False).returncode)
    summary, attempts = plan(
        args.torch,
        installed=torch_installed(),
        system=platform.system(),
        gpu=nvidia_gpu(),
        cpu_index=args.cpu_index,
        probe=reachable,
    )
    print(f"install_torch: {summary}", flush=True)
    status = 0
    for index, attempt in enumerate(attempts):
        print(f"install_torch: {attempt.why}: {' '.join(attempt.command)}", flush=True)
        if args.dry_run:
            continue
        status = run(attempt.command)
        if status == 0:
            return 0
        if index + 1 < len(attempts):
            print(f"install_torch: that failed (exit {status}); falling back", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

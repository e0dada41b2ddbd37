"""Each benchmark owns one section of ``RESULTS.md``, between its own start and end markers.

The tracked results (``benchmarks/RESULTS.md`` and the CSVs and plots beside it) change only when a
run asks with ``--write-results``; otherwise a run writes to a scratch copy under ``runs/benchmarks/``
(ignored by git) and prints its section, so trying a benchmark leaves the checkout as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from pathlib import Path

from lightning_prune.files import write_atomically

HEADER = (
    "# Benchmark results\n\nEach section below is written by the script it names; "
    "rerun it with `--write-results` to refresh it.\n"
)
#: The tracked results file.
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: Where runs without ``--write-results`` write, one folder per script (``runs/`` is git-ignored).
SCRATCH = Path(__file__).resolve().parent.parent / "runs" / "benchmarks"


def add_output_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """``--write-results`` and ``--output`` for ``script``; :func:`output_path` reads them back."""
    parser.add_argument(
        "--write-results",
        action="store_true",
        help="update the tracked benchmarks/RESULTS.md (and any CSV or plot beside it)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"results markdown to update, files beside it (default: {scratch_file(script)}, "
        "or benchmarks/RESULTS.md with --write-results)",
    )


def scratch_file(script: str) -> Path:
    """The scratch results file of ``script`` (relative to the repository for messages)."""
    return SCRATCH / script / "RESULTS.md"


def output_path(args: argparse.Namespace, script: str) -> Path:
    """``--output`` if given, else the tracked file with ``--write-results``, else the scratch file."""
    if args.output is not None:
        return args.output
    return RESULTS if args.write_results else scratch_file(script)


def write_section(path: Path, start: str, end: str, text: str) -> None:
    """Replace the section between ``start`` and ``end`` in ``path`` (or append it), atomically.

    The file is read right before the write so that another script's section is kept.
    """
    old = path.read_text() if path.exists() else HEADER
    section = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + section + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    write_atomically(path, new)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()

"""Each benchmark owns one section of ``RESULTS.md``, between its own start and end markers."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

from lightning_prune.files import write_atomically

HEADER = "# Benchmark results\n\nEach section: the command, the machine, the numbers.\n"


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

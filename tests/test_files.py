"""Atomic report writes: whole files or none, with the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import lightning_prune.files as files
from lightning_prune.files import write_atomically


def test_writes_text_and_bytes_creating_folders(tmp_path: Path) -> None:
    write_atomically(tmp_path / "a" / "b.csv", "x,y\n")
    write_atomically(tmp_path / "a" / "c.png", b"\x89PNG")
    assert (tmp_path / "a" / "b.csv").read_text() == "x,y\n"
    assert (tmp_path / "a" / "c.png").read_bytes() == b"\x89PNG"


def test_file_mode_follows_the_umask_not_mkstemps_private_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "r.md", "text")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "curve.csv"
    write_atomically(target, "old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.csv"]

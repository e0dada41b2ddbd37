"""tools/install_torch.py: a user's torch is kept; the CPU build is preferred without an NVIDIA GPU; an
unreachable CPU index falls back to pip's own index after a bounded wait."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "install_torch.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["install_torch"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tool = _load()
CPU = "https://download.pytorch.org/whl/cpu"


def _probe(answer: bool, asked: list[str]) -> Any:
    def probe(url: str) -> bool:
        asked.append(url)
        return answer

    return probe


def _plan(**kwargs: Any) -> tuple[str, list[list[str]], list[str]]:
    asked: list[str] = []
    settings = {"installed": False, "system": "Linux", "gpu": False, "cpu_index": CPU, "python": "py"}
    settings.update(kwargs)
    answer = settings.pop("reachable", True)
    summary, attempts = tool.plan("torch==2.13.0", probe=_probe(answer, asked), **settings)
    return summary, [a.command for a in attempts], asked


def test_an_installed_torch_is_kept_and_nothing_is_probed() -> None:
    summary, commands, asked = _plan(installed=True, gpu=True)
    assert (commands, asked) == ([], [])
    assert "kept" in summary


def test_linux_without_gpu_prefers_the_cpu_index_then_falls_back_to_pip_index() -> None:
    _, commands, asked = _plan()
    assert asked == [CPU]
    assert commands == [
        ["py", "-m", "pip", "install", "--index-url", CPU, "torch==2.13.0"],
        ["py", "-m", "pip", "install", "torch==2.13.0"],
    ]


def test_unreachable_cpu_index_goes_straight_to_pip_index() -> None:
    summary, commands, asked = _plan(reachable=False)
    assert asked == [CPU]
    assert commands == [["py", "-m", "pip", "install", "torch==2.13.0"]]
    assert "could not be reached" in summary


@pytest.mark.parametrize(
    ("settings", "reason"),
    [({"gpu": True}, "NVIDIA GPU"), ({"system": "Darwin"}, "Darwin"), ({"cpu_index": ""}, "no CPU index")],
)
def test_gpu_other_systems_and_an_empty_index_use_pip_index_without_probing(
    settings: dict[str, Any], reason: str
) -> None:
    summary, commands, asked = _plan(**settings)
    assert (commands, asked) == ([["py", "-m", "pip", "install", "torch==2.13.0"]], [])
    assert reason in summary


def test_main_falls_back_when_the_cpu_install_fails(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(tool, "torch_installed", lambda: False)
    monkeypatch.setattr(tool, "nvidia_gpu", lambda: False)
    monkeypatch.setattr(tool.platform, "system", lambda: "Linux")
    monkeypatch.setattr(tool, "reachable", lambda url: True)
    ran: list[list[str]] = []

    def pip(command: list[str]) -> int:
        ran.append(command)
        return 1 if "--index-url" in command else 0

    assert tool.main(["--torch", "torch==2.13.0"], run=pip) == 0
    assert [("--index-url" in c) for c in ran] == [True, False]
    assert "falling back" in capsys.readouterr().out


def test_main_fails_when_every_attempt_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tool, "torch_installed", lambda: False)
    monkeypatch.setattr(tool, "nvidia_gpu", lambda: True)
    assert tool.main(["--torch", "torch==2.13.0"], run=lambda command: 3) == 3


def test_probe_is_bounded_by_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe passes a timeout of a few seconds (pip would wait 180 s with retries here)."""
    seen: list[float] = []

    def urlopen(request: urllib.request.Request, timeout: float) -> Any:
        seen.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(tool.urllib.request, "urlopen", urlopen)
    assert tool.reachable(CPU) is False
    assert seen == [tool.PROBE_TIMEOUT] and 0 < tool.PROBE_TIMEOUT <= 5


def test_probe_of_a_closed_port_is_false() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert tool.reachable(f"http://127.0.0.1:{port}/whl/cpu") is False


@pytest.mark.subprocess
def test_dry_run_without_torch_names_the_case_and_the_command() -> None:
    """``python -S`` leaves site-packages off the path: the tool then sees no torch, as in a fresh venv."""
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--torch", "torch==2.13.0", "--dry-run", "--cpu-index", ""],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "install_torch: no torch installed; no CPU index asked for"
    assert lines[1].endswith("-m pip install torch==2.13.0")

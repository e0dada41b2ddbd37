"""Smoke tests of benchmarks/bench_quality.py: it runs and writes its table, CSV and plot.

Accuracy and timing are never asserted: the quick size trains for a few steps only.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "bench_quality.py"
sys.path.insert(0, str(BENCHMARKS))

import bench_quality  # noqa: E402
from quality.arms import Arm, quick_arms  # noqa: E402
from quality.inc_arm import INC_PYTHON, inc_status  # noqa: E402
from quality.report import Summary, per_seed_lead, target_checks  # noqa: E402


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the script in a fresh interpreter on one thread (the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False
    )


def table_rows(text: str) -> list[list[str]]:
    """Cells of the main results table in the section (rows that start with a task name)."""
    section = text[text.index(bench_quality.START_MARKER) : text.index(bench_quality.END_MARKER)]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row] for row in rows if len(row) == 9 and row[0].strip() in ("digits", "gpt")]


@pytest.mark.bench
def test_quick_run_writes_table_csv_and_plot(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    other = "<!-- bench_export:start -->\nanother script's section\n<!-- bench_export:end -->\n"
    output.write_text(f"# Kept header\n\n{other}")

    done = run_script("--quick", "--no-inc", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]

    text = output.read_text()
    assert text.startswith(f"# Kept header\n\n{other}"), "other sections are kept"
    assert text.count(bench_quality.START_MARKER) == 1 and text.count(bench_quality.END_MARKER) == 1
    assert "Command: `python benchmarks/bench_quality.py --quick --no-inc" in text
    arms = quick_arms(inc=False)
    rows = table_rows(text)
    assert len(rows) == 2 * len(arms)
    assert {(r[0], r[3]) for r in rows} == {(t, a.pattern) for t in ("digits", "gpt") for a in arms}
    assert not any(r[6].startswith("failed") for r in rows)

    with (tmp_path / bench_quality.CSV_NAME).open() as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 2 * len(arms)
    assert set(records[0]) >= {"task", "arm", "sparsity", "metric", "value", "fit_s", "error"}
    assert {r["arm"] for r in records} == {a.name for a in arms}
    assert all(r["error"] == "" and not math.isnan(float(r["value"])) for r in records)

    from matplotlib.image import imread

    image = imread(tmp_path / bench_quality.PNG_NAME)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary file"

    # The plot can be redrawn from the CSV alone.
    (tmp_path / bench_quality.PNG_NAME).unlink()
    bench_quality.main(["--replot", str(tmp_path / bench_quality.CSV_NAME), "--output", str(output)])
    assert imread(tmp_path / bench_quality.PNG_NAME).ndim == 3


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--tasks", "digits,mnist"], "--tasks"),
        (["--seeds", "0,x"], "--seeds"),
        (["--arms", "ours/("], "--arms"),
        (["--threads", "0"], "--threads"),
        (["--steps", "0"], "--steps"),
        (["--jobs", "0"], "--jobs"),
        (["--label", "Has Space"], "--label"),
    ],
)
def test_bad_arguments_fail_early_naming_the_argument(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench_quality.parse_args(args)
    assert named in capsys.readouterr().err


def summary(method: str, pattern: str, value: float, sparsity: float, target: float = 0.5) -> Summary:
    """A GPT row with dense at 2.0."""
    arm = Arm(method, "magnitude", pattern, target) if method != "dense" else Arm("dense")
    return Summary("gpt", arm, "val_loss", value, sparsity, 1.0, value / 2.0 - 1.0, 0.0, 1, None)


def test_target_checks_say_met_missed_and_not_comparable() -> None:
    lines = target_checks(
        [
            summary("dense", "-", 2.0, 0.0),
            summary("ours", "2:4", 2.2, 0.5),  # +10%: misses the 5% target by 5 points
            summary("inc", "2:4", 2.1, 0.5),  # INC better at the same sparsity: a miss
            summary("ours", "channelx1", 2.05, 0.5),
            summary("inc", "channelx1", 2.01, 0.42),  # INC stopped short of 50%
        ]
    )
    assert any("2:4 within 5%" in line and "missed by 5.00% points" in line for line in lines)
    assert any("GPT 2:4: best of ours" in line and "missed: ours is" in line for line in lines)
    assert any("GPT channelx1" in line and "not comparable" in line and "42.0%" in line for line in lines)


def test_replace_section_keeps_the_rest() -> None:
    start, end = bench_quality.START_MARKER, bench_quality.END_MARKER
    text = f"head\n{start}\nold\n{end}\ntail\n"
    assert (
        bench_quality.replace_section(text, f"{start}\nnew\n{end}\n") == f"head\n{start}\nnew\n{end}\ntail\n"
    )
    assert bench_quality.replace_section("head\n", "S").endswith("head\n\nS\n")


@pytest.mark.bench
@pytest.mark.skipif(not inc_status()[0], reason=f"INC venv missing or broken: {inc_status()[1]}")
def test_inc_arm_runs_in_its_venv(tmp_path: Path) -> None:
    done = run_script("--quick", "--tasks", "digits", "--arms", "^inc/", "--output", str(tmp_path / "R.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows((tmp_path / "R.md").read_text())
    assert [r[1] for r in rows] == ["dense", "INC 3.7.1"]
    assert not rows[1][6].startswith("failed"), rows[1][6]
    assert INC_PYTHON.exists()


@pytest.mark.bench
def test_steps_and_jobs_give_the_gpt_budget_and_the_serial_results(tmp_path: Path) -> None:
    args = ("--quick", "--no-inc", "--tasks", "gpt", "--arms", "^ours/magnitude/1x1$", "--steps", "7")
    serial = run_script(*args, "--output", str(tmp_path / "one" / "R.md"))
    parallel = run_script(*args, "--jobs", "2", "--output", str(tmp_path / "two" / "R.md"))
    assert serial.returncode == 0 and parallel.returncode == 0, (serial.stderr + parallel.stderr)[-3000:]
    one, two = ((tmp_path / d / "R.md").read_text() for d in ("one", "two"))
    assert "7 steps" in one and "7 steps" in two
    assert [r[6] for r in table_rows(one)] == [r[6] for r in table_rows(two)]  # same numbers, any worker
    assert "| `ours/magnitude/1x1` |" in two and "lead >= 0.5% on" in two


def test_per_seed_lead_compares_each_seed_with_that_seeds_best_peer() -> None:
    def row(arm: str, method: str, seed: int, value: float) -> dict[str, object]:
        return {
            "task": "gpt",
            "arm": arm,
            "method": method,
            "pattern": "1x1",
            "seed": seed,
            "value": value,
            "error": "",
        }

    rows = [
        row("modelpruning/l1/1x1", "modelpruning", 0, 2.00),
        row("inc/magnitude/1x1", "inc", 0, 1.98),
        row("modelpruning/l1/1x1", "modelpruning", 1, 2.10),
        row("inc/magnitude/1x1", "inc", 1, 2.20),
        row("ours/magnitude/1x1", "ours", 0, 1.96),  # 1.0% below INC's 1.98
        row("ours/magnitude/1x1", "ours", 1, 2.095),  # only 0.24% below ModelPruning's 2.10
    ]
    text = per_seed_lead(rows)
    line = next(x for x in text.splitlines() if x.startswith("| `ours/"))
    assert "-1.01%, -0.24%" in line and line.endswith("| 1/2 seeds |")
    assert "seed 0: `inc/magnitude/1x1` 1.9800, seed 1: `modelpruning/l1/1x1` 2.1000" in text


def test_a_label_writes_its_own_section_and_files_beside_the_default_ones() -> None:
    assert bench_quality.file_names(None) == ("quality_results.csv", "quality.png")
    assert bench_quality.file_names("long") == ("quality_long_results.csv", "quality_long.png")
    start, end = bench_quality.markers("long")
    default = f"{bench_quality.START_MARKER}\ndefault run\n{bench_quality.END_MARKER}\n"
    text = bench_quality.replace_section(default, f"{start}\nlong run\n{end}\n", "long")
    assert text.startswith(default) and f"{start}\nlong run\n{end}" in text  # appended, default kept
    again = bench_quality.replace_section(text, f"{start}\nrerun\n{end}\n", "long")
    assert again.startswith(default) and "long run" not in again and "rerun" in again

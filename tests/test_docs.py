"""Every fenced block of README.md, docs/ and benchmarks/README.md runs as written.

Blocks are tagged by language:

- ``python``: run as a script in a fresh folder (what a user pasting it gets);
- ``bash``: run with ``set -euo pipefail`` from the root of a scratch copy of the repository that is a
  git repository of its own, after which ``git status --porcelain`` there must be empty: documented
  commands change no tracked file and leave nothing untracked outside git-ignored folders (files the
  block itself redirects into with ``> NAME`` excepted);
- ``yaml``: parsed;
- ``text``: output or a picture, not code: never run.

An HTML comment right before a block adjusts that, in the markdown source where a reader can see it:
``<!-- doc-test: DIRECTIVE; DIRECTIVE -- reason -->`` with directives

- ``replace `OLD` with `NEW```: run with a substitution (short settings where the block's own would
  take minutes);
- ``expect `TEXT```: the output must contain TEXT;
- ``file NAME``: the block is a file the documented commands use: it is written to NAME in the
  scratch copy, and a later bash block of the same document must mention NAME;
- ``continue``: the block runs after the previous python block, in the same script;
- ``illustrative``: the block cannot run here (e.g. it needs a GPU): python is compiled and its
  imports run, bash is syntax-checked.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "benchmarks/README.md",
]
LANGUAGES = {"python", "bash", "yaml", "text", ""}  # "": untagged, read as text
FENCE = re.compile(r"^```(\S*)\s*$")
COMMENT = re.compile(r"^<!--\s*doc-test:(.*?)-->\s*$")
DIRECTIVES = [
    ("replace", re.compile(r"^replace `([^`]+)` with `([^`]*)`$")),
    ("expect", re.compile(r"^expect `([^`]+)`$")),
    ("file", re.compile(r"^file (\S+)$")),
    ("continue", re.compile(r"^continue$")),
    ("illustrative", re.compile(r"^illustrative$")),
]
TIMEOUT = 600


@dataclass
class Block:
    """A fenced block and the directives in the comments right before it."""

    doc: str
    line: int
    language: str
    code: str
    replace: list[tuple[str, str]] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    file: str | None = None
    continues: bool = False
    illustrative: bool = False

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.language}"

    def runnable(self) -> str:
        code = self.code
        for old, new in self.replace:
            assert old in code, f"{self.id}: replace `{old}`: not in the block"
            code = code.replace(old, new)
        return code


def parse_directives(text: str, where: str) -> dict[str, list[tuple[str, ...]]]:
    """``replace `a` with `b`; expect `c` -- why`` -> {"replace": [("a", "b")], "expect": [("c",)]}."""
    found: dict[str, list[tuple[str, ...]]] = {}
    for part in text.split(" -- ")[0].split(";"):
        part = part.strip()
        if not part:
            continue
        for name, pattern in DIRECTIVES:
            match = pattern.match(part)
            if match:
                found.setdefault(name, []).append(match.groups())
                break
        else:
            accepted = ", ".join(name for name, _ in DIRECTIVES)
            raise ValueError(f"{where}: doc-test directive {part!r} is not one of {accepted}")
    return found


def read_blocks(doc: str) -> list[Block]:
    """The fenced blocks of ``doc`` (relative to the repository), in order."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start = index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
        block = Block(doc, start + 1, opening.group(1), "\n".join(lines[start + 1 : end]) + "\n")
        above = start - 1
        while above >= 0 and COMMENT.match(lines[above]):
            directives = parse_directives(COMMENT.match(lines[above]).group(1), f"{doc}:{above + 1}")  # type: ignore[union-attr]
            block.replace += [(old, new) for old, new in directives.get("replace", [])]
            block.expect += [text for (text,) in directives.get("expect", [])]
            block.file = next((name for (name,) in directives.get("file", [])), block.file)
            block.continues |= "continue" in directives
            block.illustrative |= "illustrative" in directives
            above -= 1
        blocks.append(block)
        index = end + 1
    return blocks


BLOCKS = [block for doc in DOCS for block in read_blocks(doc)]
FILES = {block.file: block for block in BLOCKS if block.file}
REDIRECTS = {m for b in BLOCKS if b.language == "bash" for m in re.findall(r">\s*([\w./-]+)", b.runnable())}


def environment() -> dict[str, str]:
    """This interpreter's scripts first on PATH, so ``python``, ``make`` and ``lightning-prune`` are its."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's files (tracked and not ignored), committed in a git repository of its own,
    with the documents' ``file`` blocks written in."""
    copy = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    git = ["git", "-c", "user.name=doc-test", "-c", "user.email=doc-test@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "scratch copy"]):
        subprocess.run([*git, *command], cwd=copy, check=True, capture_output=True)
    for name, block in FILES.items():
        (copy / name).write_text(block.code)
    return copy


def porcelain(copy: Path) -> list[str]:
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True, check=True
    )
    allowed = set(FILES) | REDIRECTS
    return [line for line in status.stdout.splitlines() if line[3:] not in allowed]


def python_units() -> list[list[Block]]:
    """Python blocks to run, each with the blocks that continue it."""
    units: list[list[Block]] = []
    for block in BLOCKS:
        if block.language != "python" or block.file or block.illustrative:
            continue
        if block.continues:
            assert units and units[-1][-1].doc == block.doc, f"{block.id}: continues no python block"
            units[-1].append(block)
        else:
            units.append([block])
    return units


def test_every_block_is_tagged_with_a_known_language() -> None:
    untagged = [f"{b.id} ({b.language or 'no language'})" for b in BLOCKS if b.language not in LANGUAGES]
    assert not untagged, f"tag each block with one of {sorted(LANGUAGES)}: {untagged}"


def test_every_file_block_is_used_by_a_later_command() -> None:
    for name, block in FILES.items():
        later = [b for b in BLOCKS if b.doc == block.doc and b.line > block.line and b.language == "bash"]
        assert any(name in b.code for b in later), f"{block.id}: file {name} is used by no later bash block"


def test_every_documented_script_is_run() -> None:
    """Commands quoted inline (``python benchmarks/x.py ...``) name scripts that some bash block runs."""
    ran = " ".join(b.runnable() for b in BLOCKS if b.language == "bash" and not b.illustrative)
    quoted = {
        script
        for doc in DOCS
        for script in re.findall(r"\b((?:benchmarks|examples)/\w+\.(?:py|sh))\b", (ROOT / doc).read_text())
        if (ROOT / script).is_file()
    }
    assert quoted, "the documents name scripts"
    missing = sorted(s for s in quoted if s not in ran and not s.endswith("setup_inc.sh"))
    assert not missing, f"scripts named in the documents but run by no bash block: {missing}"


@pytest.mark.subprocess
@pytest.mark.parametrize("unit", python_units(), ids=lambda unit: unit[0].id)
def test_python_block_runs(unit: list[Block], tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text("\n".join(block.runnable() for block in unit))
    done = run([sys.executable, str(script)], tmp_path)
    assert done.returncode == 0, f"{unit[0].id} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    for block in unit:
        for text in block.expect:
            assert text in done.stdout, f"{block.id}: expected {text!r} in the output:\n{done.stdout[-3000:]}"


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.language == "bash" and not b.illustrative], ids=lambda b: b.id
)
def test_bash_block_runs_and_leaves_the_checkout_clean(block: Block, scratch: Path) -> None:
    assert not porcelain(scratch), "the scratch copy is dirty before this block: an earlier block changed it"
    done = run(["bash", "-c", "set -euo pipefail\n" + block.runnable()], scratch)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    for text in block.expect:
        assert text in done.stdout + done.stderr, f"{block.id}: expected {text!r}:\n{done.stdout[-3000:]}"
    assert not porcelain(scratch), f"{block.id} changed the checkout: {porcelain(scratch)}"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.illustrative or b.language == "yaml"], ids=lambda b: b.id
)
def test_illustrative_and_yaml_blocks_compile(block: Block) -> None:
    if block.language == "yaml":
        assert yaml.safe_load(block.code) is not None, block.id
    elif block.language == "bash":
        subprocess.run(["bash", "-n", "-c", block.code], check=True)
    elif block.language == "python":
        tree = ast.parse(block.code, filename=block.id)
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        assert imports, f"{block.id}: an illustrative python block should at least import what it uses"
        exec(compile(ast.Module(body=imports, type_ignores=[]), block.id, "exec"), {})
    else:
        pytest.fail(f"{block.id}: an illustrative {block.language} block has no check")


def test_directives_are_checked() -> None:
    assert parse_directives(" replace `a` with `b`; expect `c` -- why ", "x") == {
        "replace": [("a", "b")],
        "expect": [("c",)],
    }
    with pytest.raises(ValueError, match=r"x: doc-test directive 'replce `a` with `b`' is not one of"):
        parse_directives("replce `a` with `b`", "x")

"""The package's docstring examples (``>>>``) run as written and print what they show.

Each docstring with an example is one test, run with the module's globals in a fresh folder (the
test's ``tmp_path``), so an example that writes files leaves nothing in the checkout.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import lightning_prune

# ``__main__`` runs the CLI when imported; it has no examples.
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lightning_prune.__path__, "lightning_prune.")
    if not info.name.endswith("__main__")
)
EXAMPLES = {
    test.name: test
    for name in ["lightning_prune", *MODULES]
    for test in doctest.DocTestFinder().find(importlib.import_module(name), name)
    if test.examples
}


def test_the_package_has_docstring_examples() -> None:
    # The examples named in the design's style guide: losing them all would pass the test below.
    assert {"lightning_prune.callback.PruningCallback", "lightning_prune.export.slim.slim"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_example_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    test = EXAMPLES[name]
    result = runner.run(test, out=report.append)
    assert result.attempted == len(test.examples)
    assert result.failed == 0, "".join(report)

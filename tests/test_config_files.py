"""The YAML presets in conf/ build the callback they describe; config spellings are accepted."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_prune import BlockPattern, NMPattern, PruningCallback, UnstructuredPattern

PRESETS = sorted((Path(__file__).parent.parent / "conf" / "pruning").glob("*.yaml"))


def test_presets_exist() -> None:
    assert {p.stem for p in PRESETS} >= {"magnitude_4x1", "magnitude_2of4", "magnitude_unstructured"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_the_callback(path: Path) -> None:
    config = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(config, dict)
    unknown = set(config) - set(inspect.signature(PruningCallback).parameters)
    assert not unknown, f"{path.name} has keys the callback does not take: {unknown}"
    callback = PruningCallback(**config)
    assert callback.options.target_sparsity == config["target_sparsity"]
    assert str(callback.options.pattern) == config["pattern"]


def test_the_full_preset_equals_the_defaults() -> None:
    config = OmegaConf.to_container(OmegaConf.load(PRESETS[[p.stem for p in PRESETS].index("magnitude_4x1")]))
    assert PruningCallback(**config).options == PruningCallback().options


def test_pattern_strings_parse_to_their_objects() -> None:
    assert PruningCallback(pattern="1x1").options.pattern == UnstructuredPattern()
    assert PruningCallback(pattern="4x1").options.pattern == BlockPattern(4, 1)
    assert PruningCallback(pattern=" 8X2 ").options.pattern == BlockPattern(8, 2)
    assert PruningCallback(pattern="2:4", target_sparsity=0.5).options.pattern == NMPattern(2, 4)
    # Objects pass through for extension, e.g. a max-reduced block.
    pattern = BlockPattern(4, 1, reduce="max")
    assert PruningCallback(pattern=pattern).options.pattern is pattern


def test_unquoted_n_m_in_yaml_gets_a_pointed_error() -> None:
    config = OmegaConf.to_container(OmegaConf.create("pattern: 2:4\ntarget_sparsity: 0.5"))
    assert config["pattern"] == 124  # YAML 1.1 base 60
    with pytest.raises(ValueError, match=r"pattern=124.*quote it.*\"2:4\""):
        PruningCallback(**config)


def test_config_style_values_are_accepted() -> None:
    # A config writes lists and single strings; both work for include/exclude and op_types.
    callback = PruningCallback(include="net\\..*", exclude=["head"], op_types=["Linear"])
    assert [r.pattern for r in callback.options.include] == ["net\\..*"]
    assert callback.options.op_types == ("Linear",)

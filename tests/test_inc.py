"""Intel Neural Compressor configs: read as INC 3.7.1's code reads them, refused by name where we differ
or lack the feature, and several entries pruning several groups in one run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TinyModule, make_trainer, tiny_loader, zero_fraction
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

import lightning_prune
from lightning_prune import (
    BlockPattern,
    MagnitudeCriterion,
    PruningCallback,
    SnipCriterion,
    SnipMomentumCriterion,
)
from lightning_prune.inc import callbacks_from_inc_config, inc_entries


def test_top_level_keys_are_every_entrys_defaults_and_inc_defaults_fill_the_rest() -> None:
    config = {
        "pruning_configs": [{"op_names": ["layer1.*"]}, {"op_names": ["layer2.*"], "target_sparsity": 0.5}],
        "target_sparsity": 0.8,
        "pattern": "2:4",
    }
    first, second = inc_entries(config)
    assert (first["target_sparsity"], first["pattern"]) == (0.8, "2:4")
    assert (second["target_sparsity"], second["pattern"]) == (0.5, "2:4")
    assert first["pruning_type"] == "snip_momentum" and first["start_step"] == first["end_step"] == 0


def test_the_same_config_twice_gives_the_same_callbacks() -> None:
    # INC 3.7.1 fills its shared default `pruning_configs=[{}]` in place, so a second config in the same
    # process keeps the first one's values instead of its own top-level keys; ours does not.
    first = callbacks_from_inc_config({"target_sparsity": 0.7})
    second = callbacks_from_inc_config({"target_sparsity": 0.6, "pattern": "1x1"})
    assert [c.options.target_sparsity for c in first + second] == [0.7, 0.6]
    assert str(second[0].options.pattern) == "1x1"


@pytest.mark.parametrize(
    ("pruning_type", "criterion", "progressive"),
    [
        ("magnitude", MagnitudeCriterion(), False),
        ("snip", SnipCriterion(alpha=0.0, beta=1.0), False),
        ("snip_momentum", SnipMomentumCriterion(alpha=0.9, beta=1.0), False),
        ("snip_momentum_progressive", SnipMomentumCriterion(alpha=0.9, beta=1.0), True),
    ],
)
def test_pruning_types_map_to_what_inc_computes(pruning_type: str, criterion: Any, progressive: bool) -> None:
    (callback,) = callbacks_from_inc_config(
        {"pruning_type": pruning_type, "start_step": 1, "end_step": 9, "pruning_frequency": 2}
    )
    assert callback.options.criterion == criterion
    assert (callback.options.progressive is not None) is progressive
    assert (callback.start_step, callback.end_step, callback.frequency) == (1, 9, 2)


def test_every_inc_key_reaches_its_counterpart() -> None:
    (callback,) = callbacks_from_inc_config(
        {
            "target_sparsity": 0.75,
            "pruning_type": "magnitude",
            "pattern": "channelx1",
            "op_names": ["encoder"],
            "excluded_op_names": ["head"],
            "pruning_scope": "local",
            "sparsity_decay_type": "cos",
            "pruning_op_types": ["Conv", "Linear"],
            "min_sparsity_ratio_per_op": 0.1,
            "max_sparsity_ratio_per_op": 0.9,
            "criterion_reduce_type": "max",
            "reg_type": "group_lasso",
            "parameters": {"reg_coeff": 0.01},
            "low_memory_usage": True,
        }
    )
    options = callback.options
    assert options.pattern == lightning_prune.ChannelPattern("input", reduce="max")
    assert [r.pattern for r in options.include] == ["encoder"] and [r.pattern for r in options.exclude] == [
        "head"
    ]
    assert options.scope == "local" and callback.sparsity_curve == "cos"
    assert options.op_types == ("Conv1d", "Conv2d", "Conv3d", "Conv1D", "Linear")
    assert (options.min_sparsity_per_layer, options.max_sparsity_per_layer) == (0.1, 0.9)
    assert options.regularizer == lightning_prune.GroupLasso(coeff=0.01)
    assert options.pattern != BlockPattern(4, 1)


@pytest.mark.parametrize(
    ("config", "parts"),
    [
        ({"prune_everything": True}, ("unknown key(s) ['prune_everything']",)),
        ({"pruning_configs": [{"patern": "4x1"}]}, ("pruning_configs[0]", "unknown key(s) ['patern']")),
        ({"pruning_type": "pattern_lock"}, ("pruning_type='pattern_lock'", "not supported")),
        ({"pruning_type": "sparse_gpt"}, ("pruning_type='sparse_gpt'", "not supported")),
        ({"pruning_type": "taylor"}, ("pruning_type='taylor'", "snip_momentum")),
        ({"resume_from_pruned_checkpoint": True}, ("resume_from_pruned_checkpoint", "ckpt_path")),
        ({"reg_type": "l1"}, ("reg_type='l1'", "group_lasso")),
        ({"backend": "onnxrt"}, ("backend='onnxrt'",)),
        ({"pattern": "5y3"}, ("pattern='5y3'",)),
        (
            {"pruning_configs": [{}, {"target_sparsity": 1.5}]},
            ("pruning_configs[1]", "target_sparsity=1.5"),
        ),
    ],
    ids=lambda value: str(value)[:40],
)
def test_unknown_keys_and_features_we_lack_are_refused_by_name(
    config: dict[str, Any], parts: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=".*".join(re.escape(p) for p in parts)):
        callbacks_from_inc_config(config)


def test_yaml_and_the_classmethod_read_the_same() -> None:
    yaml = OmegaConf.create(
        "target_sparsity: 0.8\npruning_configs:\n  - {op_names: ['net.0']}\n  - {op_names: ['net.2'], pattern: '1x1'}\n"
    )
    from_yaml = PruningCallback.from_inc_config(yaml, verbose=False)
    from_dict = callbacks_from_inc_config(OmegaConf.to_container(yaml), verbose=False)
    assert [c.options for c in from_yaml] == [c.options for c in from_dict]
    assert [c.name for c in from_yaml] == ["inc0", "inc1"]


# --------------------------------------------------------------------------- several groups in one run
@pytest.mark.slow
def test_two_entries_prune_two_groups_in_one_run_each_with_its_own_state(tmp_path: Path) -> None:
    config = {
        "pruning_type": "magnitude",
        "start_step": 0,
        "end_step": 6,
        "pruning_frequency": 2,
        "pruning_configs": [
            {"op_names": [r"net\.0$"], "target_sparsity": 0.5, "pattern": "1x1"},
            {"op_names": [r"net\.2$"], "target_sparsity": 0.75, "pattern": "4x1"},
        ],
    }
    callbacks = PruningCallback.from_inc_config(config, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = TinyModule()
    trainer = make_trainer([*callbacks, checkpoints], max_steps=8, enable_checkpointing=True)
    trainer.fit(model, tiny_loader())
    assert zero_fraction([model.net[0].weight]) == pytest.approx(0.5, abs=0.01)
    assert zero_fraction([model.net[2].weight]) == pytest.approx(0.75, abs=0.01)
    saved = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)
    assert {"PruningCallback[inc0]", "PruningCallback[inc1]"} <= set(saved["callbacks"])
    folders = sorted(p.name for p in (Path(trainer.log_dir) / "pruning").iterdir())
    assert folders == ["inc0", "inc1"]


def test_two_callbacks_on_the_same_layer_are_refused() -> None:
    callbacks = [
        PruningCallback(name="a", pattern="1x1", target_sparsity=0.5, verbose=False),
        PruningCallback(name="b", include=[r"net\.0$"], pattern="1x1", target_sparsity=0.5, verbose=False),
    ]
    trainer = make_trainer(callbacks, max_steps=2)
    with pytest.raises(ValueError, match=r"name='b' and name='a' would both prune \['net\.0'\]"):
        trainer.fit(TinyModule(), tiny_loader())
    assert trainer.global_step == 0


def test_a_bad_callback_name_is_refused() -> None:
    with pytest.raises(ValueError, match="name='a b'"):
        PruningCallback(name="a b")


def test_a_list_of_entries_reads_as_inc_reads_its_first_argument() -> None:
    entries = [{"op_names": ["a"], "target_sparsity": 0.6}, {"op_names": ["b"]}]
    assert [c.options.target_sparsity for c in callbacks_from_inc_config(entries)] == [0.6, 0.9]

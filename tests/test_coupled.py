"""Coupled patterns: whole attention heads and FFN units across the weights they span, on real models
built from config (random init, no downloads), with expected units computed here from the weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Pruner, PruningCallback, PruningOptions, Schedule
from lightning_prune.coupled import CoupledPattern
from lightning_prune.couplings import heads, register_coupling, units
from lightning_prune.demo import build_network

transformers = pytest.importorskip("transformers")
from test_models import TorchViT, bert, gpt2, llama, vit  # noqa: E402


def prune(model: nn.Module, pattern: Any, sparsity: float = 0.5, **options: Any) -> Pruner:
    pruner = Pruner(
        model, Schedule(1, 1), PruningOptions(target_sparsity=sparsity, pattern=pattern, **options)
    )
    pruner.prune(sparsity)
    return pruner


def zero_rows(weight: Tensor) -> Tensor:
    return weight.eq(0).all(dim=1)


def zero_columns(weight: Tensor) -> Tensor:
    return weight.eq(0).all(dim=0)


# --------------------------------------------------------------------------- options and errors
@pytest.mark.parametrize(("name", "kinds"), [("head", ("head",)), ("mha", ("head",)), ("ffn", ("ffn",))])
def test_pattern_names(name: str, kinds: tuple[str, ...]) -> None:
    pattern = PruningOptions(pattern=name, target_sparsity=0.5).pattern
    assert isinstance(pattern, CoupledPattern) and pattern.kinds == kinds and pattern.reduce == "mean"
    both = PruningOptions(pattern={"name": "head+ffn", "reduce": "sum"}, target_sparsity=0.5).pattern
    assert isinstance(both, CoupledPattern) and both.kinds == ("head", "ffn") and both.reduce == "sum"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scope": "row"}, r"scope='row'.*use scope='global' or 'local'"),
        (
            {"progressive": True},
            r"progressive=Progressive.*pattern 'head' prunes units spread over several weights",
        ),
        ({"regularizer": "group_lasso"}, r"regularizer=GroupLasso.*use regularizer=None"),
        ({"pattern": {"name": "head", "reduce": "max"}}, r"reduce='max' is not one of \['sum', 'mean'\]"),
    ],
)
def test_options_a_coupled_pattern_cannot_serve_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruningOptions(**{"pattern": "head", "target_sparsity": 0.5, **options})


def test_head_pattern_on_a_model_without_attention_names_what_was_looked_at() -> None:
    with pytest.raises(
        ValueError,
        match=r"pattern='head' found no attention heads.*\['Flatten', 'Linear', 'ReLU', 'Sequential'\].*register_coupling",
    ):
        Pruner(build_network("mlp"), Schedule(1, 1), PruningOptions(pattern="head", target_sparsity=0.5))


def test_a_coupling_with_a_member_that_is_not_a_target_is_named() -> None:
    model = llama()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*o_proj is not a target"):
        Pruner(model, Schedule(1, 1), PruningOptions(pattern="head", target_sparsity=0.5, exclude=r"o_proj$"))


# --------------------------------------------------------------------------- what is pruned
def test_gqa_heads_go_with_their_key_value_head_and_layers_stay_valid() -> None:
    torch.manual_seed(0)
    model = llama()  # 4 query heads, 2 key/value heads of 16, hidden 64
    pruner = prune(model, "head", 0.5, scope="local")
    for layer in model.model.layers:
        attn = layer.self_attn
        q = zero_rows(attn.q_proj.weight).view(4, 16)
        k, v = zero_rows(attn.k_proj.weight).view(2, 16), zero_rows(attn.v_proj.weight).view(2, 16)
        o = zero_columns(attn.o_proj.weight).view(4, 16)
        assert bool(q.all(1).eq(q.any(1)).all()) and bool(k.all(1).eq(k.any(1)).all())  # whole heads
        q_heads, kv_heads = q.all(1), k.all(1)
        assert torch.equal(q_heads, o.all(1)) and torch.equal(kv_heads, v.all(1))
        assert kv_heads.sum() == 1 and torch.equal(
            q_heads, kv_heads.repeat_interleave(2)
        )  # a KV head and its 2 query heads
    # The pruned group is the one with the lower mean of member means of |W| (reduce="mean").
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        torch.manual_seed(0)
        fresh = llama().model.layers[0].self_attn
        costs = torch.stack(
            [
                fresh.q_proj.weight.abs().view(2, -1).mean(1),
                fresh.k_proj.weight.abs().view(2, -1).mean(1),
                fresh.v_proj.weight.abs().view(2, -1).mean(1),
                fresh.o_proj.weight.abs().view(64, 2, 32).transpose(0, 1).reshape(2, -1).mean(1),
            ]
        ).mean(0)
    assert bool(zero_rows(attn.k_proj.weight).view(2, 16).all(1)[int(costs.argmin())])
    assert "model.layers.0.self_attn: 4 -> 2 heads (2 -> 1 key/value heads, 2 query heads each)" in str(
        pruner.coupled.report(pruner.masks)  # type: ignore[union-attr]
    )


def test_ffn_units_are_the_lowest_by_reduce_sum_in_each_layer() -> None:
    torch.manual_seed(1)
    model = llama()
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        cost = (
            mlp.up_proj.weight.abs().sum(1)
            + mlp.gate_proj.weight.abs().sum(1)
            + mlp.down_proj.weight.abs().sum(0)
        )
    expected = torch.zeros(128, dtype=torch.bool)
    expected[cost.argsort()[:32]] = True
    prune(model, {"name": "ffn", "reduce": "sum"}, 0.25, scope="local")
    assert torch.equal(zero_rows(mlp.up_proj.weight), expected)
    assert torch.equal(zero_rows(mlp.gate_proj.weight), expected)
    assert torch.equal(zero_columns(mlp.down_proj.weight), expected)
    assert not bool(model.model.layers[1].self_attn.q_proj.weight.eq(0).any())  # heads untouched


@pytest.mark.parametrize("build", [gpt2, bert, vit, TorchViT], ids=["gpt2", "bert", "vit", "torch_vit"])
def test_whole_heads_and_units_on_every_attention_layout(build: Any) -> None:
    torch.manual_seed(0)
    model = build()
    pruner = prune(model, "head+ffn", 0.5, scope="local")
    report = pruner.coupled.report(pruner.masks)  # type: ignore[union-attr]
    assert len(report.rows) == 4 and all(row.pruned * 2 == row.units for row in report.rows)
    for coupling, index in zip(pruner.coupled.couplings, pruner.coupled.index, strict=True):  # type: ignore[union-attr]
        for member, i in zip(coupling.members, index, strict=True):
            target = pruner.targets[i]
            standard = target.layout.to_standard(target.param.detach())
            part = standard.narrow(member.axis, member.offset, coupling.units * member.width)
            zero = (zero_rows(part) if member.axis == 0 else zero_columns(part)).view(
                coupling.units, member.width
            )
            assert bool(zero.all(1).eq(zero.any(1)).all()), (coupling.name, member.role)  # whole units
            assert int(zero.all(1).sum()) == coupling.units // 2


def test_global_scope_reaches_the_target_over_the_coupled_weights() -> None:
    torch.manual_seed(0)
    model = llama()
    pruner = prune(model, "head+ffn", 0.4)
    assert pruner.sparsity == pytest.approx(0.4, abs=0.05)
    widths = {int(zero_columns(layer.mlp.down_proj.weight).sum()) for layer in model.model.layers}
    assert len(widths) == 2  # global: the two FFNs lose different numbers of units


# --------------------------------------------------------------------------- a user's own coupling
class OwnAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(32, 32) for _ in range(4))
        self.head_dim = 8

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class OwnBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = OwnAttention()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return self.head(x + self.down(torch.relu(self.up(x))))


@register_coupling("OwnAttention")
def _own_attention(module: nn.Module) -> list[Any]:
    assert isinstance(module, OwnAttention)
    return [heads(module.wq, module.wk, module.wv, module.wo, head_dim=module.head_dim)]


@register_coupling("OwnBlock")
def _own_block(module: nn.Module) -> list[Any]:
    assert isinstance(module, OwnBlock)
    return [units([module.up], module.down)]


def test_a_user_declared_coupling_is_pruned_and_slimmed() -> None:
    from lightning_prune.export import slim

    torch.manual_seed(0)
    model = OwnBlock().eval()
    pruner = prune(model, "head+ffn", 0.5, scope="local")
    assert [c.name for c in pruner.coupled.couplings] == ["OwnBlock", "attn"]  # type: ignore[union-attr]
    x = torch.randn(2, 5, 32)
    result = slim(model, (x,))
    small = result.model
    assert small.attn.wq.out_features == 16 and small.attn.wo.in_features == 16
    assert small.up.out_features == 32 and small.down.in_features == 32
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- schedule, resume, callback
@pytest.mark.parametrize("build", [llama, vit], ids=["llama", "vit"])  # ViT: multi-step head pruning
def test_a_schedule_grows_whole_units_and_never_revives_one(build: Any) -> None:
    torch.manual_seed(0)
    model = build()
    pruner = Pruner(
        model, Schedule(0, 6, frequency=2), PruningOptions(target_sparsity=0.5, pattern="head+ffn")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 8), generator=generator)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    pruned_before = [torch.zeros_like(m) for m in pruner.masks]
    for _ in range(6):
        loss = (
            model(input_ids=ids, labels=ids).loss if build is llama else model(images).logits.square().mean()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruned = [~m for m in pruner.masks]
        assert all(
            bool((p | ~b).all()) for p, b in zip(pruned, pruned_before, strict=True)
        )  # masks only grow
        pruned_before = pruned
        pruner.coupled.check_masks(pruner.masks)  # type: ignore[union-attr]  # whole units only
    pruner.detach()
    assert [e.step for e in pruner.events] == [2, 4, 6]
    assert pruner.sparsity == pytest.approx(0.5, abs=0.05)


def test_resume_restores_the_units_and_refuses_other_couplings() -> None:
    torch.manual_seed(0)
    model = gpt2()
    pruner = prune(model, "head+ffn", 0.5)
    state = pruner.state_dict()
    assert set(state["couplings"]) == {
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
    }
    torch.manual_seed(0)
    again = gpt2()
    restored = Pruner(again, Schedule(1, 1), PruningOptions(target_sparsity=0.5, pattern="head+ffn"))
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.masks, pruner.masks, strict=True))
    edited = {**state, "couplings": {**state["couplings"], "transformer.h.0.attn": "head: 8 units"}}
    with pytest.raises(
        ValueError, match=r"coupled units differ.*transformer\.h\.0\.attn: checkpoint 'head: 8 units'"
    ):
        restored.load_state_dict(edited)
    partial = {**state, "masks": {k: v.clone() for k, v in state["masks"].items()}}
    partial["masks"]["transformer.h.0.mlp.c_fc"][0, 0] = False  # one weight of one unit
    with pytest.raises(ValueError, match=r"masks of transformer\.h\.0\.mlp prune units \[0\] only in part"):
        restored.load_state_dict(partial)
    with pytest.raises(ValueError, match=r"'couplings' is None"):
        restored.load_state_dict({**state, "couplings": None})


class TinyLlamaLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = llama()

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.slow
def test_callback_prunes_heads_and_reports_them_per_layer(tmp_path: Path, messages: list[str]) -> None:
    pl.seed_everything(0)
    module = TinyLlamaLM()
    callback = PruningCallback(
        target_sparsity=0.5, pattern="head+ffn", scope="local", start_step=0, end_step=4, frequency=2
    )
    ids = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(0))
    trainer = make_trainer([callback], max_steps=6, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=2))
    said = "\n".join(messages)
    assert re.search(r"model\.model\.layers\.1\.self_attn: 4 -> 2 heads \(2 -> 1 key/value heads", said)
    assert "model.model.layers.0.mlp: 128 -> 64 units (64 pruned)" in said
    rows = (Path(trainer.log_dir or tmp_path) / "pruning" / "units.csv").read_text().splitlines()
    assert rows[0] == "name,kind,units,pruned,heads_per_unit,pruned_units" and len(rows) == 5
    assert any(row.startswith("model.model.layers.0.self_attn,head,2,1,2,") for row in rows)


def test_coupled_masks_go_through_the_rank_zero_broadcast(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under DDP every rank takes rank 0's masks: the coupled keeps are what is broadcast, per target.
    import lightning_prune.pruner as pruner_module

    sent: list[list[Tensor]] = []
    real = pruner_module.broadcast_from_rank_zero
    monkeypatch.setattr(pruner_module, "broadcast_from_rank_zero", lambda ts: (sent.append(ts), real(ts)))
    torch.manual_seed(0)
    pruner = prune(llama(), "head", 0.5, scope="local")
    keeps = sent[0]
    assert len(keeps) == len(pruner.targets) == 8
    for target, keep, mask in zip(pruner.targets, keeps, pruner.masks, strict=True):
        assert torch.equal(target.layout.from_standard(keep), mask), target.name


def test_a_structure_only_partly_selected_is_left_dense_with_a_warning() -> None:
    model = llama()
    with pytest.warns(
        UserWarning,
        match=r"leaves 1 structure\(s\) dense.*model\.layers\.1\.self_attn.*o_proj is not a target",
    ):
        pruner = prune(model, "head", 0.5, exclude=r"layers\.1\.self_attn\.o_proj$")
    assert [c.name for c in pruner.coupled.couplings] == ["model.layers.0.self_attn"]  # type: ignore[union-attr]
    assert not bool(model.model.layers[1].self_attn.q_proj.weight.eq(0).any())


def test_intel_neural_compressor_configs_name_heads_mha() -> None:
    (callback,) = PruningCallback.from_inc_config({"pattern": "mha", "target_sparsity": 0.5})
    assert isinstance(callback.options.pattern, CoupledPattern) and str(callback.options.pattern) == "head"


def _fit_llama(folder: Path, max_epochs: int, ckpt_path: Path | None = None) -> TinyLlamaLM:
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    module = TinyLlamaLM()
    pruning = PruningCallback(
        target_sparsity=0.5, pattern="head+ffn", start_step=0, end_step=6, frequency=2, verbose=False
    )
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    ids = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(0))
    trainer = make_trainer([pruning, checkpoints], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=4), ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_a_run_resumed_mid_schedule_ends_with_the_same_heads_and_weights(tmp_path: Path) -> None:
    straight = _fit_llama(tmp_path / "straight", max_epochs=2)
    _fit_llama(tmp_path / "stopped", max_epochs=1)  # 4 steps: events at 2 and 4 done, 6 to come
    resumed = _fit_llama(tmp_path / "resumed", max_epochs=2, ckpt_path=tmp_path / "stopped" / "epoch=0.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    down = straight.model.model.layers[0].mlp.down_proj.weight
    assert 0 < int(down.eq(0).all(0).sum()) < 128  # units were pruned, whole

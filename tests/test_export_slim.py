"""slim: pruned units, channels and heads physically removed, outputs unchanged (float32, eval mode)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyModule, make_trainer, tiny_loader
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_prune import PruningCallback
from lightning_prune.export import SlimMultiheadAttention, load_slim_state_dict, slim

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def same_outputs(a: nn.Module, b: nn.Module, *inputs: Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(*inputs), a(*inputs), **TIGHT)


class MLP(nn.Module):
    def __init__(
        self, act: nn.Module | None = None, bias: bool = True, width: int = 16, hidden: int = 32
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.act = act if act is not None else nn.ReLU()
        self.fc2 = nn.Linear(hidden, 8, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for param in module.parameters():
        nn.init.normal_(param.data) if param.dim() < 2 else nn.init.xavier_normal_(param.data)
    return module


@torch.no_grad()
def test_mlp_relu_removes_dead_columns_and_zero_rows_with_folding() -> None:
    model = seeded(MLP())
    model.fc2.weight[:, [0, 1, 2]] = 0  # consumer ignores units 0-2
    model.fc1.weight[[3, 4, 5]] = 0  # units 3-5 emit relu(bias): a constant
    model.fc1.bias[3] = 0.0  # relu(0) = 0: removed with nothing to fold
    model.fc1.bias[4] = -1.0  # relu(-1) = 0
    model.fc1.bias[5] = 0.7  # relu(0.7) = 0.7: folded into fc2's bias
    x = torch.randn(10, 16)
    result = slim(model, (x,))
    assert result.model.fc1.out_features == 26 and result.model.fc2.in_features == 26
    assert result.model is not model and model.fc1.out_features == 32, "the input is not modified"
    [chain] = result.chains
    assert (chain.kind, chain.layers, chain.before, chain.after, chain.folded) == (
        "linear",
        ("fc1", "fc2"),
        32,
        26,
        1,
    )
    assert result.params_after == result.params_before - 6 * 16 - 6 - 6 * 8
    same_outputs(model, result.model, x)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    assert "fc1 -> fc2: 32 -> 26 units, 1 folded into a bias" in str(result)


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_functional_gelu_with_and_without_bias(bias: bool) -> None:
    class Functional(MLP):
        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(F.dropout(F.gelu(self.fc1(x)), 0.1, self.training))

    model = seeded(Functional(bias=bias))
    model.fc1.weight[:10] = 0
    model.fc2.weight[:, 10:14] = 0
    x = torch.randn(4, 3, 16)  # Linear on a 3-D input: the hidden dim is the last
    result = slim(model, (x,))
    assert result.model.fc1.out_features == 18
    assert (result.model.fc2.bias is not None) == bias, "no bias is added where nothing is folded"
    same_outputs(model, result.model, x)


@torch.no_grad()
def test_sigmoid_zero_row_is_folded_and_a_biasless_consumer_gains_a_bias() -> None:
    model = seeded(MLP(act=nn.Sigmoid(), bias=False))  # sigmoid(0) = 0.5: a zero row still emits something
    model.fc1.weight[:8] = 0
    x = torch.randn(6, 16)
    result = slim(model, (x,))
    assert result.model.fc1.out_features == 24 and result.chains[0].folded == 8
    assert result.model.fc2.bias is not None and "gained a bias" in result.chains[0].note
    same_outputs(model, result.model, x)


class ResidualFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


@torch.no_grad()
def test_residual_around_the_block_is_fine() -> None:
    model = seeded(ResidualFFN())
    model.fc2.weight[:, 32:] = 0
    x = torch.randn(2, 5, 16)
    result = slim(model, (x,))
    assert result.model.fc1.out_features == 32
    same_outputs(model, result.model, x)


@torch.no_grad()
def test_stacked_chains_each_shrink() -> None:
    model = seeded(nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4)))
    model[0].weight[:6] = 0  # tanh(bias) constants folded into layer 2's bias ...
    model[2].weight[:, 20:] = 0
    model[4].weight[:, :5] = 0
    x = torch.randn(7, 8)
    result = slim(model, (x,))
    assert [c.after for c in result.chains] == [14, 19]
    assert result.model[0].out_features == 14 and result.model[2].weight.shape == (19, 14)
    same_outputs(model, result.model, x)


class GatedFFN(nn.Module):
    """LLaMA-style SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 32, bias=bias)
        self.up = nn.Linear(16, 32, bias=bias)
        self.down = nn.Linear(32, 16, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_gated_ffn_units_go_when_either_factor_is_zero(bias: bool) -> None:
    model = seeded(GatedFFN(bias))
    model.down.weight[:, 0:4] = 0  # ignored by down
    model.gate.weight[4:8] = 0  # silu(gate bias): zero only without bias
    model.up.weight[8:12] = 0  # up bias times a varying gate: zero only without bias
    model.gate.weight[12:14] = 0
    model.up.weight[12:14] = 0  # both factors constant: silu(b_gate) * b_up, folded
    x = torch.randn(3, 5, 16)
    result = slim(model, (x,))
    [chain] = result.chains
    assert chain.layers == ("gate", "up", "down") and chain.producers == 2
    expected = 32 - 4 - 2 - (0 if bias else 8)
    assert result.model.gate.out_features == result.model.up.out_features == expected
    assert chain.folded == (2 if bias else 0)
    assert "gate, up -> down" in str(result)
    same_outputs(model, result.model, x)


@torch.no_grad()
def test_activation_used_twice_is_left_and_listed() -> None:
    class TwoUsers(MLP):
        def forward(self, x: Tensor) -> Tensor:
            hidden = self.act(self.fc1(x))
            return self.fc2(hidden) + hidden.mean(-1, keepdim=True)

    model = seeded(TwoUsers())
    model.fc1.weight[:4] = 0
    model.fc1.bias[:4] = 0
    x = torch.randn(3, 16)
    result = slim(model, (x,))
    assert not result.changed and result.params_after == result.params_before
    assert "fc1" in result.skipped and "2 users" in result.skipped["fc1"]
    assert "4 of 32 output units are zero but kept" in result.skipped["fc1"]
    assert "left untouched" in str(result)
    same_outputs(model, result.model, x)


def test_untraceable_forward_gives_a_clear_error() -> None:
    class Branchy(nn.Module):  # layer names no coupling recipe knows
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.second(self.first(x).relu()) if x.sum() > 0 else x[:, :8]

    with pytest.raises(
        RuntimeError, match=r"could not trace Branchy\.forward with torch\.fx.*Nor did it find"
    ):
        slim(Branchy(), (torch.randn(2, 16),))


def test_untraceable_forward_with_a_known_ffn_is_slimmed_by_module_structure() -> None:
    class Branchy(MLP):  # fc1 -> act -> fc2: the "fc1, fc2" coupling recipe
        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.act(self.fc1(x))) if x.sum() > 0 else x[:, :8]

    model = seeded(Branchy())
    with torch.no_grad():
        model.fc2.weight[:, 5:20] = 0  # units 5..19 are read by nothing
    x = torch.randn(3, 16).abs()
    result = slim(model, (x,))
    assert result.model.fc1.out_features == 17 and result.model.fc2.in_features == 17
    assert "fc1" not in result.skipped and "not traced" not in str(result.chains)
    same_outputs(model, result.model, x)


def test_nothing_prunable_returns_an_unchanged_copy() -> None:
    model = seeded(MLP())
    x = torch.randn(2, 16)
    result = slim(model, (x,))
    assert result.model is not model and not result.changed and not result.skipped
    assert "nothing to remove" in str(result)
    assert result.model.fc1.weight.data_ptr() != model.fc1.weight.data_ptr()
    same_outputs(model, result.model, x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"example_inputs": torch.randn(2, 16)}, r"example_inputs=Tensor must be a tuple"),
        ({"round_to": 0}, r"round_to=0 must be an int >= 1"),
        ({"round_to": True}, r"round_to=True"),
        ({"check": 1}, r"check=1"),
    ],
)
def test_bad_arguments_are_refused_first(kwargs: dict, match: str) -> None:
    arguments = {"example_inputs": (torch.randn(2, 16),), **kwargs}
    with pytest.raises(ValueError, match=match):
        slim(MLP(), **arguments)
    with pytest.raises(ValueError, match=r"model=str must be a torch\.nn\.Module"):
        slim("model", (torch.randn(2, 16),))  # type: ignore[arg-type]


@torch.no_grad()
def test_round_to_keeps_a_multiple_with_the_largest_extra_units() -> None:
    model = seeded(MLP(hidden=64))
    model.fc2.weight[:, :27] = 0  # 37 live units -> 40 with round_to=8
    model.fc1.weight[3] *= 100  # the biggest removable units come back first
    x = torch.randn(5, 16)
    result = slim(model, (x,), round_to=8)
    assert result.model.fc1.out_features == 40
    assert "3 removable kept for round_to=8" in result.chains[0].note
    kept_rows = {tuple(row.tolist()) for row in result.model.fc1.weight}
    assert tuple(model.fc1.weight[3].tolist()) in kept_rows
    same_outputs(model, result.model, x)


@torch.no_grad()
def test_every_unit_removable_still_keeps_one() -> None:
    model = seeded(MLP())
    model.fc2.weight.zero_()
    x = torch.randn(3, 16)
    result = slim(model, (x,))
    assert result.model.fc1.out_features == 1
    same_outputs(model, result.model, x)


class CNN(nn.Module):
    def __init__(self, padding: int = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=padding, padding_mode=padding_mode)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def cnn_with_zero_filters(**kwargs: object) -> tuple[CNN, dict[str, list[int]]]:
    model = seeded(CNN(**kwargs)).eval()
    bn = model.bn
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-1, 1)
    model.conv1.weight[:6] = 0  # filters 0-5 emit relu(bn(bias)): constant channels
    bn.bias[:3], bn.bias[3:6] = -3.0, 3.0  # after BN: three negative constants, three positive
    constant = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()
    constant = constant + model.conv1.bias * bn.weight / (bn.running_var + bn.eps).sqrt()
    silent = [j for j in range(6) if constant[j] <= 0]
    loud = [j for j in range(6) if constant[j] > 0]
    assert silent and loud, "the seed must give both kinds"
    model.conv2.weight[:, [10, 11]] = 0  # conv2 ignores channels 10-11
    return model, {"silent": silent, "loud": loud}


@torch.no_grad()
def test_conv_bn_relu_conv_with_zero_padding_keeps_nonzero_constant_channels() -> None:
    model, kinds = cnn_with_zero_filters()
    x = torch.randn(2, 3, 8, 8)
    result = slim(model, (x,))
    kept = 16 - 2 - len(kinds["silent"])
    assert result.model.conv1.out_channels == kept and result.model.bn.num_features == kept
    assert result.model.conv2.in_channels == kept
    assert f"{len(kinds['loud'])} constant nonzero channels kept" in result.chains[0].note
    same_outputs(model, result.model, x)


@pytest.mark.parametrize(("padding", "mode"), [(0, "zeros"), (1, "replicate")])
@torch.no_grad()
def test_conv_constant_channels_fold_when_padding_keeps_them_constant(padding: int, mode: str) -> None:
    model, kinds = cnn_with_zero_filters(padding=padding, padding_mode=mode)
    x = torch.randn(2, 3, 8, 8)
    result = slim(model, (x,))
    assert result.model.conv1.out_channels == 8
    assert result.chains[0].folded == len(kinds["loud"])
    same_outputs(model, result.model, x)


@torch.no_grad()
def test_conv_feeding_flatten_is_listed_not_touched() -> None:
    model = seeded(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)))
    model[0].weight[:2] = 0
    model[0].bias[:2] = 0
    x = torch.randn(2, 3, 6, 6)
    result = slim(model, (x,))
    assert not result.changed
    assert "Flatten" in result.skipped["0"]
    same_outputs(model, result.model, x)


class Block(nn.Module):
    """A pre-norm transformer block written out (nn.TransformerEncoderLayer is one opaque fx call)."""

    def __init__(self, dim: int = 32, heads: int = 8, batch_first: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


@torch.no_grad()
def pruned_block(batch_first: bool = True) -> Block:
    model = seeded(Block(batch_first=batch_first)).eval()
    width = 4  # 32 / 8 heads
    model.attn.out_proj.weight[:, 1 * width : 3 * width] = 0  # heads 1, 2 reach nothing
    model.attn.in_proj_weight[64 + 5 * width : 64 + 6 * width] = 0  # head 5: value = its bias, folded
    model.fc2.weight[:, ::2] = 0
    return model


@pytest.mark.parametrize("batch_first", [True, False])
@torch.no_grad()
def test_transformer_block_heads_and_ffn_units_removed(batch_first: bool) -> None:
    model = pruned_block(batch_first)
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    result = slim(model, (x, padding))
    attention = result.model.attn
    assert isinstance(attention, SlimMultiheadAttention)
    assert attention.num_heads == 5 and attention.kept_heads.tolist() == [0, 3, 4, 6, 7]
    assert result.model.fc1.out_features == 64
    [attn_chain] = [c for c in result.chains if c.kind == "attention"]
    assert (attn_chain.before, attn_chain.after, attn_chain.folded) == (8, 5, 1)
    same_outputs(model, result.model, x, padding)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    same_outputs(model, result.model, x, None, causal)
    float_padding = torch.zeros(2, 6).masked_fill(padding, float("-inf"))
    same_outputs(model, result.model, x, float_padding, torch.randn(6, 6))


@torch.no_grad()
def test_slimming_a_slim_model_again_changes_nothing() -> None:
    model = pruned_block()
    x = torch.randn(2, 6, 32)
    once = slim(model, (x,)).model
    twice = slim(once, (x,))
    assert not twice.changed and isinstance(twice.model.attn, SlimMultiheadAttention)
    same_outputs(model, twice.model, x)


@torch.no_grad()
def test_slim_attention_matches_with_per_head_masks_and_weights() -> None:
    model = pruned_block()
    result = slim(model, (torch.randn(2, 6, 32),))
    original, small = model.attn, result.model.attn
    x = torch.randn(2, 6, 32)
    per_head = torch.randn(2 * 8, 6, 6)  # (N * original heads, L, S)
    want, _ = original(x, x, x, attn_mask=per_head)
    got, weights = small(x, x, x, attn_mask=per_head, average_attn_weights=False)
    torch.testing.assert_close(got, want, **TIGHT)
    assert weights is not None and weights.shape == (2, 5, 6, 6)
    want, _ = original(x[0], x[0], x[0])  # unbatched
    got, _ = small(x[0], x[0], x[0], need_weights=False)
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_cross_attention_with_other_key_and_value_sizes(bias: bool) -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, kdim=24, vdim=20, bias=bias, dropout=0.1)

        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.attn(q, k, v, need_weights=False)[0]

    model = seeded(Cross()).eval()
    model.attn.v_proj_weight[8:16] = 0  # head 1
    model.attn.out_proj.weight[:, 24:] = 0  # head 3
    inputs = (torch.randn(5, 2, 32), torch.randn(7, 2, 24), torch.randn(7, 2, 20))
    result = slim(model, inputs)
    assert result.model.attn.kept_heads.tolist() == [0, 2]
    assert result.chains[0].folded == (1 if bias else 0)
    same_outputs(model, result.model, *inputs)


@torch.no_grad()
def test_attention_whose_weights_are_used_keeps_its_heads() -> None:
    class Probe(Block):
        def forward(self, x: Tensor) -> Tensor:
            a, weights = self.attn(x, x, x)
            return a + weights.sum()

    model = seeded(Probe()).eval()
    model.attn.out_proj.weight[:, :8] = 0
    x = torch.randn(2, 6, 32)
    result = slim(model, (x,))
    assert isinstance(result.model.attn, nn.MultiheadAttention)
    assert "attention weights are used" in result.skipped["attn"]
    same_outputs(model, result.model, x)


@torch.no_grad()
def test_layers_inside_an_opaque_leaf_module_are_listed() -> None:
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Linear(16, 4)
    )
    model[0].linear2.weight[:, :8] = 0
    result = slim(model, (torch.randn(2, 3, 16),))
    assert not result.changed
    assert (
        "opaque" in result.skipped["0.linear2"] and "TransformerEncoderLayer" in result.skipped["0.linear2"]
    )


@torch.no_grad()
def test_training_mode_and_requires_grad_are_kept() -> None:
    model = seeded(MLP()).train()
    model.fc2.weight[:, :4] = 0
    model.fc2.bias.requires_grad_(False)
    result = slim(model, (torch.randn(2, 16),))
    assert result.model.training and result.model.fc1.training and model.training
    assert not result.model.fc2.bias.requires_grad and result.model.fc2.weight.requires_grad


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = pruned_block()
    x = torch.randn(2, 6, 32)
    small = slim(model, (x,), round_to=2).model
    torch.save(small, tmp_path / "slim.pt")
    loaded = torch.load(tmp_path / "slim.pt", weights_only=False)
    same_outputs(model, loaded, x)
    torch.save(small.state_dict(), tmp_path / "slim_state.pt")
    rebuilt = load_slim_state_dict(Block(), torch.load(tmp_path / "slim_state.pt"))
    same_outputs(model, rebuilt, x)
    cnn, _ = cnn_with_zero_filters(padding=0)
    images = torch.randn(2, 3, 8, 8)
    state = slim(cnn, (images,)).model.state_dict()
    same_outputs(cnn, load_slim_state_dict(CNN(padding=0), state), images)


def test_pruning_callback_channel_recipes_slim_cleanly() -> None:
    for pattern, layer in (("channelx1", r"net\.2"), ("1xchannel", r"net\.0")):
        torch.manual_seed(0)
        module = TinyModule()
        callback = PruningCallback(
            target_sparsity=0.5, pattern=pattern, include=[layer], start_step=0, end_step=0,
            skip_last_layer=False, verbose=False,
        )  # fmt: skip
        make_trainer([callback], max_epochs=1).fit(module, tiny_loader(batches=6))
        if pattern == "1xchannel":  # rows pruned, biases trained on: the units emit relu(bias)
            assert bool((module.net[0].bias[module.net[0].weight.eq(0).all(1)] != 0).any())
        x = torch.randn(20, 16)
        result = slim(module, (x,))
        assert result.model.net[0].out_features == 16 and result.model.net[2].in_features == 16, pattern
        assert isinstance(result.model, TinyModule)
        same_outputs(module, result.model, x)


ACTIVATIONS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Hardswish]


@settings(max_examples=25, deadline=None)
@given(
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    hidden=st.integers(1, 24),
    data=st.data(),
)
def test_property_any_zero_rows_and_columns_slim_exactly(
    activation: type, bias: bool, hidden: int, data: st.DataObject
) -> None:
    model = seeded(MLP(act=activation(), bias=bias, width=6, hidden=hidden), seed=hidden)
    rows = data.draw(st.lists(st.booleans(), min_size=hidden, max_size=hidden))
    columns = data.draw(st.lists(st.booleans(), min_size=hidden, max_size=hidden))
    round_to = data.draw(st.sampled_from([1, 4]))
    with torch.no_grad():
        model.fc1.weight[torch.tensor(rows)] = 0
        model.fc2.weight[:, torch.tensor(columns)] = 0
    x = torch.randn(5, 6)
    result = slim(model, (x,), round_to=round_to)
    removable = sum(r or c for r, c in zip(rows, columns, strict=True))
    live = max(1, hidden - removable)
    expected = min(hidden, -(-live // round_to) * round_to)
    assert result.model.fc1.out_features == expected
    same_outputs(model, result.model, x)

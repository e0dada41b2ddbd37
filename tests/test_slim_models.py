"""slim on whole models: Hugging Face Llama (GQA), GPT-2, BERT and ViT after head/unit pruning, by
module structure (torch.fx cannot trace them), and a torchvision-style ResNet by tracing. The slim
model computes what the masked one does (eval), generates the same tokens, has the parameter count
computed here from the config, and saves and loads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.export import load_slim_pretrained, load_slim_state_dict, slim

transformers = pytest.importorskip("transformers")
from test_models import bert, gpt2, llama, vit  # noqa: E402

TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def pruned(build: Any, scope: str = "local", sparsity: float = 0.5, pattern: str = "head+ffn") -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    options = PruningOptions(target_sparsity=sparsity, pattern=pattern, scope=scope)
    Pruner(model, Schedule(1, 1), options).prune(sparsity)
    return model


def inputs(build: Any) -> Tensor:
    if build is vit:
        return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).logits


def expected_removed(build: Any) -> int:
    """Parameters half the heads and half the FFN units take, from the tiny configs of test_models.py."""
    hidden, head_dim, layers = 64, 16, 2
    if build is llama:  # 4 query heads over 2 KV heads, no biases; SwiGLU FFN of 128
        heads = 2 * head_dim * hidden * 2 + head_dim * hidden * 2  # 2 query heads (q rows, o cols), k, v rows
        ffn = 64 * hidden * 3
    else:  # 4 heads, biased q/k/v; FFN of 128 (GPT-2: 256) with a biased up projection
        heads = 2 * head_dim * (hidden + 1) * 3 + 2 * head_dim * hidden
        width = 256 if build is gpt2 else 128
        ffn = width // 2 * (hidden + 1 + hidden)
    return layers * (heads + ffn)


@pytest.mark.slow
@pytest.mark.parametrize("build", [llama, gpt2, bert, vit], ids=["llama", "gpt2", "bert", "vit"])
def test_slim_removes_pruned_heads_and_units_with_the_same_outputs(build: Any) -> None:
    model = pruned(build)
    x = inputs(build)
    result = slim(model, (x,))
    small = result.model
    torch.testing.assert_close(logits(small, x), logits(model, x), **TIGHT)
    assert result.params_before - result.params_after == expected_removed(build)
    assert sum(p.numel() for p in small.parameters()) == result.params_after
    assert [c.after * 2 for c in result.chains] == [c.before for c in result.chains]
    assert "not traced" not in "".join(result.skipped.values())  # nothing pruned was left behind


def test_llama_stays_a_valid_gqa_model_and_its_config_follows() -> None:
    model = pruned(llama)
    small = slim(model, (inputs(llama),)).model
    for layer in small.model.layers:
        attn = layer.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == 1 * attn.head_dim
        assert attn.q_proj.out_features == attn.o_proj.in_features == 2 * attn.head_dim
        assert attn.num_key_value_groups == 2  # each KV head still serves 2 query heads
        assert layer.mlp.intermediate_size == 64 == layer.mlp.down_proj.in_features
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 64)
    assert model.config.num_attention_heads == 4  # the input model is not modified


@pytest.mark.slow
@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_generate_gives_the_same_tokens_with_the_kv_cache(build: Any, scope: str) -> None:
    model = pruned(build, scope)
    small = slim(model, (inputs(build),)).model
    prompt = inputs(build)[:1, :5]
    settings = {"max_new_tokens": 12, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    assert torch.equal(small.generate(prompt, **settings), model.generate(prompt, **settings))


def test_gpt2_attributes_follow_the_kept_heads() -> None:
    small = slim(pruned(gpt2), (inputs(gpt2),)).model
    attn = small.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.head_dim) == (2, 32, 16)
    assert attn.c_attn.weight.shape == (64, 96) and attn.c_proj.weight.shape == (32, 64)


@pytest.mark.slow
@pytest.mark.parametrize("build", [llama, gpt2, bert, vit], ids=["llama", "gpt2", "bert", "vit"])
def test_save_pretrained_and_load_slim_pretrained_give_the_same_model(build: Any, tmp_path: Path) -> None:
    model = pruned(build, "global", 0.4)  # layers of different widths
    x = inputs(build)
    small = slim(model, (x,)).model
    small.save_pretrained(tmp_path)
    loaded = load_slim_pretrained(type(model), tmp_path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded, x), logits(small, x), rtol=0, atol=0)
    again = load_slim_state_dict(build(), small.state_dict())
    torch.testing.assert_close(logits(again.eval(), x), logits(small, x), rtol=0, atol=0)


def test_a_llama_slimmed_alike_in_every_layer_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    model = pruned(llama)  # local scope: every layer keeps 1 KV head, 2 query heads, 64 units
    x = inputs(llama)
    small = slim(model, (x,)).model
    small.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, x), logits(small, x), rtol=0, atol=0)


def test_units_pruned_by_a_plain_pattern_are_removed_too() -> None:
    torch.manual_seed(0)
    model = llama().eval()
    options = PruningOptions(target_sparsity=0.5, pattern="channelx1", include=r"down_proj$", scope="local")
    Pruner(model, Schedule(1, 1), options).prune(0.5)  # down_proj columns: units read by nothing
    x = inputs(llama)
    result = slim(model, (x,))
    assert [layer.mlp.down_proj.in_features for layer in result.model.model.layers] == [64, 64]
    torch.testing.assert_close(logits(result.model, x), logits(model, x), **TIGHT)


def test_round_to_keeps_a_multiple_of_the_inner_width() -> None:
    model = pruned(llama)
    result = slim(model, (inputs(llama),), round_to=64)  # 2 query heads of 16 would be 32 wide
    attn = result.model.model.layers[0].self_attn
    assert attn.o_proj.in_features == 64 and attn.num_key_value_groups == 2
    assert "kept for round_to=64" in str(result)


# --------------------------------------------------------------------------- a torchvision-style ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.slow
def test_resnet_inner_channels_go_and_residual_channels_are_left_and_listed() -> None:
    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # statistics that are not the identity
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    blocks = [r"layer\d\.\d\.conv2$"]
    Pruner(model, Schedule(1, 1), PruningOptions(0.5, "channelx1", include=blocks, scope="local")).prune(0.5)
    Pruner(model, Schedule(1, 1), PruningOptions(0.25, "1xchannel", include=blocks, scope="local")).prune(
        0.25
    )
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    result = slim(model, (x,))
    small = result.model
    assert [small.layer1[i].conv1.out_channels for i in range(2)] == [8, 8]
    assert [small.layer2[i].conv2.in_channels for i in range(2)] == [16, 16]
    assert small.layer1[0].conv2.out_channels == 16  # the residual stream keeps its channels
    assert "4 of 16 output units are zero but kept" in result.skipped["layer1.0.conv2"]
    assert "add()" in result.skipped["layer1.0.conv2"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), **TIGHT)


class MHABlock(nn.Module):
    """A traceable block with nn.MultiheadAttention (the stacked in_proj_weight) and an FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: Tensor) -> Tensor:
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = x + attended
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_multihead_attention_heads_pruned_by_the_head_pattern_are_removed() -> None:
    torch.manual_seed(0)
    model = MHABlock().eval()
    Pruner(
        model, Schedule(1, 1), PruningOptions(target_sparsity=0.5, pattern="head+ffn", scope="local")
    ).prune(0.5)
    x = torch.randn(2, 6, 32)
    result = slim(model, (x,))
    small = result.model
    assert small.attn.num_heads == 2 and small.attn.in_proj_weight.shape == (3 * 16, 32)
    assert small.fc1.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), **TIGHT)

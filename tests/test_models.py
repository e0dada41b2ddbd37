"""Real models, built from their config classes (random init, no downloads): every weight layout is
pruned on its true axes, defaults prune the blocks, tied weights are one target, and the report
counts every weight of 2 or more dims."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Pruner, PruningCallback, PruningOptions, Schedule, sparsity_report
from lightning_prune.export import to_semi_structured
from lightning_prune.targets import EMBEDDING, HEAD

transformers = pytest.importorskip("transformers")


def gpt2(**overrides: Any) -> nn.Module:
    config = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 128, "n_positions": 32, **overrides}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


def bert() -> nn.Module:
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return transformers.ViTForImageClassification(config)


def resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return transformers.ResNetForImageClassification(config)


class TorchViT(nn.Module):
    """A torchvision-style ViT: patch conv, nn.TransformerEncoder (nn.MultiheadAttention), head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 64, kernel_size=8, stride=8)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 64))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.heads = nn.Linear(64, 10)


class MobileNetLike(nn.Module):
    """Inverted residual convs with a depthwise 3x3 (groups == channels) and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.project = nn.Conv2d(64, 16, 1)
        self.head = nn.Linear(16, 10)


# The layers the defaults prune (blocks), and what share of the model's >= 2-D weights is left dense.
DEFAULT_TARGETS = {
    "gpt2": (gpt2, r"^transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$", 8),
    "bert": (bert, r"^bert\.(encoder\.layer\.\d\..*|pooler\.dense)$", 13),
    "llama": (llama, r"^model\.layers\.\d\.(self_attn|mlp)\.\w+_proj$", 14),
    "vit": (vit, r"^vit\.layers\.\d\.(attention\.\w_proj|mlp\.fc\d)$", 12),
    "resnet": (resnet, r"^resnet\.encoder\.stages\.\d\.layers\.0\..*convolution$", 5),
    # torchvision names its patch embedding conv_proj: no "embed" in it, so it is pruned too.
    "torch_vit": (
        TorchViT,
        r"^(conv_proj|encoder\.layers\.\d\.(self_attn\.(in_proj_weight|out_proj)|linear\d))$",
        9,
    ),
}


def unique_weights(model: nn.Module) -> dict[int, Tensor]:
    return {id(p): p for p in model.parameters() if p.dim() >= 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEFAULT_TARGETS))
def test_defaults_prune_the_block_layers_and_report_what_is_left_out(name: str) -> None:
    build, regex, count = DEFAULT_TARGETS[name]
    torch.manual_seed(0)
    model = build()
    pruner = Pruner(model, Schedule(1, 1), PruningOptions(target_sparsity=0.5, pattern="1x1"))
    names = [t.name for t in pruner.targets]
    assert len(names) == count and all(re.search(regex, n) for n in names), names
    pruner.prune(0.5)
    weights = [t.param for t in pruner.targets]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.002)
    # Every >= 2-D tensor is either a target or left out with a reason, each once.
    total = sum(p.numel() for p in unique_weights(model).values())
    targeted = sum(w.numel() for w in weights)
    left = sum(numel for numel, _ in pruner.left_out.values())
    assert targeted + left == total
    assert pruner.left_out_share() == pytest.approx(left / total)
    reasons = {reason.split(",")[0] for _, reason in pruner.left_out.values()}
    assert HEAD in reasons
    if name in ("vit", "resnet"):  # patch embedding and stem: convolutions named "embed..."
        assert EMBEDDING in reasons


def test_report_totals_equal_a_direct_count_over_every_weight_of_two_or_more_dims() -> None:
    for build in (gpt2, bert, llama, vit, resnet, TorchViT, MobileNetLike):
        torch.manual_seed(0)
        model = build()
        with torch.no_grad():
            for p in model.parameters():
                p.masked_fill_(torch.rand_like(p) < 0.3, 0.0)
        weights = unique_weights(model).values()
        report = sparsity_report(model)
        assert report.numel == sum(p.numel() for p in weights), build
        assert report.zeros == sum(int((p == 0).sum()) for p in weights), build


def test_torch_vit_in_proj_weight_is_reported_and_counted() -> None:
    model = TorchViT()
    report = sparsity_report(model)
    assert report["encoder.layers.0.self_attn.in_proj_weight"].shape == (192, 64)
    assert report["class_token"].type == "Parameter"


# --------------------------------------------------------------------------- GPT-2's Conv1D (in, out)
def _prune_gpt2(pattern: str, sparsity: float, **options: Any) -> tuple[nn.Module, Pruner]:
    torch.manual_seed(0)
    model = gpt2()
    pruner = Pruner(
        model, Schedule(1, 1), PruningOptions(target_sparsity=sparsity, pattern=pattern, **options)
    )
    pruner.prune(sparsity)
    return model, pruner


def test_two_four_on_conv1d_runs_along_inputs() -> None:
    model, pruner = _prune_gpt2("2:4", 0.5)
    for target in pruner.targets:
        stored = target.param.detach()  # (in, out)
        along_inputs = stored.t().reshape(stored.shape[1], -1, 4)
        assert ((along_inputs != 0).sum(-1) <= 2).all(), target.name
        assert sparsity_report(model)[target.name].is_2of4


def test_channel_patterns_on_conv1d_remove_inputs_and_outputs_as_named() -> None:
    model, pruner = _prune_gpt2("channelx1", 0.5)
    report = sparsity_report(model)
    for target in pruner.targets:
        stored = target.param.detach()  # (in, out): an input channel is a stored row
        zero_inputs = int((stored == 0).all(dim=1).sum())
        assert zero_inputs > 0 and zero_inputs == report[target.name].zero_channels
        assert int((stored == 0).sum()) == zero_inputs * stored.shape[1], "only whole input rows"
    model, pruner = _prune_gpt2("1xchannel", 0.5)
    report = sparsity_report(model)
    for target in pruner.targets:
        stored = target.param.detach()
        zero_outputs = int((stored == 0).all(dim=0).sum())
        assert zero_outputs > 0 and zero_outputs == report[target.name].zero_rows
        assert int((stored == 0).sum()) == zero_outputs * stored.shape[0], "only whole output columns"


def test_skip_last_layer_skips_the_head_not_a_middle_conv1d() -> None:
    pruner = Pruner(gpt2(), Schedule(1, 1), PruningOptions(op_types=["Conv1D"], pattern="1x1"))
    assert "transformer.h.1.mlp.c_proj" in [t.name for t in pruner.targets]


# --------------------------------------------------------------------------- tied weights
def test_a_head_tied_to_the_embedding_stays_dense_and_says_why() -> None:
    model = gpt2()
    options = PruningOptions(op_types=["Linear", "Conv1D", "Embedding"], pattern="1x1", skip_embeddings=False)
    pruner = Pruner(model, Schedule(1, 1), options)
    names = [t.name for t in pruner.targets]
    assert "transformer.wte" not in names and "lm_head" not in names
    assert "transformer.wpe" in names
    (reason,) = [r for n, (_, r) in pruner.left_out.items() if n in ("lm_head", "transformer.wte")]
    assert reason.startswith(HEAD) and "transformer.wte" in reason
    pruner.prune(0.5)
    assert not (model.transformer.wte.weight == 0).any()


@pytest.mark.slow
def test_a_tied_weight_is_one_target_counted_once_and_its_masks_hold() -> None:
    model = gpt2()
    options = PruningOptions(
        op_types=["Linear", "Embedding"], pattern="1x1", skip_last_layer=False, skip_embeddings=False
    )
    pruner = Pruner(model, Schedule(0, 2, 1), options)
    tied = [t for t in pruner.targets if t.aliases]
    assert [(t.name, t.aliases) for t in tied] == [("transformer.wte", ("lm_head",))]
    assert len({id(t.param) for t in pruner.targets}) == len(pruner.targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mask = pruner.masks[pruner.targets.index(tied[0])]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model.lm_head.weight[~mask] == 0).all() and (~mask).any()
    assert sparsity_report(model).numel == sum(p.numel() for p in unique_weights(model).values())


# --------------------------------------------------------------------------- other layouts
def test_transposed_convolutions_lose_output_channels_under_1xchannel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(16, 32, 3), nn.ConvTranspose2d(32, 8, 3), nn.Linear(4, 4))
    options = PruningOptions(
        op_types=["ConvTranspose2d"], pattern="1xchannel", target_sparsity=0.5, scope="local"
    )
    pruner = Pruner(model, Schedule(1, 1), options)
    pruner.prune(0.5)
    report = sparsity_report(model)
    for target in pruner.targets:
        stored = target.param.detach()  # (in, out, kh, kw)
        zero_outputs = int((stored == 0).all(dim=(0, 2, 3)).sum())
        assert zero_outputs * stored[:, 0].numel() == int((stored == 0).sum()) > 0
        assert report[target.name].zero_rows == zero_outputs
        assert report[target.name].zero_channels == 0


def test_a_layer_a_pattern_cannot_serve_is_named_in_every_scope() -> None:
    for scope in ("global", "local"):
        with pytest.warns(UserWarning, match=r"depthwise.*one group is 100%"):
            pruner = Pruner(
                MobileNetLike(),
                Schedule(1, 1),
                PruningOptions(pattern="channelx1", target_sparsity=0.5, scope=scope),
            )
        assert "depthwise" in pruner.skipped and "grouped" not in pruner.skipped
        pruner.prune(0.5)
        assert pruner.sparsity == pytest.approx(0.5, abs=0.02), scope


def test_grouped_convolution_reports_zero_input_channels_of_every_group() -> None:
    layer = nn.Conv2d(8, 4, 1, groups=2)  # weight (4, 4, 1, 1); input channel c is read by group c // 4
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[:2, 1] = 0.0  # group 0 skips its input 1: channel 1 of the layer
        layer.weight[2:, 3] = 0.0  # group 1 skips its input 3: channel 7
        layer.weight[0, 2] = 0.0  # one filter of group 0 skips channel 2: not a whole channel
    assert sparsity_report(nn.Sequential(layer))["0"].zero_channels == 2


def test_to_semi_structured_dry_run_reports_fp32_and_lists_conv1d() -> None:
    model, _ = _prune_gpt2(
        "2:4", 0.5, skip_last_layer=False, include=[r"lm_head|h\.0"], skip_embeddings=False
    )
    result = to_semi_structured(model, dry_run=True)
    assert any("float32" in reason for reason in result.skipped.values())
    conv1d = {n: r for n, r in result.skipped.items() if "Conv1D" in r}
    assert (
        "transformer.h.0.attn.c_attn" in conv1d
        and "2:4 sparse along its inputs" in conv1d["transformer.h.0.attn.c_attn"]
    )


# --------------------------------------------------------------------------- resume on a real model
class CausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no RNG: runs repeat exactly

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _fit_gpt2(folder: Path, max_epochs: int, ckpt_path: Path | None = None) -> CausalLM:
    pl.seed_everything(0)
    module = CausalLM()
    pruning = PruningCallback(
        target_sparsity=0.5, pattern="2:4", start_step=0, end_step=6, frequency=2, verbose=False
    )
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    trainer = make_trainer([pruning, checkpoints], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_gpt2_resume_is_exact(tmp_path: Path) -> None:
    straight = _fit_gpt2(tmp_path / "straight", max_epochs=3)
    _fit_gpt2(tmp_path / "stopped", max_epochs=1)
    resumed = _fit_gpt2(tmp_path / "resumed", max_epochs=3, ckpt_path=tmp_path / "stopped" / "epoch=0.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_fit_start_names_what_is_pruned_and_the_share_left_dense(messages: list[str]) -> None:
    module = CausalLM()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    make_trainer([PruningCallback(pattern="1x1", end_step=1)], max_steps=1).fit(
        module, DataLoader(TensorDataset(ids), batch_size=4)
    )
    (said,) = [m for m in messages if "dense;" in m]
    weights = unique_weights(module)
    targeted = sum(
        module.model.transformer.h[i].get_submodule(n).weight.numel()
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    share = 1 - targeted / sum(p.numel() for p in weights.values())
    assert f"leaves {share:.1%} of the model's weights with 2 or more dims dense" in said
    assert "the head (skip_last_layer), its weight tied to ['model.transformer.wte']" in said
    assert "not in op_types (Embedding)" in said and "model.transformer.wpe" in said
    assert any("8 layers" in m for m in messages)

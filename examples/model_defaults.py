"""What the callback prunes by default on the models people fine-tune, and what it leaves dense.

Builds each architecture from its Hugging Face config class at its published size, on PyTorch's
``meta`` device (no weights allocated, nothing downloaded), selects targets as ``PruningCallback()``
would, and prints a Markdown table. Needs ``transformers`` (``pip install -e ".[dev]"``).

    python examples/model_defaults.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from lightning_prune.options import PruningOptions
from lightning_prune.targets import select_targets


def _models() -> dict[str, Callable[[], nn.Module]]:
    import transformers as tf

    return {
        "GPT-2 small": lambda: tf.GPT2LMHeadModel(tf.GPT2Config()),
        "BERT base": lambda: tf.BertForSequenceClassification(tf.BertConfig()),
        "Llama 3.2 1B shape (GQA)": lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
                tie_word_embeddings=True,
            )
        ),
        "ViT-B/16": lambda: tf.ViTForImageClassification(tf.ViTConfig()),
        "ResNet-50": lambda: tf.ResNetForImageClassification(tf.ResNetConfig()),
        "torch ViT-B/16 (nn.MultiheadAttention)": _torch_vit,
    }


def _torch_vit() -> nn.Module:
    # torchvision's vit_b_16 layer for layer, without depending on torchvision.
    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_proj = nn.Conv2d(3, 768, kernel_size=16, stride=16)
            self.class_token = nn.Parameter(torch.zeros(1, 1, 768))
            self.pos_embedding = nn.Parameter(torch.zeros(1, 197, 768))
            layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
            self.heads = nn.Linear(768, 1000)

    return ViT()


def size(numel: int) -> str:
    return f"{numel / 1e6:.1f}M" if numel >= 1e5 else f"{numel / 1e3:.1f}K"


def row(name: str, model: nn.Module) -> str:
    options = PruningOptions()
    selection = select_targets(
        model,
        include=options.include,
        exclude=options.exclude,
        op_types=options.op_types,
        skip_last_layer=options.skip_last_layer,
        skip_embeddings=options.skip_embeddings,
    )
    pruned = sum(t.param.numel() for t in selection.targets)
    kinds = sorted({f"{type(t.module).__name__}" for t in selection.targets})
    reasons = []
    for reason, names in selection.left_out_by_reason().items():
        reasons.append(f"{reason.split(',')[0]}: {size(sum(selection.left_out[n][0] for n in names))}")
    return (
        f"| {name} | {len(selection.targets)} ({', '.join(kinds)}) | {size(pruned)} | "
        f"{selection.left_out_share():.1%} | {'; '.join(reasons)} |"
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print("| model | layers pruned by default | weights pruned | left dense | left dense, by reason |")
    print("|---|---|---:|---:|---|")
    for name, build in _models().items():
        with torch.device("meta"):
            model = build()
        print(row(name, model))


if __name__ == "__main__":
    main()

"""The benchmark's two tasks: a CNN on scikit-learn's digits and a byte-level GPT on the stdlib's source.

A task is a plain-PyTorch description of one training run: a network builder, a deterministic
stream of training batches (batch ``i`` is the same on every call, every arm and every process), a
loss and a validation metric. Nothing here imports the pruning library, so the INC arm can import it
from its own virtual environment; the digits task reuses ``lightning_prune.demo`` for its data split
and its CNN, which needs only Lightning there.
"""

from __future__ import annotations

import math
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TASKS = ("digits", "gpt")
SIZES = ("quick", "default", "large")
Batch = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------- base
@dataclass
class Task:
    """One training run, described without any training framework.

    Args:
        name: ``"digits"`` or ``"gpt"``.
        steps: optimizer steps of every arm.
        lr: Adam learning rate.
        metric: name of the validation metric.
        higher_is_better: whether a larger ``metric`` is better (accuracy) or worse (loss).
        description: one line for the results.
        info: facts recorded with the results (corpus size, Python version, ...).
    """

    name: str
    steps: int
    lr: float
    metric: str
    higher_is_better: bool
    description: str
    info: dict[str, str] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A freshly initialised network (call under a fixed seed)."""
        raise NotImplementedError

    def batch(self, index: int) -> Batch:
        """Training batch ``index`` of the run; the same for every arm and process."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        """The training loss of ``net`` on ``batch``."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, net: nn.Module) -> dict[str, float]:
        """Validation numbers of ``net``; the key ``self.metric`` is the one compared."""
        raise NotImplementedError

    def optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of every arm: Adam over all parameters."""
        return torch.optim.Adam(net.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------------------- digits
class DigitsTask(Task):
    """The digits CNN of ``lightning_prune.demo`` on its 80/20 split, judged by validation accuracy.

    Batches come from one stream of seeded permutations of the training images, cut in batches of
    ``batch_size`` (an epoch boundary can fall inside a batch), so batch ``i`` is fixed by the seed.

    Args:
        seed: seed of the split and of the batch order.
        steps: optimizer steps.
        batch_size: images per batch.
    """

    def __init__(self, seed: int, steps: int, batch_size: int = 64) -> None:
        # Imported here: the module is otherwise free of the pruning library.
        from lightning_prune.demo import DigitsDataModule

        data = DigitsDataModule(seed=seed)
        data.setup()
        assert data.train_set is not None and data.val_set is not None
        self.train_x, self.train_y = data.train_set.tensors
        self.val_x, self.val_y = data.val_set.tensors
        self.batch_size = batch_size
        n = len(self.train_y)
        epochs = math.ceil(steps * batch_size / n) + 1
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
        super().__init__(
            name="digits",
            steps=steps,
            lr=3e-3,
            metric="val_acc",
            higher_is_better=True,
            description=(
                f"digits CNN conv32-conv64-fc128-fc10 (`lightning_prune.demo.build_network('cnn')`), "
                f"{n} train / {len(self.val_y)} val images, batch {batch_size}, Adam lr 3e-3, {steps} steps"
            ),
            info={"train_images": str(n), "val_images": str(len(self.val_y))},
        )

    def build(self) -> nn.Module:
        from lightning_prune.demo import build_network

        return build_network("cnn")

    def batch(self, index: int) -> Batch:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.train_x[rows], self.train_y[rows]

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y)

    @torch.no_grad()
    def evaluate(self, net: nn.Module) -> dict[str, float]:
        device = next(net.parameters()).device
        logits = net(self.val_x.to(device))
        y = self.val_y.to(device)
        return {
            "val_acc": float((logits.argmax(-1) == y).float().mean()),
            "val_loss": float(F.cross_entropy(logits, y)),
        }


# ---------------------------------------------------------------------------------------- gpt
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``nn.Linear`` q, k, v and output projections.

    Args:
        d_model: width of the residual stream.
        heads: attention heads (``d_model`` must divide evenly).
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.out(attended.transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU FFN of two ``nn.Linear``.

    Args:
        d_model: width of the residual stream.
        heads: attention heads.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteGPT(nn.Module):
    """A byte-level GPT: token and position embeddings, pre-norm blocks, final norm, linear head.

    The head is registered last, so "skip the last layer" leaves it dense in every arm.

    Args:
        context: longest sequence.
        d_model: width of the residual stream.
        heads: attention heads per block.
        layers: number of blocks.
    """

    def __init__(self, context: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(256, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(self.tokens(tokens) + self.positions(positions))))


#: Folders under the stdlib that are not the standard library proper, or are huge test suites.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """Bytes of the standard library's ``*.py`` files, split by file.

    Args:
        train: training text, files joined by a newline.
        val: held-out text, files joined by a newline.
        train_files: number of training files.
        val_files: number of held-out files.
        root: the stdlib folder read.
    """

    train: Tensor
    val: Tensor
    train_files: int
    val_files: int
    root: str


def load_corpus(max_bytes: int, val_every: int = 10) -> Corpus:
    """Read the stdlib's ``*.py`` files in sorted order until ``max_bytes``; every ``val_every``-th is held out.

    The selection depends only on the Python version: paths are sorted, and third-party folders
    (``site-packages``) and the test suites are skipped.

    Args:
        max_bytes: stop adding files once the total reaches this many bytes.
        val_every: file ``i`` (in sorted order) is a validation file when ``i % val_every == 0``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]))
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    for index, path in enumerate(paths):
        if total >= max_bytes:
            break
        data = path.read_bytes()
        total += len(data)
        (val if index % val_every == 0 else train).append(data)
    if not train or not val:
        raise RuntimeError(f"no stdlib source found under {root} (train {len(train)}, val {len(val)} files)")

    def as_tensor(parts: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()

    return Corpus(as_tensor(train), as_tensor(val), len(train), len(val), str(root))


@dataclass(frozen=True)
class GptSize:
    """Model and data sizes of the GPT task."""

    layers: int
    d_model: int
    heads: int
    context: int
    batch_size: int
    steps: int
    corpus_bytes: int
    val_windows: int


GPT_SIZES = {
    "quick": GptSize(layers=1, d_model=32, heads=2, context=32, batch_size=8, steps=24, corpus_bytes=200_000, val_windows=16),
    "default": GptSize(layers=2, d_model=128, heads=4, context=128, batch_size=8, steps=400, corpus_bytes=4_000_000, val_windows=256),
    "large": GptSize(layers=4, d_model=256, heads=8, context=256, batch_size=64, steps=4000, corpus_bytes=12_000_000, val_windows=1024),
}  # fmt: skip


class GptTask(Task):
    """A byte-level GPT on the stdlib's source, judged by validation loss (nats per byte) on held-out files.

    Training batches are windows at random offsets of the training text, batch ``i`` drawn from a
    generator seeded by ``(seed, i)``. Validation uses ``val_windows`` evenly spaced windows of the
    held-out files, the same for every arm.

    Args:
        seed: seed of the batch offsets.
        size: a :data:`GPT_SIZES` key.
        steps: optimizer steps (``None``: the size's).
    """

    def __init__(self, seed: int, size: str, steps: int | None = None) -> None:
        self.size = GPT_SIZES[size]
        self.seed = seed
        self.corpus = load_corpus(self.size.corpus_bytes)
        s = self.size
        span = len(self.corpus.val) - s.context - 1
        starts = torch.linspace(0, span, s.val_windows).long()
        self.val_windows = torch.stack([self.corpus.val[i : i + s.context + 1] for i in starts.tolist()])
        steps = s.steps if steps is None else steps
        super().__init__(
            name="gpt",
            steps=steps,
            lr=2e-3,
            metric="val_loss",
            higher_is_better=False,
            description=(
                f"byte-level GPT, {s.layers} pre-norm blocks, d_model {s.d_model}, {s.heads} heads, context "
                f"{s.context}, batch {s.batch_size}, Adam lr 2e-3, {steps} steps; stdlib source of Python "
                f"{platform.python_version()}: {len(self.corpus.train):,} train bytes "
                f"({self.corpus.train_files} files) / {len(self.corpus.val):,} val bytes "
                f"({self.corpus.val_files} held-out files), val loss over {s.val_windows} windows"
            ),
            info={
                "python": platform.python_version(),
                "train_bytes": str(len(self.corpus.train)),
                "val_bytes": str(len(self.corpus.val)),
                "train_files": str(self.corpus.train_files),
                "val_files": str(self.corpus.val_files),
            },
        )

    def build(self) -> nn.Module:
        s = self.size
        return ByteGPT(s.context, s.d_model, s.heads, s.layers)

    def batch(self, index: int) -> Batch:
        s = self.size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(
            0, len(self.corpus.train) - s.context - 1, (s.batch_size,), generator=generator
        )
        windows = torch.stack([self.corpus.train[i : i + s.context + 1] for i in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(net(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, net: nn.Module) -> dict[str, float]:
        device = next(net.parameters()).device
        total = 0.0
        for chunk in self.val_windows.split(64):
            chunk = chunk.to(device)
            logits = net(chunk[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        loss = total / (self.val_windows.shape[0] * (self.val_windows.shape[1] - 1))
        return {"val_loss": loss, "val_ppl": math.exp(loss)}


# ---------------------------------------------------------------------------------------- factory
DIGITS_STEPS = {"quick": 16, "default": 480, "large": 480}


def make_task(name: str, size: str, seed: int, steps: int | None = None) -> Task:
    """Build task ``name`` at ``size`` for ``seed``.

    Raises:
        ValueError: an unknown task or size, naming it.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {list(SIZES)}")
    if name == "digits":
        return DigitsTask(seed, DIGITS_STEPS[size] if steps is None else steps)
    if name == "gpt":
        return GptTask(seed, size, steps)
    raise ValueError(f"task={name!r} is not one of {list(TASKS)}")

"""The coursework-sized models and batches of the DP-SGD benchmarks (issue 9), shared by scripts.

Models a student might bring (the six of issue 9 and three more), each with a batch of random
inputs and labels of the right shapes (the timings do not depend on the values; the clipping
factors do a little, and random inputs give gradient norms above the clipping norm 1 for most
examples, as in early training):

- ``logreg``: logistic regression 784-10 (an ``nn.Sequential`` of one ``Linear``);
- ``mlp``: MLP 784-512-512-10 with ReLU;
- ``cnn-seq``: Opacus's MNIST CNN (its tutorial's ``SampleConvNet``) as an ``nn.Sequential``,
  28x28 inputs;
- ``cnn-module``: the same CNN as a custom ``nn.Module`` subclass (``F.relu``,
  ``F.max_pool2d`` in ``forward``);
- ``cifar-gn``: a CIFAR-sized CNN with GroupNorm, 3x32x32 inputs;
- ``text-emb``: a bag-of-embeddings text classifier, ``Embedding(10000, 64)`` on 64 token ids,
  mean over tokens, ``LayerNorm(64)``, ``Linear(64, 2)``;
- ``text-gru``: a recurrent text classifier, ``Embedding(10000, 64)`` on 32 token ids,
  ``GRU(64, 128)``, ``Linear(128, 2)`` on its final state (not in issue 9's list). Opacus takes
  no ``nn.GRU``: its methods get the same model with Opacus's ``DPGRU``, and the same weights;
- ``text-transformer``: ``Embedding(10000, 64)`` on 32 token ids, torch's
  ``TransformerEncoderLayer(64, 4 heads, 128)``, mean over tokens, ``Linear(64, 2)`` (not in issue
  9's list either). Opacus's methods get the same model with Opacus's ``DPMultiheadAttention``,
  and the same weights;
- ``text-transformer-tf``: the same laid out (T, B, 64), torch's default (``batch_first=False``),
  the head applied at every position before the mean (not in issue 9's list). Opacus gets
  ``make_private(batch_first=False)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 10_000
TOKENS = 64


class MnistCNN(nn.Module):
    """Opacus's MNIST CNN written as a student would: layers as attributes, a ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)  # (B, 16, 13, 13)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)  # (B, 32, 4, 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BagOfEmbeddings(nn.Module):
    """Token ids (B, T) -> embeddings -> mean over the tokens -> LayerNorm -> Linear."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(tokens).mean(dim=1)))


class RecurrentText(nn.Module):
    """Token ids (B, T) -> embeddings -> a GRU (``recurrent``) -> Linear on its final state."""

    def __init__(self, recurrent: type[nn.Module] = nn.GRU, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 64)
        self.rnn = recurrent(64, 128, batch_first=True)
        self.head = nn.Linear(128, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embedding(tokens))[1][0])


class TransformerText(nn.Module):
    """Token ids (B, T) -> embeddings -> torch's ``TransformerEncoderLayer`` (batch first, no
    dropout, so that the methods' gradients can be compared) -> mean -> Linear."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 64)
        self.encoder = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(dim=1))


class TimeFirstTransformerText(nn.Module):
    """:class:`TransformerText` laid out as torch's layers take it by default: the token ids
    (B, T) turned to (T, B), the encoder layer built with ``batch_first=False``, and the head
    applied at every position before the mean (the same function: a Linear commutes with a
    mean), so that every layer sees the examples along dimension 1, as Opacus's
    ``make_private(batch_first=False)`` assumes of all of them."""

    batch_first = False  # read by the benchmark's Opacus set-up

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 64)
        self.encoder = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0)
        self.head = nn.Linear(64, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens.t()))).mean(dim=0)


def _opacus_gru_text(built: nn.Module) -> nn.Module:
    from opacus.layers import DPGRU

    model = RecurrentText(DPGRU)
    for child, layer in model.named_children():  # DPGRU renames only its own state dict
        layer.load_state_dict(built.get_submodule(child).state_dict())
    return model


class _HeadsFirst(nn.Module):
    """Opacus 1.6's ``DPMultiheadAttention``, batch first, views its heads' outputs (B * heads,
    T, d) as (B, T, E) before its ``out_proj``, which puts heads in the place of positions (its
    pull request 825); this undoes that view: the rows become (B, T, heads * d) as torch's."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, embed = x.shape
        by_head = x.reshape(batch, self.heads, length, embed // self.heads)
        return by_head.transpose(1, 2).reshape(batch, length, embed)


def _opacus_transformer_text(built: nn.Module) -> nn.Module:
    """The model with its attention as Opacus's ``DPMultiheadAttention`` (what Opacus's
    ``ModuleValidator.fix`` puts in; batch first, its ``out_proj`` mended by
    :class:`_HeadsFirst`), with the same weights: the input projection split into its query, key
    and value layers."""
    from opacus.layers import DPMultiheadAttention

    model, state = type(built)(), {}
    first = getattr(built, "batch_first", True)
    attention = DPMultiheadAttention(64, 4, dropout=0.0, batch_first=first)
    if first:
        attention.out_proj = nn.Sequential(_HeadsFirst(4), attention.out_proj)
    model.encoder.self_attn = attention
    for name, value in built.state_dict().items():
        if ".in_proj_" not in name:
            state[name.replace(".out_proj.", ".out_proj.1." if first else ".out_proj.")] = value
            continue
        prefix, kind = name.split(".in_proj_")
        for part, third in zip(("qlinear", "klinear", "vlinear"), value.chunk(3), strict=True):
            state[f"{prefix}.{part}.{kind}"] = third
    model.load_state_dict(state)
    return model


def torch_names(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients by parameter name in torch's layout, for all methods alike: those of a
    ``DPMultiheadAttention``'s query, key and value layers joined as ``in_proj_weight`` and
    ``in_proj_bias``, its mended ``out_proj.1`` named ``out_proj``."""
    joined = {name.replace(".out_proj.1.", ".out_proj."): g for name, g in grads.items()}
    for name in [n for n in joined if ".qlinear." in n]:
        prefix, kind = name.split(".qlinear.")
        thirds = [joined.pop(f"{prefix}.{part}linear.{kind}") for part in "qkv"]
        joined[f"{prefix}.in_proj_{kind}"] = torch.cat(thirds)
    return joined


def _logreg() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def _cnn_seq() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _cifar_gn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16x16
        nn.Conv2d(32, 64, 3, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8
        nn.Conv2d(64, 64, 3, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class Spec(NamedTuple):
    """A benchmark model: its label in tables, a builder, the input shape and the classes."""

    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    tokens: bool = False  # inputs are token ids in [0, VOCAB) rather than floats
    # the model Opacus takes, if another, given the built model whose weights it copies
    for_opacus: Callable[[nn.Module], nn.Module] | None = None


MODELS: dict[str, Spec] = {
    "logreg": Spec("logistic regression 784-10", _logreg, (784,), 10),
    "mlp": Spec("MLP 784-512-512-10", _mlp, (784,), 10),
    "cnn-seq": Spec("MNIST CNN, Sequential", _cnn_seq, (1, 28, 28), 10),
    "cnn-module": Spec("MNIST CNN, custom Module", MnistCNN, (1, 28, 28), 10),
    "cifar-gn": Spec("CIFAR CNN + GroupNorm", _cifar_gn, (3, 32, 32), 10),
    "text-emb": Spec("Embedding + LayerNorm text", BagOfEmbeddings, (TOKENS,), 2, tokens=True),
    "text-gru": Spec(
        "Embedding + GRU text", RecurrentText, (32,), 2, tokens=True, for_opacus=_opacus_gru_text
    ),
    "text-transformer": Spec(
        "Embedding + Transformer text",
        TransformerText,
        (32,),
        2,
        tokens=True,
        for_opacus=_opacus_transformer_text,
    ),
    "text-transformer-tf": Spec(
        "Embedding + Transformer text, time first",
        TimeFirstTransformerText,
        (32,),
        2,
        tokens=True,
        for_opacus=_opacus_transformer_text,
    ),
}
#: The two linear models, whose target is 1.3x a non-private step (1.5x for the others).
LINEAR = ("logreg", "mlp")


def build_model(
    name: str, *, device: str = "cpu", seed: int = 0, opacus: bool = False
) -> nn.Module:
    """A fresh model ``name`` with the initial weights of ``seed``, on ``device``; with
    ``opacus``, the model Opacus takes where it is another, with the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name].build()
    if opacus and MODELS[name].for_opacus is not None:
        model = MODELS[name].for_opacus(model)
    return model.to(device)


def make_batch(
    name: str, batch_size: int, *, device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(x, y)`` of random inputs and labels for model ``name``, on ``device``."""
    spec = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    if spec.tokens:
        x = torch.randint(VOCAB, (batch_size, *spec.input_shape), generator=generator)
    else:
        x = torch.randn(batch_size, *spec.input_shape, generator=generator)
    y = torch.randint(spec.classes, (batch_size,), generator=generator)
    return x.to(device), y.to(device)

"""Small real models and training runs for the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class SmallCNN(nn.Module):
    """Conv + BatchNorm (integer num_batches_tracked) with a channels_last stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.stage.to(memory_format=torch.channels_last)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))

    @staticmethod
    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)


class TinyTransformer(nn.Module):
    """Embedding tied to the output projection, one encoder layer, LayerNorm."""

    def __init__(self, vocab: int = 37, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.encoder(self.embed(tokens))))

    @staticmethod
    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, 37, (4, 7), generator=generator)
        return tokens, torch.roll(tokens, 1, dims=1)


MODELS = {"cnn": SmallCNN, "transformer": TinyTransformer}


def training_run(kind: str, steps: int, seed: int = 0) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """The initial model and its state after each SGD step (fp32, on the CPU)."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    initial = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(steps):
        inputs, target = model.batch(generator)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return initial, states


def train(model: nn.Module, steps: int, after_step, seed: int = 0) -> None:
    """A real SGD loop over ``model`` (a ``MODELS`` class, any dtype), calling ``after_step(step)``
    (1, 2, ...) after each optimizer step, as training scripts call their EMA."""
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        inputs, target = model.batch(generator)
        logits = model(inputs.to(dtype) if inputs.is_floating_point() else inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step(step)


class OpLog(TorchDispatchMode):
    """The ATen/custom ops run inside the block: kernel launches and collectives alike."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


"""The implementations compared: each does one EMA update of an averaged copy per ``step``.

Every peer has a ``name``, ``setup(model)`` (build its averaged copy) and ``step(model)`` (one
update). ``make_peers`` lists them; ``warm_up`` runs the first, copying update and a few more so
that timed steps see steady state (plans built, allocator caches filled).
"""

from __future__ import annotations

import copy
import itertools
from typing import Protocol

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import wavg_fused as wf

__all__ = [
    "DECAY", "WARMUP", "Peer", "BlogLoop", "TorchAveragedModel", "TimmModelEmaV3", "EmaPytorch", "WavgFused",
    "FlatLerp", "make_peers", "warm_up",
]

DECAY = 0.999
WARMUP = 3


class Peer(Protocol):
    name: str

    def setup(self, model: nn.Module) -> None: ...

    def step(self, model: nn.Module) -> None: ...


class BlogLoop:
    """The seed blog's update: one Python iteration and four kernels per parameter."""

    name = "blog loop"

    def setup(self, model: nn.Module) -> None:
        self.avg = copy.deepcopy(model)
        self.n_averaged = 0

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        for p_avg, p in zip(self.avg.parameters(), model.parameters()):
            if self.n_averaged == 0:
                p_avg.copy_(p)
            else:
                p_avg.copy_(DECAY * p_avg + (1 - DECAY) * p)
        for b_avg, b in zip(self.avg.buffers(), model.buffers()):
            b_avg.copy_(b)
        self.n_averaged += 1


class TorchAveragedModel:
    """``torch.optim.swa_utils.AveragedModel`` with its foreach EMA (buffers copied, as ours)."""

    name = "AveragedModel"

    def setup(self, model: nn.Module) -> None:
        self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))

    def step(self, model: nn.Module) -> None:
        self.avg.update_parameters(model)


class TimmModelEmaV3:
    """timm's ``ModelEmaV3`` (foreach lerp), when timm is installed."""

    name = "timm ModelEmaV3"

    def setup(self, model: nn.Module) -> None:
        from timm.utils import ModelEmaV3

        self.avg = ModelEmaV3(model, decay=DECAY)

    def step(self, model: nn.Module) -> None:
        self.avg.update(model)


class EmaPytorch:
    """ema-pytorch's ``EMA`` with its foreach path, averaging every step, when installed."""

    name = "ema-pytorch"

    def setup(self, model: nn.Module) -> None:
        from ema_pytorch import EMA

        self.avg = EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True)

    def step(self, model: nn.Module) -> None:
        self.avg.update()  # it keeps a reference to the online model


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class WavgFused:
    """``wavg_fused.Averager`` pinned to one backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"wavg_fused[{backend}]"

    def setup(self, model: nn.Module) -> None:
        self.avg = wf.Averager(model, wf.EMA(DECAY), backend=self.backend)

    def step(self, model: nn.Module) -> None:
        self.avg.update(model)


class FlatLerp:
    """The limit: one ``lerp_`` over a flat fp32 buffer as large as the model's floating tensors.

    Any averaging update must at least read both copies and write one, which is what this does.
    """

    name = "flat lerp_"

    def setup(self, model: nn.Module) -> None:
        tensors = itertools.chain(model.parameters(), model.buffers())
        floating = [t for t in tensors if t.is_floating_point()]
        numel = sum(t.numel() for t in floating)
        self.model = torch.randn(numel, device=floating[0].device if floating else "cpu")
        self.avg = self.model.clone()

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        self.avg.lerp_(self.model, 1 - DECAY)


def make_peers(device: str = "cpu") -> list[Peer]:
    """All peers: the two baselines, one per available wavg_fused backend, then the limit."""
    wavg = [WavgFused(name) for name in wf.available_backends(device)]
    optional = [peer() for module, peer in (("timm", TimmModelEmaV3), ("ema_pytorch", EmaPytorch)) if _installed(module)]
    return [BlogLoop(), TorchAveragedModel(), *optional, *wavg, FlatLerp()]


def warm_up(peer: Peer, model: nn.Module, steps: int = WARMUP) -> None:
    """Set ``peer`` up for ``model`` and run ``steps`` untimed updates (the first one copies)."""
    peer.setup(model)
    for _ in range(steps):
        peer.step(model)

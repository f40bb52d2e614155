"""The implementations compared: each does one EMA update of an averaged copy per ``step``.

Every peer has a ``name``, ``setup(model, dtype)`` (build its averaged copy, in ``dtype`` or the
model's dtypes when ``None``) and ``step(model)`` (one update). A peer that cannot keep an average
in another dtype than the model's raises ``Unsupported`` from ``setup``. ``make_peers`` lists
them; ``warm_up`` runs the first, copying update and a few more so that timed steps see steady
state (plans built, allocator caches filled).
"""

from __future__ import annotations

import copy
import os
from typing import Protocol

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import wavg_fused as wf

from .limit import make_proxies

__all__ = [
    "DECAY", "WARMUP", "Peer", "Unsupported", "BlogLoop", "TorchAveragedModel", "TimmModelEmaV3", "EmaPytorch", "WavgFused",
    "make_peers", "warm_up",
]

DECAY = 0.999
WARMUP = 3


class Unsupported(Exception):
    """The peer has no way to run this case (e.g. an fp32 average of a bf16 model)."""


class Peer(Protocol):
    name: str

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None: ...

    def step(self, model: nn.Module) -> None: ...


class BlogLoop:
    """The seed blog's update: one Python iteration and four kernels per parameter."""

    name = "blog loop"

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        self.avg = copy.deepcopy(model) if dtype is None else copy.deepcopy(model).to(dtype)
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

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        if dtype is not None:  # its foreach lerp_ needs equal dtypes ("expected dtype float for `end`")
            raise Unsupported("AveragedModel keeps the model's dtypes")
        self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))

    def step(self, model: nn.Module) -> None:
        self.avg.update_parameters(model)


class TimmModelEmaV3:
    """timm's ``ModelEmaV3`` (foreach lerp), when timm is installed."""

    name = "timm ModelEmaV3"

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        from timm.utils import ModelEmaV3

        # its stochastic rounding only touches bf16 averages; off, so it does what the others do
        self.avg = ModelEmaV3(model, decay=DECAY, dtype=dtype, stochastic_rounding=False)

    def step(self, model: nn.Module) -> None:
        self.avg.update(model)


class EmaPytorch:
    """ema-pytorch's ``EMA`` with its foreach path, averaging every step, when installed."""

    name = "ema-pytorch"

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        from ema_pytorch import EMA

        options = {} if dtype is None else {"ema_model": copy.deepcopy(model).to(dtype), "coerce_dtype": True}
        self.avg = EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True, **options)

    def step(self, model: nn.Module) -> None:
        self.avg.update()  # it keeps a reference to the online model


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class WavgFused:
    """``wavg_fused.Averager`` pinned to one backend; ``guarded``: with ``skip_nonfinite=True``,
    whose extra cost (a read-only pass over the model) the benchmark reports beside it."""

    def __init__(self, backend: str, guarded: bool = False) -> None:
        self.backend, self.guarded = backend, guarded
        self.name = f"wavg_fused[{backend}]" + (" +guard" if guarded else "")

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        self.avg = wf.Averager(model, wf.EMA(DECAY), dtype=dtype, backend=self.backend, skip_nonfinite=self.guarded)

    def step(self, model: nn.Module) -> None:
        self.avg.update(model)


def make_peers(device: str = "cpu") -> list[Peer]:
    """All peers: the baselines, one per available wavg_fused backend (the first also with the
    non-finite guard), then the limit's proxies (``limit.py``), the fastest backend's among them."""
    # Triton's CPU interpreter (TRITON_INTERPRET=1, as the tests set) checks kernels; timing it is moot
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    wavg = [WavgFused(name) for name in wf.available_backends(device) if not (name == "triton" and interpreted)]
    wavg.insert(1, WavgFused(wavg[0].backend, guarded=True))  # the guard's cost on the fastest backend
    optional = [peer() for module, peer in (("timm", TimmModelEmaV3), ("ema_pytorch", EmaPytorch)) if _installed(module)]
    return [BlogLoop(), TorchAveragedModel(), *optional, *wavg, *make_proxies(wavg[0].backend)]


def warm_up(peer: Peer, model: nn.Module, dtype: torch.dtype | None = None, steps: int = WARMUP) -> None:
    """Set ``peer`` up for ``model`` and run ``steps`` untimed updates (the first one copies)."""
    peer.setup(model, dtype)
    for _ in range(steps):
        peer.step(model)

"""What the peer drop-ins share: an ``Averager`` held out of the module tree, its module shown.

A peer's state dict has only its own keys (timm: ``module.*``; ema-pytorch: ``ema_model.*`` and
its counters), so the averager cannot be a registered submodule (its ``n_averaged`` and
``_extra_state`` would appear). Its averaged module is registered under the peer's name instead,
and ``.to()`` / ``.half()`` go through the averager, which packs the moved tensors into flat
storage again, rather than through the bare module, which would leave them scattered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..averager import Averager
from ..methods import EMA


class AveragerHolder(nn.Module):
    """Base of the drop-ins: ``_averager`` (not a child) and ``_blend(model, decay)``."""

    _averager: Averager | None

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_averager"] = None

    def _hold(self, averager: Averager) -> nn.Module:
        # Every drop-in's average starts as the model (its deepcopy) and its first update already
        # blends: the copy counts as averaged, so w_n = 1 - decay from the first update on.
        averager.n_averaged.fill_(1)
        self.__dict__["_averager"] = averager
        return averager.module

    def _blend(self, model: nn.Module, decay: float) -> None:
        """One fused update with this decay (0 copies): the decay is a host float the peer's
        schedule computed, so changing it re-plans nothing (the kernels take it as an argument).
        ``Averager.update`` runs under ``no_grad`` itself."""
        averager = self._averager
        assert averager is not None
        if averager.method.decay != decay:
            averager.method = EMA(decay)
        averager.update(model)

    def _apply(self, fn: Callable, recurse: bool = True) -> AveragerHolder:
        averager = self._averager
        if not recurse or averager is None:
            return super()._apply(fn, recurse)
        averager._apply(fn)  # nn.Module's conversion hook; the averager repacks its storage there
        for child in self.children():
            if child is not averager.module:
                child._apply(fn)
        return super()._apply(fn, recurse=False)

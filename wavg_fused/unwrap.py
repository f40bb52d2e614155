"""Unwrapping the containers PyTorch puts around a model, so the averaged copy is the plain module."""

from __future__ import annotations

from torch import nn

__all__ = ["de_parallel"]


def de_parallel(model: nn.Module) -> nn.Module:
    """The module inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> de_parallel(torch.nn.DataParallel(net)) is net
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(inner := model._modules.get("_orig_mod"), nn.Module):
            model = inner  # torch.compile's wrapper registers the module as a child (hasattr raised through __getattr__)
        else:
            return model

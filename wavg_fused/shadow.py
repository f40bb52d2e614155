"""One average of a model: its module (the averaged copy), the flat storage behind that module's
tensors, and which tensors are averaged and which copied.

The module is ``copy.deepcopy(model)`` (or a ``ShardedCopy`` of an FSDP2 model's shards, or a
module the user hands over); packing moves its tensors into flat buffers (``storage``) in place,
so the module stays an ordinary ``nn.Module`` whose tensors are views of those buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .plan import ROLE_AVERAGE, ROLE_COPY, check_kernel_dtypes, check_structure
from .sharded import copy_model, has_dtensors, local, pack_sharded_module
from .slots import TensorSlots
from .storage import ShadowStorage, named_tensors, pack_module
from .unwrap import de_parallel

__all__ = ["Shadow", "pack", "excluded"]


def pack(module: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> ShadowStorage:
    """``storage.pack_module``, or its DTensor form for a module holding DTensors (FSDP2, tensor
    parallel: this rank's local shards are packed)."""
    if has_dtensors(module):
        return pack_sharded_module(module, device, dtype)
    return pack_module(module, device, dtype)


def excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether ``name`` is an ``exclude`` entry or lies under one (a module prefix).

    >>> excluded("head.weight", ["head"]), excluded("header.weight", ["head"])
    (True, False)
    """
    return any(name == entry or name.startswith(entry + ".") for entry in exclude)


def _adopt(averaged_module: nn.Module, model: nn.Module) -> nn.Module:
    """``averaged_module`` as the averaged copy of ``model``, checked before anything changes."""
    if not isinstance(averaged_module, nn.Module):
        raise TypeError(f"averaged_module must be an nn.Module, got {type(averaged_module).__name__}")
    averaged_module = de_parallel(averaged_module)
    shadow_pairs, model_pairs = named_tensors(averaged_module), named_tensors(model)
    shadow_names, shadows = [n for n, _ in shadow_pairs], [t for _, t in shadow_pairs]
    models = [t for _, t in model_pairs]
    try:
        check_structure(shadow_names, shadows, [n for n, _ in model_pairs], models)
    except ValueError as error:
        raise ValueError(f"averaged_module does not match the model: {error}") from None
    # it becomes storage we write on every update: sharing memory with the model would corrupt it
    model_memory = {local(m).data_ptr() for m in models if local(m).numel()}  # a DTensor's bytes: its shard
    shared = [n for n, s in zip(shadow_names, shadows) if local(s).numel() and local(s).data_ptr() in model_memory]
    if averaged_module is model or shared:
        raise ValueError(f"averaged_module must be a separate module; it shares {shared[:3] or 'everything'} with the model")
    return averaged_module


class Shadow:
    """The averaged copy of ``model`` in flat storage, with the roles of its tensors.

    Floating parameters are averaged (and floating buffers with ``use_buffers``), unless a name
    is under ``exclude``; everything else is copied from the model on each update.

    >>> shadow = Shadow(torch.nn.BatchNorm1d(2))
    >>> shadow.names, shadow.roles()
    (['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'], [1, 1, 0, 0, 0])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        use_buffers: bool = False,
        exclude: Sequence[str] = (),
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        averaged_module: nn.Module | None = None,
    ) -> None:
        self.use_buffers = use_buffers
        self.exclude = tuple(exclude)
        if averaged_module is None:
            self.module = copy_model(model)  # copy.deepcopy, or the shards of an FSDP2 model
            self.storage = pack(self.module, device, dtype)
        else:
            self.module = _adopt(averaged_module, model)
            self.storage = pack(self.module, device, dtype)
            with torch.no_grad():
                for (_, shadow), (_, value) in zip(named_tensors(self.module), named_tensors(model)):
                    shadow.copy_(value.detach())
        self._slots: TensorSlots | None = None
        for entry in self.exclude:
            if not any(excluded(name, (entry,)) for name in self.names):
                raise ValueError(f"exclude: {entry!r} names no parameter or buffer of the model (nor a module prefix)")
        # dtypes no kernel handles (float8 ...) fail now, naming the tensor, not at the first update
        shadows = self.tensors()
        check_kernel_dtypes(self.names, shadows, [t for _, t in named_tensors(model)], self.roles(shadows))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slots": None}  # they point into the module's dicts: found again

    @property
    def slots(self) -> TensorSlots:
        if self._slots is None:
            self._slots = TensorSlots.of(self.module)
        return self._slots

    @property
    def names(self) -> list[str]:
        return self.slots.names

    @property
    def counter_device(self) -> torch.device:
        """Where the counters go when no ``device=`` was given: the first storage buffer's device."""
        return next(iter(self.storage.flats), (torch.device("cpu"),))[0]

    def tensors(self) -> list[torch.Tensor]:
        return self.slots.read()

    def roles(self, shadows: Sequence[torch.Tensor] | None = None) -> list[int]:
        """``plan.ROLE_AVERAGE`` or ``ROLE_COPY`` per tensor (``names`` order)."""
        shadows = self.tensors() if shadows is None else shadows
        num_params = sum(1 for _ in self.module.parameters())
        return [
            ROLE_AVERAGE
            if shadow.is_floating_point() and (index < num_params or self.use_buffers) and not excluded(name, self.exclude)
            else ROLE_COPY
            for index, (name, shadow) in enumerate(zip(self.names, shadows))
        ]

    def repack(self) -> None:
        """Pack the module's tensors into new flat buffers (after ``.to()``, a load with
        ``assign=True``, or anything else that replaced them)."""
        self.storage = pack(self.module)
        self._slots = None

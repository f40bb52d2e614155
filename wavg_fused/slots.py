"""Where a module keeps its tensors: the (dict, key) slot of every parameter and buffer, so an
update reads them without walking the module, and the watch can see any of them replaced.

``names`` / ``slots`` list each tensor once (tied tensors under their first name, as
``named_parameters`` does); ``aliases`` are the slots of every further name of a tied tensor
(``out.weight`` when it is ``embed.weight``), watched so that untying one shows; ``modules`` are
the (parent's ``_modules`` dict, key) slots of every submodule, since ``model.fc = nn.Linear(...)``
leaves the old module's dicts, which the tensor slots point into, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .storage import named_tensors

__all__ = ["Slot", "TensorSlots", "tied_names"]

Slot = tuple[dict, str]  # (a module's _parameters, _buffers or _modules dict, the key in it)


def _owner_slot(module: nn.Module, name: str) -> Slot:
    owner_path, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    return (owner._parameters if attribute in owner._parameters else owner._buffers), attribute


def tied_names(module: nn.Module) -> dict[str, str]:
    """Every further name of a tied tensor -> the name ``named_tensors`` lists it under.

    >>> m = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    >>> m["b"].weight = m["a"].weight
    >>> tied_names(m)
    {'b.weight': 'a.weight'}
    """
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    everything = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, tensor in everything:
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


@dataclass
class TensorSlots:
    """The slots of ``module``'s tensors, read again with ``read()`` (a ``KeyError`` if one was
    removed from its module).

    >>> lin = torch.nn.Linear(2, 3)
    >>> slots = TensorSlots.of(lin)
    >>> slots.names, [t.shape for t in slots.read()]
    (['weight', 'bias'], [torch.Size([3, 2]), torch.Size([3])])
    """

    names: list[str]
    slots: list[Slot]
    aliases: list[Slot]
    modules: list[Slot]

    @classmethod
    def of(cls, module: nn.Module) -> TensorSlots:
        names = [name for name, _ in named_tensors(module)]
        aliases = [_owner_slot(module, name) for name in tied_names(module)]
        submodules = [(parent._modules, key) for parent in module.modules() for key, child in parent._modules.items() if child is not None]
        return cls(names, [_owner_slot(module, name) for name in names], aliases, submodules)

    def read(self) -> list[torch.Tensor]:
        return [table[key] for table, key in self.slots]

"""Knowing, every update, whether the plan still describes the model: the addresses of all model
and shadow tensors, looked up where the modules keep them, against the addresses the plan was
built for, and the identity of every submodule (``model.fc = nn.Linear(...)`` leaves the old
module's tensors where they were, so only the parent's ``_modules`` entry shows the change).
Host metadata only: no device is ever synchronised.

The watch holds every value it watches: a submodule freed after ``del model.fc`` could otherwise
be followed by a new one at the same ``id()`` (CPython reuses addresses at once), and the
replacement would go unseen.

With the compiled extension this walk runs in C++ (``csrc/address_watch.cpp``: a module dict is
looked up again only once it was mutated, and each tensor's own fields are read directly); without
it, in Python.
"""

from __future__ import annotations

import torch

from .sharded import address, local
from .slots import Slot

try:
    from ._C import watch_first_moved as _first_moved
    from ._C import watch_record as _record
except ImportError:  # no compiled extension: the Python walk below
    _first_moved = _record = None

__all__ = ["AddressWatch"]


def _identity(value: object) -> int:
    # what first_moved compares: a tensor's data address (a DTensor's: its local tensor's),
    # anything else's id()
    return address(value) if isinstance(value, torch.Tensor) else id(value)


def _layout(value: object, with_grad: bool = True) -> tuple | None:
    # the Python walk's view of a tensor: the same address seen through another view
    # (``p.data = p.data.t()``) is a change too
    if not isinstance(value, torch.Tensor):
        return None
    value = local(value)
    return (value.dtype, value.shape, value.stride(), value.requires_grad if with_grad else None)


class AddressWatch:
    """Remembers where the tensors in ``slots`` are; ``moved()`` says if any of them is not.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> watch = AddressWatch([(lin._parameters, "weight")])
    >>> watch.moved()
    False
    >>> lin.weight.data = torch.zeros(2, 2)
    >>> watch.moved()
    True
    """

    def __init__(self, slots: list[Slot], module_slots: list[Slot] = (), *, flagless_slots: list[Slot] = ()) -> None:
        """``slots`` hold tensors (watched by address, view and ``requires_grad``), ``flagless_slots``
        tensors whose ``requires_grad`` nothing follows (an average's own: only the model's flag is
        copied onto the average, so a flag set on the average needs no new plan, and each flag
        read is two more cache lines a tensor), ``module_slots`` submodules (by identity)."""
        flagged = len(slots)
        slots = list(slots) + list(flagless_slots)
        self._tensor_count = len(slots)
        slots += list(module_slots)
        self._tables = [table for table, _ in slots]
        self._keys = [key for _, key in slots]
        self._expected_list = [_identity(table[key]) for table, key in slots]
        self._flagged = flagged
        self._layouts_list = self._layouts([table[key] for table, key in slots])
        self._record = _record(self._tables, self._keys, flagged) if _record is not None else None
        self._held = [table[key] for table, key in slots]  # ids and addresses stay unique while watched

    def _layouts(self, values: list[object]) -> list[tuple | None]:
        return [_layout(value, index < self._flagged) for index, value in enumerate(values)]

    def current_and_expected(self) -> tuple[list[torch.Tensor], list[int]]:
        """The watched tensors as the modules hold them now, and the addresses they had: for a
        check that runs later, inside a compiled graph (``compiled.check_unmoved``)."""
        count = self._tensor_count
        return [table[key] for table, key in zip(self._tables[:count], self._keys[:count])], self._expected_list[:count]

    def modules_replaced(self) -> bool:
        """Whether a watched submodule slot holds another module now (the tensors' slots, which
        point into the old modules' dicts, are then stale)."""
        count = self._tensor_count
        return any(
            table.get(key) is None or id(table[key]) != expected
            for table, key, expected in zip(self._tables[count:], self._keys[count:], self._expected_list[count:])
        )

    @property
    def record(self) -> object | None:
        """The compiled walk's record of the slots (what ``moved()`` checks), for a backend that
        runs the check itself before it writes; None without the compiled extension."""
        return self._record

    def moved(self) -> bool:
        if _first_moved is not None and self._record is not None:
            return _first_moved(self._record) >= 0
        try:
            values = [table[key] for table, key in zip(self._tables, self._keys)]
        except KeyError:
            return True
        return list(map(_identity, values)) != self._expected_list or self._layouts(values) != self._layouts_list

"""Knowing, every update, whether the plan still describes the model: the addresses of all model
and shadow tensors, looked up where the modules keep them, against the addresses the plan was
built for. Host metadata only: no device is ever synchronised.

With the compiled extension this walk runs in C++ (about 10 ns a tensor); without it, in Python.
"""

from __future__ import annotations

import torch

try:
    from ._C import first_moved as _first_moved
except ImportError:  # no compiled extension: the Python walk below
    _first_moved = None

__all__ = ["AddressWatch"]

Slot = tuple[dict, str]  # (a module's _parameters or _buffers dict, the key in it)


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

    def __init__(self, slots: list[Slot]) -> None:
        self._tables = [table for table, _ in slots]
        self._keys = [key for _, key in slots]
        self._expected_list = [table[key].data_ptr() for table, key in slots]
        self._expected = torch.tensor(self._expected_list, dtype=torch.int64)

    def moved(self) -> bool:
        if _first_moved is not None:
            return _first_moved(self._tables, self._keys, self._expected) >= 0
        try:
            current = [table[key].data_ptr() for table, key in zip(self._tables, self._keys)]
        except (KeyError, AttributeError):
            return True
        return current != self._expected_list

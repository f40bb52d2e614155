"""``Averager.update`` inside ``torch.compile``: the same fused op, with the host-side plan
bookkeeping replaced by what a graph can carry.

Eager updates watch the model's tensor addresses on the host (``watch.AddressWatch``), which
Dynamo cannot trace. In a graph the model and shadow tensors are graph inputs instead, and
``check_unmoved`` verifies at run time, before the fused op reads the plan's addresses, that
they are still the tensors the plan was built for; a moved tensor raises instead of reading
freed memory. Rebuilding a plan is host work: one eager ``update`` does it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sharded import address as _address  # a DTensor's bytes are its local tensor's

__all__ = ["check_unmoved"]


@torch.library.custom_op("wavg_fused::check_unmoved", mutates_args=("token",))
def check_unmoved(token: torch.Tensor, tensors: Sequence[torch.Tensor], expected: Sequence[int]) -> None:
    """Raise ``RuntimeError`` unless ``tensors[i]`` lives at address ``expected[i]`` for every i.

    ``token`` is declared mutated (it is not written) so the compiler keeps the call, which
    has no outputs, in the graph and before the update that uses the same token.

    >>> import torch
    >>> x = torch.ones(2)
    >>> check_unmoved(torch.zeros(()), [x], [x.data_ptr()])
    """
    for index, (tensor, address) in enumerate(zip(tensors, expected)):
        if _address(tensor) != address:
            raise RuntimeError(
                f"Averager.update under torch.compile: model or shadow tensor #{index} was replaced or moved "
                "since the plan was built (the compiled graph cannot rebuild it); call avg.update(model) once "
                "outside the compiled function after changing the model"
            )


@check_unmoved.register_fake
def _(token: torch.Tensor, tensors: Sequence[torch.Tensor], expected: Sequence[int]) -> None:
    return None

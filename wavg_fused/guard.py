"""The non-finite guard (``skip_nonfinite=True``): skip a whole update when any averaged model
value is Inf or NaN, decided on the device, and say so on the host when it keeps happening.

Each plan's check pass sets its flag (``plan.workspace[NONFINITE_SLOT]``); with several devices
(or ranks) the flags are combined so that all of them skip or none does. The update kernels read
the flag and bump ``n_skipped`` instead of ``n_averaged``. None of that waits for the device.

``SkipWatch`` turns a silent skip into one warning: it reads ``n_skipped`` without a sync (at
once on the CPU, a pinned copy checked at the next update on a GPU) and warns, naming the tensor,
when the first update or a run of ``RUN_LENGTH`` updates in a row was skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .plan import NONFINITE_SLOT, ROLE_AVERAGE, Plan

__all__ = ["RUN_LENGTH", "combine_flags", "skip_on_host", "first_nonfinite", "SkipWatch"]

RUN_LENGTH = 10  # updates skipped in a row before the guard warns (the first update warns at once)


def combine_flags(runs: Sequence[tuple[Plan, object]], counter_device: torch.device, sharded: bool) -> torch.Tensor | None:
    """After every plan's check pass: make every plan's flag the OR of all of them (and of all
    ranks when the shadows are shards). Returns the flag on the counter's device when no plan
    lives there to bump the counters, else None."""
    if sharded and torch.distributed.is_initialized():
        # Each rank checked its own shards: an Inf on one rank must skip the update on all of
        # them, or their averages (and n_averaged) drift apart. One tiny all-reduce per plan,
        # stream-ordered on the GPU (no host sync); the guard's only collective.
        for plan, _ in runs:
            torch.distributed.all_reduce(plan.workspace[NONFINITE_SLOT : NONFINITE_SLOT + 1], torch.distributed.ReduceOp.MAX)
    if len(runs) == 1 and runs[0][0].device == counter_device:
        return None  # the common case: one device decides alone, on the device
    flags = [plan.workspace[NONFINITE_SLOT : NONFINITE_SLOT + 1] for plan, _ in runs]
    anywhere = torch.zeros(1, dtype=torch.long, device=counter_device)
    for flag in flags:  # into host memory: blocking, the CPU reads it next
        anywhere = torch.maximum(anywhere, flag.to(counter_device, torch.long, non_blocking=counter_device.type != "cpu"))
    for flag in flags:
        flag.copy_(anywhere, non_blocking=flag.device.type != "cpu")
    return anywhere.squeeze(0)


def first_nonfinite(runs: Sequence[tuple[Plan, object]]) -> str | None:
    """The name of the first averaged model tensor holding an Inf or a NaN (reads the device)."""
    for plan, _ in runs:
        for name, model, role in zip(plan.names, plan.models, plan.roles):
            if role == ROLE_AVERAGE and model.numel() and not bool(torch.isfinite(model).all()):
                return name
    return None


def skip_on_host(runs: Sequence[tuple[Plan, object]]) -> bool:
    """The guard for a user's avg_fn, whose slow path reads the device anyway."""
    return first_nonfinite(runs) is not None


class SkipWatch:
    """Warns once when the guard skipped the first update or ``RUN_LENGTH`` in a row.

    >>> watch = SkipWatch()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     watch.after_update(torch.tensor(1), torch.tensor(0), lambda: "mask")  # the first update was skipped
    >>> "the first update" in str(caught[0].message) and "'mask' holds an Inf" in str(caught[0].message)
    True
    """

    def __init__(self) -> None:
        self._seen = 0  # n_skipped when last read
        self._streak = 0
        self._warned = False
        self._host: torch.Tensor | None = None  # pinned [n_skipped, n_averaged], made once
        self._event: torch.cuda.Event | None = None  # recorded after the copies into _host
        self._pending = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_host": None, "_event": None, "_pending": False}  # a CUDA event does not pickle

    def after_update(self, n_skipped: torch.Tensor, n_averaged: torch.Tensor, culprit: object) -> None:
        """Call after each guarded update; ``culprit()`` names the tensor (it may read the device)."""
        if self._warned:
            return
        if n_skipped.device.type == "cpu":
            self._read(int(n_skipped), int(n_averaged), culprit)
            return
        if self._pending and self._event.query():
            self._pending = False
            skipped, averaged = self._host.tolist()
            self._read(skipped, averaged, culprit)
        if not self._pending:  # no sync: the copies land while training goes on
            if self._host is None:
                self._host = torch.empty(2, dtype=torch.long, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host[0].copy_(n_skipped, non_blocking=True)
            self._host[1].copy_(n_averaged, non_blocking=True)
            self._event.record()
            self._pending = True

    def _read(self, skipped: int, averaged: int, culprit: object) -> None:
        self._streak = self._streak + (skipped - self._seen) if skipped > self._seen else 0
        self._seen = skipped
        if not skipped or not (averaged == 0 or self._streak >= RUN_LENGTH):
            return
        self._warned = True
        what = "the first update" if averaged == 0 else f"{self._streak} updates in a row"
        name = culprit()
        warnings.warn(
            f"skip_nonfinite: the guard skipped {what} (n_skipped={skipped}, n_averaged={averaged}): averaged "
            f"tensor {name!r} holds an Inf or a NaN. Averaged buffers are checked too (use_buffers=True): "
            f"exclude a buffer that holds -inf on purpose (exclude=[{name!r}]). This warning is shown once",
            RuntimeWarning,
            stacklevel=4,
        )

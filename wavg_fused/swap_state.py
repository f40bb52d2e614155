"""The average while it is swapped into a live model: what was done to put it there, and how to
take it out again exactly (``Averager.swap`` / ``swapped``).

Going in, the model memory the plans address is pinned (held) and the average is either
exchanged with the model's values in place (equal dtypes) or cast into the model after a backup
of the live values. Coming out, the same launches in reverse, unless a model tensor was replaced
meanwhile (``model.half()`` inside the block): then the slow path restores tensor by tensor.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from . import swap
from .sharded import local_named_tensors, reshard_fsdp
from .unwrap import de_parallel

__all__ = ["SwappedIn", "SwapMethods", "refuse_while_swapped", "NOT_WHILE_SWAPPED"]

NOT_WHILE_SWAPPED = (
    "the averaged weights are swapped into the model: call swap(model) again (or leave the "
    "swapped() block) first"
)
_FLAG = "_wavg_swapped_in"  # set on the averaged module while its average is in a model


def refuse_while_swapped(module: nn.Module, *args: object) -> None:
    """A forward and state-dict pre-hook on the averaged module: while the average is swapped
    in (exchanged), the module holds the *live* weights, so running or saving it would use them
    as if they were the average."""
    if module.__dict__.get(_FLAG):
        raise RuntimeError(f"the averaged module (avg.module) cannot run or be saved while {NOT_WHILE_SWAPPED}")


class SwappedIn:
    """Put the average of ``runs`` into ``model`` now; ``take_out`` undoes it."""

    def __init__(self, runs: Sequence[tuple], model: nn.Module) -> None:
        self.runs = list(runs)
        self.model = weakref.ref(model)
        self.pinned = swap.pin_model(self.runs)
        if swap.can_exchange(self.runs):
            swap.exchange(self.runs)
            self.backups = None
        else:
            self.backups = swap.save_model(self.runs)
            swap.copy_into_model(self.runs)

    def check_owner(self, model: nn.Module) -> None:
        """Raise unless the average is in ``model`` (or in a model that was deleted since)."""
        target = self.model()
        if target is not None and target is not model:
            raise RuntimeError("Averager.swap: the averaged weights are swapped into another model; swap that one back")

    def take_out(self, model: nn.Module, moved: Callable[[], bool]) -> None:
        """Restore ``model``'s own weights and the average. ``moved()`` says whether a model
        tensor moved since the plans were built (the watch)."""
        if self.model() is None:  # deleted while the average was in it (its memory is pinned): take the average back
            swap.restore_replaced(self.runs, self.pinned, self.backups, {})
            raise RuntimeError(
                "Averager.swap: the model the average was swapped into was deleted; the average is back "
                "in the averager and nothing was swapped (call swap again to swap it into this model)"
            )
        if moved():
            reshard_fsdp(model)  # an eval forward inside the block leaves an FSDP2 root unsharded
        if not moved():
            if self.backups is None:
                swap.exchange(self.runs)
            else:
                swap.restore_model(self.backups)
            return
        # A model tensor was replaced meanwhile (model.half(), .to(), a new Parameter): the plans'
        # addresses are the old memory (kept alive by `pinned`), so restore tensor by tensor.
        replaced, lost = swap.restore_replaced(self.runs, self.pinned, self.backups, dict(local_named_tensors(model)))
        if lost:
            raise RuntimeError(
                f"Averager.swap: the model lost or reshaped {lost[:3]} while the average was swapped in; "
                "the average is back in the averager, but those tensors' trained values could not be restored"
            )
        if replaced:
            warnings.warn(
                f"Averager.swap: model tensors {replaced[:3]} ({len(replaced)} in all) were replaced while the "
                "average was swapped in (.to(), .half(), a new Parameter); their trained values were copied "
                "into the new tensors one by one, cast to their dtypes. Keep the model's tensors in place "
                "inside a swapped() block",
                RuntimeWarning,
                stacklevel=4,
            )


class SwapMethods:
    """``Averager``'s swapping methods (``copy_to``, ``swap``, ``swapped``, ``is_swapped``); they
    use its ``_engine``, ``module``, ``n_averaged``, ``_calls`` and ``schedule``."""

    def _check_averaged(self, action: str) -> None:
        # Refuse an average no update has written (Lightning #21724 swapped uninitialised weights
        # in). The schedule's warm-up (update_after) copies the model in without counting: known
        # on the host. Otherwise n_averaged is read, which waits for the device: acceptable for an
        # evaluation-time call, never done by update().
        if min(self._calls, self.schedule.update_after) > 0:
            return
        if int(self.n_averaged) == 0:
            raise RuntimeError(f"Averager.{action}: the average was never updated (n_averaged == 0); call update(model) first")

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into ``model``'s matching tensors (cast to their dtypes).

        Parameters and buffers, as the averager holds them (with ``use_buffers=False`` the
        buffers as of the last update). One launch per device on the fused backends. The model
        keeps them: use ``swapped`` to evaluate the average and get the trained weights back.
        Raises ``RuntimeError`` if no update ever wrote the average (checking reads
        ``n_averaged``, which waits for the GPU) or while the average is swapped in.

        Examples:
            >>> import torch, wavg_fused as wf
            >>> model = torch.nn.Linear(3, 1)
            >>> avg = wf.Averager(model, wf.EMA(0.5)); avg.update(model)
            >>> with torch.no_grad(): _ = model.weight.add_(1.0)
            >>> avg.copy_to(model); torch.equal(model.weight, avg.module.weight)
            True
        """
        model = self._checked_model(model, "copy_to")
        self._check_averaged("copy_to")
        swap.copy_into_model(self._engine.runs(model, self._member))

    @property
    def is_swapped(self) -> bool:
        """Whether the averaged weights are swapped into a model now."""
        return self._swapped is not None

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Put the averaged weights into ``model``, or, if they are in already, take them out and
        restore ``model``'s own weights exactly. One launch per device each way (fused backends;
        an average in another dtype takes two to go in: backup, then copy).

        With equal dtypes the two are exchanged in place (no extra memory); for an average kept
        in another dtype (``dtype=torch.float32`` of a bf16 model) the model's weights are saved
        in a backup buffer while the average is in. While swapped in, ``update``, ``copy_to``,
        ``state_dict``, ``.to()``, pickling and the averager's forward (and its module's forward
        and ``state_dict``) raise: after an exchange ``self.module`` holds the model's weights,
        so evaluate ``model``. Treat the model's weights as read-only meanwhile: in-place changes
        (``update_bn``) end up in the average after an exchange and are dropped after a backup.
        Swapping in raises ``RuntimeError`` if no update ever wrote the average (checking reads
        ``n_averaged``: it waits for the GPU).

        Examples:
            >>> import torch, wavg_fused as wf
            >>> model = torch.nn.Linear(3, 1)
            >>> avg = wf.Averager(model, wf.SWA()); avg.update(model)
            >>> trained = model.weight.detach().clone()
            >>> with torch.no_grad(): _ = model.weight.mul_(3.0)
            >>> avg.swap(model); torch.equal(model.weight, trained), avg.is_swapped
            (True, True)
            >>> avg.swap(model); torch.equal(model.weight, 3 * trained), avg.is_swapped
            (True, False)
        """
        model = de_parallel(model)
        swapped = self._swapped
        if swapped is not None:
            swapped.check_owner(model)
            self._set_swapped(None)
            swapped.take_out(model, self._engine.moved)
            return
        self._check_averaged("swap")
        self._set_swapped(SwappedIn(self._engine.runs(self._checked_model(model, "swap"), self._member), model))

    def _set_swapped(self, swapped: SwappedIn | None) -> None:
        self.__dict__["_swapped"] = swapped
        self.module.__dict__[_FLAG] = swapped is not None  # read by refuse_while_swapped

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights: inside the block ``model`` holds them; afterwards
        (also after an exception) it holds its own weights again, bit for bit.

        Swaps in and out as ``swap`` does (the same guards and costs); refuses to start while the
        average is swapped in already, and does not swap back if the block already did.

        Examples:
            >>> import torch, wavg_fused as wf
            >>> model = torch.nn.Linear(3, 1)
            >>> avg = wf.Averager(model, wf.EMA(0.9)); avg.update(model)
            >>> with torch.no_grad(): _ = model.weight.add_(1.0)
            >>> trained, average = model.weight.detach().clone(), avg.module.weight.detach().clone()
            >>> with avg.swapped(model):
            ...     torch.equal(model.weight, average)
            True
            >>> torch.equal(model.weight, trained)
            True
        """
        if self._swapped is not None:
            raise RuntimeError(f"Averager.swapped: {NOT_WHILE_SWAPPED}")
        self.swap(model)
        try:
            yield model
        finally:
            if self._swapped is not None:
                self.swap(model)

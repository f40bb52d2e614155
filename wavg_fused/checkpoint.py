"""An averager's checkpoint state (``CheckpointMethods``), and loading it atomically: every entry is checked before anything is
copied, so a failed load leaves the average as it was (torch's own load fails half-way, or casts
silently: 1.5 into an int64 count)."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from .method_state import UnknownMethodError, decode_calls, decode_method, encode_method

__all__ = ["EXTRA_STATE", "SKIPPED", "checked_state_dict", "CheckpointMethods"]

EXTRA_STATE = "_extra_state"  # where nn.Module.state_dict puts get_extra_state()
SKIPPED = "n_skipped"
_COUNTS = ("n_averaged", SKIPPED)


def _problem(key: str, value: Any, own: torch.Tensor) -> str | None:
    """Why ``value`` cannot be loaded into the entry ``own`` (None if it can)."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.shape != own.shape:
        return f"has shape {tuple(value.shape)}, expected {tuple(own.shape)}"
    if value.is_meta:
        return "is on the meta device (it has no values)"
    if value.is_complex() and not own.is_complex():
        return f"is complex ({value.dtype}), expected {own.dtype}"
    if value.is_floating_point() and not own.is_floating_point():
        return f"is {value.dtype}, expected an integer {own.dtype}"
    if key in _COUNTS and (value.numel() != 1 or int(value) < 0):
        return f"must be one count >= 0, got {value.tolist()}"
    return None


def checked_state_dict(
    owner: str, own: Mapping[str, Any], state_dict: Mapping[str, Any], strict: bool
) -> Mapping[str, Any]:
    """``state_dict`` ready for ``nn.Module.load_state_dict`` against ``own`` (the module's
    ``state_dict(keep_vars=True)``), or ``RuntimeError`` naming the first bad entry.

    The optional entries (``_extra_state``, ``n_skipped``: absent from older checkpoints and from
    ``torch.optim.swa_utils.AveragedModel``'s) are filled in from ``own`` when missing.

    Examples:
        >>> own = {"n_averaged": torch.tensor(3)}
        >>> checked_state_dict("Averager", own, {"n_averaged": torch.tensor(1.5)}, strict=True)
        Traceback (most recent call last):
        ...
        RuntimeError: Error loading state_dict for Averager: 'n_averaged' is torch.float32, expected an integer torch.int64; nothing was loaded
    """
    def fail(what: str) -> RuntimeError:
        return RuntimeError(f"Error loading state_dict for {owner}: {what}; nothing was loaded")

    optional = {EXTRA_STATE, SKIPPED} & own.keys()
    missing = [k for k in own if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise fail(f"missing keys {missing}, unexpected keys {unexpected}")
    for key, value in state_dict.items():
        problem = _problem(key, value, own[key]) if key in own and key != EXTRA_STATE else None
        if problem:
            raise fail(f"{key!r} {problem}")
    if EXTRA_STATE in optional and EXTRA_STATE in state_dict:
        try:
            decode_calls(state_dict[EXTRA_STATE])
            decode_method(state_dict[EXTRA_STATE])
        except UnknownMethodError:
            pass  # set_extra_state warns and keeps the method; the weights still load
        except ValueError as error:
            raise fail(f"{EXTRA_STATE!r} is not a method entry ({error})") from None
    if optional - state_dict.keys():
        # torch's strict load reports missing entries; ours back in is a no-op
        metadata = getattr(state_dict, "_metadata", None)
        state_dict = OrderedDict(state_dict)
        for key in optional - state_dict.keys():
            state_dict[key] = own[key]
        if metadata is not None:
            state_dict._metadata = metadata
    return state_dict


class CheckpointMethods:
    """``Averager``'s state-dict methods; the method and the schedule's clock travel as extra
    state (``wavg_fused.method_state``)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``module.<name>`` and ``n_averaged`` (the keys ``AveragedModel`` writes).

        Refused while the averaged weights are swapped into a model: after an in-place exchange
        the averager holds the *live* weights, and saving them as the average is the trap
        Lightning users hit with checkpoints taken during validation.
        """
        self._refuse_while_swapped("Averager.state_dict")
        return super().state_dict(*args, **kwargs)

    def get_extra_state(self) -> torch.Tensor:
        """The method, its hyperparameters and the schedule's call count as JSON in a uint8 tensor
        (``wavg_fused.method_state``)."""
        return encode_method(self.method, self._calls + int(self._traced_calls))

    def set_extra_state(self, state: Any) -> None:
        """Restore the method and the schedule's call count saved by ``get_extra_state``; warn if
        the method replaces a different one."""
        self._calls = decode_calls(state)
        self._traced_calls.zero_()
        try:
            method = decode_method(state)
        except UnknownMethodError as error:
            warnings.warn(f"{type(self).__name__}.load_state_dict: keeping {self.method!r}: {error}", stacklevel=4)
            return
        if method is not None and method != self.method:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the checkpoint's method {method!r} replaces "
                f"{self.method!r} (set .method after loading to keep another)",
                stacklevel=4,
            )
            self.method = method

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load an ``Averager`` or ``torch.optim.swa_utils.AveragedModel`` state dict.

        Everything is checked before anything is copied, so a failed load leaves the average
        as it was. The method saved in ``_extra_state`` replaces ``self.method`` (with a warning
        when they differ); a state dict without that entry (``AveragedModel``'s, or one saved
        before the entry existed) keeps ``self.method``, also with ``strict=True``.
        """
        own = self.state_dict(keep_vars=True)
        state_dict = checked_state_dict(type(self).__name__, own, state_dict, strict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self._repack()
        return result


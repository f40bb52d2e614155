"""The ``Averager``'s constructor arguments, checked before anything is built, each error naming
its argument."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .methods import SWA, Method

__all__ = ["checked_device", "checked_method", "check_options", "checked_exclude"]


def checked_device(device: torch.device | str | int | None) -> torch.device | None:
    """``device`` as a ``torch.device`` (or None).

    >>> checked_device("cpu"), checked_device(None)
    (device(type='cpu'), None)
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device, a device string or index, got {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r}: CUDA is not available on this machine")
    return device


def checked_method(method: Method | Callable | None) -> Method | Callable:
    """The rule to run: SWA when None; a callable tagged with its fused rule becomes that rule."""
    method = SWA() if method is None else method
    method = getattr(method, "wavg_method", method)  # avg_fns tagged with their fused rule
    if not isinstance(method, Method) and not callable(method):
        raise TypeError(f"method must be a wavg_fused Method or a callable avg_fn, got {method!r}")
    return method


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(dtype: object, backend: object, rounding_seed: object, skip_nonfinite: object, write_back_every: object) -> None:
    """Raise naming the first argument of the wrong type or range."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {backend!r}")
    if not _is_int(rounding_seed) or not 0 <= rounding_seed < 2**63:
        raise ValueError(f"rounding_seed must be an int in [0, 2**63), got {rounding_seed!r}")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    if write_back_every is not None and (not _is_int(write_back_every) or write_back_every < 1):
        raise ValueError(f"write_back_every must be None or an int >= 1, got {write_back_every!r}")


def checked_exclude(exclude: Iterable[str]) -> tuple[str, ...]:
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a collection of names or prefixes, got the string {exclude!r}")
    return tuple(exclude)

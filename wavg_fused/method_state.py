"""The averaging method inside a checkpoint: ``Averager.state_dict()["_extra_state"]``.

The entry is UTF-8 JSON (``{"format": 1, "method": {"name", "class", "params"}, "calls"}``),
space-padded to a multiple of ``PADDED_BYTES`` so its size does not change as ``calls`` grows
(``torch.distributed.checkpoint`` loads into tensors of the saved sizes), held in a
1-D ``uint8`` tensor rather than a dict, so a state dict stays all-tensor: it loads with
``torch.load(weights_only=True)``, ``safetensors`` can write it, and code that maps ``.to()``,
``.clone()`` or ``torch.equal`` over every value keeps working. Methods are found again by
class (module and qualified name), then by ``Method.name``, among the loaded ``Method``
subclasses; a per-tensor ``avg_fn`` cannot be saved and is stored as ``"method": null``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from .methods import Method

__all__ = ["encode_method", "decode_method", "decode_calls", "UnknownMethodError"]

FORMAT = 1
# The JSON is padded with spaces to a multiple of this many bytes, so the entry keeps its size as
# the call count grows: torch.distributed.checkpoint loads into tensors of the saved sizes.
PADDED_BYTES = 512
_JSON_SCALARS = (bool, int, float, str, type(None))


class UnknownMethodError(LookupError):
    """The checkpoint names a method class that is not defined in this process."""


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _method_classes() -> list[type[Method]]:
    found, stack = [], [Method]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.append(sub)
            stack.append(sub)
    return found


def encode_method(method: object, calls: int = 0) -> torch.Tensor:
    """The ``_extra_state`` tensor describing ``method`` (a ``Method`` dataclass or anything else)
    and ``calls``, the number of ``update`` calls so far (the clock of ``Averager``'s schedule).

    >>> import wavg_fused as wf
    >>> decode_method(encode_method(wf.EMA(0.99)))
    EMA(decay=0.99)
    >>> decode_method(encode_method(lambda a, b, n: a)) is None
    True
    """
    entry = None
    if isinstance(method, Method) and dataclasses.is_dataclass(method):
        params = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
        if all(isinstance(v, _JSON_SCALARS) for v in params.values()):
            entry = {"name": method.name, "class": _class_path(type(method)), "params": params}
    text = json.dumps({"format": FORMAT, "method": entry, "calls": int(calls)}, sort_keys=True, allow_nan=False).encode()
    text += b" " * (-len(text) % PADDED_BYTES)  # JSON ignores trailing whitespace
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


def _parse(value: Any) -> dict | None:
    return _state(value).get("method")


def decode_calls(value: Any) -> int:
    """The ``update`` call count an ``_extra_state`` tensor holds (0 in checkpoints from before it).

    >>> import wavg_fused as wf
    >>> decode_calls(encode_method(wf.SWA(), calls=7))
    7
    """
    calls = _state(value).get("calls", 0)
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise ValueError(f"malformed call count {calls!r}")
    return calls


def _state(value: Any) -> dict:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
        raise ValueError(f"expected a 1-D uint8 tensor holding JSON, got {type(value).__name__}")
    try:
        state = json.loads(bytes(value.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"unknown format {state.get('format') if isinstance(state, dict) else state!r}")
    entry = state.get("method")
    if entry is not None and not (
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("params"), dict)
    ):
        raise ValueError(f"malformed method entry {entry!r}")
    return state


def decode_method(value: Any) -> Method | None:
    """The method an ``_extra_state`` tensor describes, or ``None`` if none was saved.

    Raises ``ValueError`` for a malformed entry and ``UnknownMethodError`` for a method class
    this process does not define.
    """
    entry = _parse(value)
    if entry is None:
        return None
    classes = _method_classes()
    by_path = [c for c in classes if _class_path(c) == entry.get("class")]
    by_name = [c for c in classes if getattr(c, "name", None) == entry["name"]]
    candidates = by_path or by_name
    if len(candidates) != 1:
        raise UnknownMethodError(
            f"method {entry['name']!r} ({entry.get('class')}) is "
            + ("not defined here" if not candidates else f"ambiguous: {[_class_path(c) for c in candidates]}")
        )
    cls, params = candidates[0], entry["params"]
    try:
        return cls(**params)  # validates the values
    except (TypeError, ValueError):
        pass
    # Derived fields (PowerEMA keeps gamma *and* the sigma_rel it came from) make the saved
    # fields an invalid constructor call; they came from a valid instance, so set them as saved.
    field_names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if set(params) != field_names:
        raise ValueError(f"{cls.__name__} has fields {sorted(field_names)}, the checkpoint {sorted(params)}")
    method = object.__new__(cls)
    for name, value_ in params.items():
        object.__setattr__(method, name, value_)
    return method

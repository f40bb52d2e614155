"""diffusers' ``EMAModel`` (``diffusers.training_utils``) on the fused path.

Same constructor, attributes, methods and state dict keys, so switching is one import::

    from wavg_fused.integrations.diffusers import EMAModel   # was: from diffusers.training_utils import EMAModel

``step`` updates every shadow tensor in one fused pass, its decay computed on the device; the
host keeps diffusers' counters (``optimization_step``, ``cur_decay_value``) and never reads
the device. This module does not import diffusers: ``save_pretrained`` and ``from_pretrained``
only call the ``model_cls`` you pass (a diffusers ``ModelMixin``).

How diffusers' schedule maps onto the engine. At optimization step ``t`` (counted before the
decay is computed, from 1) diffusers uses ``s = t - update_after_step - 1``: decay 0 (a copy)
while ``s <= 0``, then ``1 - (1 + s / inv_gamma) ** -power`` (``use_ema_warmup``) or
``(1 + s) / (10 + s)``, capped at ``decay`` and floored at ``min_decay``. The engine's
``Averager(update_after=k)`` copies on its first ``k`` calls without counting, and then
``EMAWarmup`` weighs an update by its counter ``n``: with ``k = update_after_step + 1`` and the
counter started at 1, ``n = s`` (the warm-up form); the other form is
``1 - (1 + (s + 1) / 9) ** -1``, ``EMAWarmup(inv_gamma=9, power=1)`` one count later, so its
counter starts at 2. A ``min_decay`` at or above ``decay`` leaves the constant ``min_decay``.

Differences from diffusers (0.42.1), summed up in docs/migrating.md:

- The update is ``s + w (p - s)`` computed in float32 (float64 for float64) and rounded once,
  where diffusers rounds three times (``s - p``, times ``1 - decay``, the subtraction), so
  values differ in the last bits (both are as far from an exact float64 EMA: 0.96 to 1.05
  times diffusers' mean error in the tests); the weight agrees within float64 rounding. The
  copies before averaging starts are exact (diffusers' ``s - 1.0 * (s - p)`` may not be).
- ``parameters`` must list the same number of tensors (of the same shapes) in ``step``,
  ``copy_to`` and ``restore`` as at construction, and no tensor twice: a ``ValueError``, where
  diffusers pairs with ``zip`` and stops at the shorter list. Unknown keyword arguments raise
  ``TypeError`` (diffusers ignores them).
- ``decay``, ``min_decay``, ``inv_gamma`` and ``power`` are checked when set (``ValueError``
  outside what ``EMAWarmup`` accepts: decays in [0, 1], ``inv_gamma`` and ``power`` > 0 with
  warm-up). ``load_state_dict`` checks every entry before it changes anything.
- ``shadow_params`` are views of the averaged storage (read and write them in place); setting
  the attribute, or loading, copies the given tensors in (keeping their devices and dtypes, as
  diffusers adopts them) instead of keeping those very tensor objects. Changing
  ``update_after_step``, ``use_ema_warmup``, ``optimization_step`` or a parameter's
  ``requires_grad`` rebuilds the average (one copy of it).
- ``pin_memory`` cannot pin the engine's flat buffers yet: without a GPU it raises as torch
  does; with one it warns and keeps pageable memory (transfers are then synchronous).
- ``foreach`` is kept but changes nothing (every update is one fused pass); DeepSpeed ZeRO-3
  parameters raise (the engine's check) instead of being gathered.

Examples:
    >>> import torch
    >>> from wavg_fused.integrations.diffusers import EMAModel
    >>> model = torch.nn.Linear(4, 2)
    >>> ema = EMAModel(model.parameters(), decay=0.999, update_after_step=1)
    >>> for _ in range(3):
    ...     ema.step(model.parameters())
    >>> ema.optimization_step, round(ema.cur_decay_value, 6)   # (1 + 1) / (10 + 1)
    (3, 0.181818)
    >>> ema.store(model.parameters()); ema.copy_to(model.parameters()); ema.restore(model.parameters())
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..averager import Averager
from ..methods import EMA, EMAWarmup, Method

__all__ = ["EMAModel"]

# The non-warm-up decay (1 + s) / (10 + s) as the warm-up form one count later (module docstring)
_PLAIN_INV_GAMMA, _PLAIN_POWER = 9.0, 1.0


class _Tensors(nn.Module):
    """A list of tensors as a module (parameters ``"0"``, ``"1"``, ...) for the ``Averager``.

    Parameters are registered as they are, other tensors as parameters sharing their memory.
    """

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
            self.register_parameter(str(index), tensor)


def _tensor_list(parameters: Iterable[torch.Tensor], what: str) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        warnings.warn(
            f"Passing a `torch.nn.Module` to `EMAModel.{what}` is deprecated (as in diffusers): pass its "
            "parameters instead", FutureWarning, stacklevel=3,
        )
        parameters = parameters.parameters()
    tensors = list(parameters)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"EMAModel.{what}: parameters must be tensors")
    return tensors


def _renamed(kwargs: dict[str, Any], old: str, new: str, value: Any) -> Any:
    """diffusers' deprecated aliases (``max_value``, ``min_value``): used when given, with its warning."""
    given = kwargs.pop(old, None)
    if given is None:
        return value
    warnings.warn(f"The `{old}` argument is deprecated. Please use `{new}` instead.", FutureWarning, stacklevel=3)
    return given


class EMAModel:
    """Exponential moving average of ``parameters``, diffusers' ``EMAModel`` fused.

    Args are diffusers': ``decay`` caps the decay and ``min_decay`` floors it; the average
    copies the parameters until ``update_after_step`` steps have passed (and one more); then
    the decay warms up as ``1 - (1 + step / inv_gamma) ** -power`` if ``use_ema_warmup``, else
    as ``(1 + step) / (10 + step)``. Tensors with ``requires_grad=False`` are copied, not
    averaged. ``model_cls`` and ``model_config`` (a diffusers model class and its config) are
    needed by ``save_pretrained``. ``backend`` (keyword only, not in diffusers) picks the
    wavg_fused backend, as ``Averager``'s does. See the module docstring for the differences.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float | int = 1.0,
        power: float | int = 2 / 3,
        foreach: bool = False,
        model_cls: Any | None = None,
        model_config: dict[str, Any] | None = None,
        *,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if isinstance(parameters, nn.Module):
            use_ema_warmup = True  # diffusers' rule for the deprecated module argument
        params = _tensor_list(parameters, "__init__")
        decay = _renamed(kwargs, "max_value", "decay", decay)
        min_decay = _renamed(kwargs, "min_value", "min_decay", min_decay)
        device = kwargs.pop("device", None)
        if kwargs:
            raise TypeError(f"EMAModel got unexpected keyword arguments {sorted(kwargs)}")
        self._decay, self._min_decay, self._inv_gamma, self._power = decay, min_decay, inv_gamma, power
        self._update_after_step, self._use_ema_warmup = update_after_step, use_ema_warmup
        self._step = 0
        self._backend = backend
        self.foreach = foreach
        self.model_cls, self.model_config = model_cls, model_config
        self.temp_stored_params: list[torch.Tensor] | None = None
        self.cur_decay_value: float | None = None
        self._bound: list[torch.Tensor] | None = None  # the tensors step() read last, and their module
        self._module: _Tensors | None = None
        self._check_unique(params)
        self._flags = [p.requires_grad for p in params]
        self._averager: Averager
        self._rebuild(params)
        self._bind(params)
        if device is not None:
            warnings.warn("The `device` argument is deprecated. Please use `to` instead.", FutureWarning, stacklevel=2)
            self.to(device=device)

    # ------------------------------------------------------------------ the engine underneath
    def _method(self) -> Method:
        if self._min_decay >= self._decay:  # diffusers caps, then floors: min_decay wins throughout
            return EMA(self._min_decay)
        if self._use_ema_warmup:
            return EMAWarmup(self._decay, self._inv_gamma, self._power, self._min_decay)
        return EMAWarmup(self._decay, _PLAIN_INV_GAMMA, _PLAIN_POWER, self._min_decay)

    def _rebuild(self, values: list[torch.Tensor]) -> None:
        """A new average holding copies of ``values``, its schedule and counter set for the
        current ``optimization_step`` (module docstring: the counter runs ``lag`` ahead)."""
        method = self._method()
        lag = self._lag_of(method)
        copying = self._update_after_step + 1  # optimization steps whose decay is 0
        exclude = [str(i) for i, averaged in enumerate(self._flags) if not averaged]
        self._averager = Averager(
            _Tensors([v.detach() for v in values]), method, exclude=exclude,
            update_after=max(0, copying - self._step), backend=self._backend,
        )
        self._averager.n_averaged.fill_(1 + lag + max(0, self._step - copying))
        self._lag = lag
        self._shadows: list[torch.Tensor] | None = None

    def _lag_of(self, method: Method) -> int:
        return 1 if isinstance(method, EMAWarmup) and not self._use_ema_warmup else 0

    def _check_unique(self, params: list[torch.Tensor]) -> None:
        if len(set(map(id, params))) != len(params):
            raise ValueError("EMAModel: parameters lists a tensor more than once")

    def _bind(self, params: list[torch.Tensor]) -> _Tensors:
        self._bound, self._module = params, _Tensors(params)
        return self._module

    def _module_for(self, params: list[torch.Tensor], what: str, keep: bool) -> _Tensors:
        """The module holding ``params``: the one of the last step when they are its tensors
        (the usual case, so the engine's plan stays), else a new one (kept for ``step``)."""
        bound = self._bound
        if bound is not None and len(params) == len(bound) and all(map(operator.is_, params, bound)):
            return self._module
        if len(params) != len(self._flags):
            raise ValueError(f"EMAModel.{what}: got {len(params)} parameters, the average holds {len(self._flags)}")
        self._check_unique(params)
        return self._bind(params) if keep else _Tensors(params)

    # ------------------------------------------------------------------ diffusers' API
    def get_decay(self, optimization_step: int) -> float:
        """The decay diffusers uses at ``optimization_step`` (computed on the host, in float64)."""
        step = optimization_step - self._update_after_step - 1
        if step <= 0:
            return 0.0
        if self._use_ema_warmup:
            value = 1 - (1 + step / self._inv_gamma) ** -self._power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self._decay), self._min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        """Fold ``parameters`` (the model's, after ``optimizer.step()``) into the average: one
        fused pass; tensors with ``requires_grad=False`` are copied."""
        params = _tensor_list(parameters, "step")
        module = self._module_for(params, "step", keep=True)
        flags = [p.requires_grad for p in params]
        if flags != self._flags:  # which tensors are averaged changed: the plan's roles change
            self._flags = flags
            self._rebuild(self.shadow_params)
        self._averager.update(module)
        self._step += 1
        self.cur_decay_value = self.get_decay(self._step)

    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the averaged values into ``parameters`` (cast to their dtypes and devices)."""
        params = _tensor_list(parameters, "copy_to")
        self._averager.copy_to(self._module_for(params, "copy_to", keep=False))

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` in host memory, for ``restore`` after evaluating the average."""
        with torch.no_grad():
            self.temp_stored_params = [p.detach().to("cpu", copy=True) for p in _tensor_list(parameters, "store")]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the copy ``store`` kept back into ``parameters``, and drop it."""
        stored = self.temp_stored_params
        if stored is None:
            raise RuntimeError("This EMAModel has no `store()`ed weights to `restore()`")
        params = _tensor_list(parameters, "restore")
        if len(params) != len(stored):
            raise ValueError(f"EMAModel.restore: got {len(params)} parameters, store() kept {len(stored)}")
        with torch.no_grad():
            for param, saved in zip(params, stored):
                param.copy_(saved)
        self.temp_stored_params = None

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """The averaged tensors, in ``parameters``' order: views of the average's storage."""
        if self._shadows is None:
            self._shadows = [t.detach() for t in self._averager.module.parameters()]
        return list(self._shadows)

    @shadow_params.setter
    def shadow_params(self, values: list[torch.Tensor]) -> None:
        self._rebuild(self._checked_shadows(values))

    def _checked_shadows(self, values: Any) -> list[torch.Tensor]:
        if not isinstance(values, list):
            raise ValueError("shadow_params must be a list")
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError("shadow_params must all be Tensors")
        own = self.shadow_params
        if len(values) != len(own):
            raise ValueError(f"shadow_params holds {len(values)} tensors, the average {len(own)}")
        for index, (value, shadow) in enumerate(zip(values, own)):
            if value.shape != shadow.shape:
                raise ValueError(f"shadow_params[{index}] has shape {tuple(value.shape)}, expected {tuple(shadow.shape)}")
        return values

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> None:
        """Move the average to ``device``; ``dtype`` converts its floating tensors only."""
        self._averager.to(device=device, dtype=dtype, non_blocking=non_blocking)
        self._shadows = None

    def pin_memory(self) -> None:
        """diffusers pins the average for offloading; wavg_fused's flat buffers cannot be
        pinned yet. Without a GPU this raises torch's error, as diffusers does; with one it
        warns and keeps pageable memory."""
        torch.empty(0).pin_memory()  # torch's own error where nothing can be pinned
        warnings.warn(
            "EMAModel.pin_memory: wavg_fused keeps the average in pageable memory (its storage cannot be "
            "pinned yet); transfers with non_blocking=True are synchronous", RuntimeWarning, stacklevel=2,
        )

    # ------------------------------------------------------------------ hyperparameters
    def _set_method_field(self, name: str, value: Any) -> None:
        old = getattr(self, name)
        setattr(self, name, value)
        try:
            method = self._method()
            if self._lag_of(method) == self._lag:
                self._averager.method = method  # the next update uses it: nothing else changes
            else:  # crossing min_decay >= decay moves the counter's lag
                self._rebuild(self.shadow_params)
        except (TypeError, ValueError):
            setattr(self, name, old)
            raise

    def _set_schedule_field(self, name: str, value: Any) -> None:
        old = getattr(self, name)
        setattr(self, name, value)
        try:
            self._rebuild(self.shadow_params)
        except (TypeError, ValueError):
            setattr(self, name, old)
            raise

    decay = property(lambda self: self._decay, lambda self, v: self._set_method_field("_decay", v))
    min_decay = property(lambda self: self._min_decay, lambda self, v: self._set_method_field("_min_decay", v))
    inv_gamma = property(lambda self: self._inv_gamma, lambda self, v: self._set_method_field("_inv_gamma", v))
    power = property(lambda self: self._power, lambda self, v: self._set_method_field("_power", v))
    update_after_step = property(
        lambda self: self._update_after_step, lambda self, v: self._set_schedule_field("_update_after_step", v))
    use_ema_warmup = property(
        lambda self: self._use_ema_warmup, lambda self, v: self._set_schedule_field("_use_ema_warmup", v))
    optimization_step = property(lambda self: self._step, lambda self, v: self._set_schedule_field("_step", v))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """diffusers' keys; ``shadow_params`` are references to the average, not copies."""
        return {
            "decay": self._decay,
            "min_decay": self._min_decay,
            "optimization_step": self._step,
            "update_after_step": self._update_after_step,
            "use_ema_warmup": self._use_ema_warmup,
            "inv_gamma": self._inv_gamma,
            "power": self._power,
            "shadow_params": self.shadow_params,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of diffusers' ``EMAModel`` (missing keys keep
        their values). Every entry is checked first, with diffusers' errors, so a failed load
        changes nothing; the shadow tensors are copied in."""
        fields = {key: state_dict.get(key, value) for key, value in self.state_dict().items()}
        for key, valid, message in _LOAD_CHECKS:
            if not valid(fields[key]):
                raise ValueError(message)
        values = self._checked_shadows(fields.pop("shadow_params"))
        saved = {name: getattr(self, name) for name in _FIELDS.values()}
        for key, name in _FIELDS.items():
            setattr(self, name, fields[key])
        try:
            self._rebuild(values)
        except (TypeError, ValueError):
            for name, value in saved.items():
                setattr(self, name, value)
            raise

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the average as a ``model_cls`` model whose config also holds the EMA's state
        (diffusers' layout: its ``EMAModel.from_pretrained`` loads it, and ours loads its)."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state = self.state_dict()
        del state["shadow_params"]
        model.register_to_config(**state)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_cls: Any, foreach: bool = False, *,
                        backend: str = "auto") -> EMAModel:
        """An ``EMAModel`` from a ``save_pretrained`` directory (ours or diffusers')."""
        config = model_cls.load_config(path)
        model = model_cls.from_pretrained(path)
        ema = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach, backend=backend)
        ema.load_state_dict({key: config[key] for key in _FIELDS if key in config})
        ema._bound = ema._module = None  # no reference to the loaded model: step() binds the live one
        return ema


_FIELDS = {
    "decay": "_decay", "min_decay": "_min_decay", "optimization_step": "_step",
    "update_after_step": "_update_after_step", "use_ema_warmup": "_use_ema_warmup",
    "inv_gamma": "_inv_gamma", "power": "_power",
}
# diffusers' checks and messages, so code that catches them keeps working
_LOAD_CHECKS = (
    ("decay", lambda v: not (v < 0.0 or v > 1.0), "Decay must be between 0 and 1"),
    ("min_decay", lambda v: isinstance(v, float), "Invalid min_decay"),
    ("optimization_step", lambda v: isinstance(v, int), "Invalid optimization_step"),
    ("update_after_step", lambda v: isinstance(v, int), "Invalid update_after_step"),
    ("use_ema_warmup", lambda v: isinstance(v, bool), "Invalid use_ema_warmup"),
    ("inv_gamma", lambda v: isinstance(v, (float, int)), "Invalid inv_gamma"),
    ("power", lambda v: isinstance(v, (float, int)), "Invalid power"),
)

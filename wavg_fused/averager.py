"""``Averager``: an averaged copy of a model in contiguous storage, updated with one fused pass."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .backends.registry import select_backend
from .methods import SWA, Method
from .plan import ROLE_AVERAGE, ROLE_COPY, Plan, check_structure
from .storage import ShadowStorage, named_tensors, pack_module
from .unfused import update_per_tensor
from .unwrap import de_parallel
from .watch import AddressWatch

__all__ = ["Averager", "AvgFn"]

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-tensor rule ``avg_fn(averaged, model, n_averaged) -> new averaged`` (the slow path)."""

# Per-update caches: they reference the live model's internals, so they are never pickled or
# deep-copied; they are rebuilt on the next update.
_TRANSIENT = ("_model_ref", "_model_slots", "_shadow_names", "_shadow_slots", "_plan_key", "_runs", "_watch")


def _slots(module: nn.Module) -> tuple[list[str], list[tuple[dict, str]]]:
    """Names and (owner dict, key) pairs of every tensor, so an update reads them without a walk."""
    names, slots = [], []
    for name, tensor in named_tensors(module):
        owner_path, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        table = owner._parameters if attribute in owner._parameters else owner._buffers
        names.append(name)
        slots.append((table, attribute))
    return names, slots


def _read(slots: list[tuple[dict, str]]) -> list[torch.Tensor]:
    return [table[key] for table, key in slots]


def _fingerprint(models: list[torch.Tensor], shadows: list[torch.Tensor]) -> tuple[int, ...]:
    # Addresses are host metadata (reading them never syncs a device). A model tensor replaced,
    # moved, re-typed or re-sized through `.data =` or `module.x = ...` gets a new address; an
    # in-place `set_` that keeps the address is the one change this does not see.
    return tuple(map(torch.Tensor.data_ptr, models + shadows))


class Averager(nn.Module):
    """An averaged copy of ``model`` (EMA, SWA, T-ADEMA, ...) updated in one fused pass.

    Args:
        model: the model to average (DataParallel, DDP and ``torch.compile`` wrappers are
            unwrapped). It is deep-copied; the copy is ``self.module``.
        method: an averaging rule (``EMA(decay)``, ``SWA()``, ``TADEMA(alpha)``) or any per-tensor
            function ``avg_fn(averaged, model, n_averaged)`` (unfused, the slow path).
        use_buffers: average floating-point buffers like parameters. If ``False``, buffers are
            copied from the model on every update. Integer tensors are always copied.
        device: where the averaged copy lives (default: where each model tensor is).
        dtype: floating-point dtype of the averaged copy, e.g. ``torch.float32`` for an fp32
            average of a bf16 model (default: the model's dtypes).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.
        stochastic_rounding: round averaged bfloat16 tensors up or down at random (unbiased)
            instead of to nearest, so a bf16 EMA with decay near 1 keeps moving. The random bits
            are a function of ``rounding_seed``, the update count and the element, so results
            are reproducible and equal on every rank and backend.

    The state dict has the keys ``torch.optim.swa_utils.AveragedModel`` writes
    (``module.<name>`` and ``n_averaged``).

    >>> import torch, wavg_fused as wf
    >>> model = torch.nn.Linear(4, 2)
    >>> avg = wf.Averager(model, wf.EMA(0.9))
    >>> avg.update(model)   # the first update copies
    >>> torch.equal(avg.module.weight, model.weight), int(avg.n_averaged)
    (True, 1)
    >>> avg(torch.ones(1, 4)).shape
    torch.Size([1, 2])
    """

    n_averaged: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        method: Method | AvgFn | None = None,
        *,
        use_buffers: bool = False,
        device: torch.device | str | int | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        method = SWA() if method is None else method
        if not isinstance(method, Method) and not callable(method):
            raise TypeError(f"method must be a wavg_fused Method or a callable avg_fn, got {method!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {backend!r}")
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int) or not 0 <= rounding_seed < 2**63:
            raise ValueError(f"rounding_seed must be an int in [0, 2**63), got {rounding_seed!r}")
        self.method = method
        self.use_buffers = bool(use_buffers)
        self.backend = backend
        self.stochastic_rounding = bool(stochastic_rounding)
        self.rounding_seed = rounding_seed
        self.module = copy.deepcopy(de_parallel(model))
        self._storage = pack_module(self.module, device=device, dtype=dtype)
        first = next(iter(self._storage.flats), None)
        counter_device = torch.device(device) if device is not None else (first[0] if first else torch.device("cpu"))
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=counter_device))
        self._reset_caches()
        for flat_device, _ in self._storage.flats:  # an explicit backend that cannot run fails now
            select_backend(self.backend, flat_device)

    # ------------------------------------------------------------------ nn.Module plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        rounding = f", stochastic_rounding=True, rounding_seed={self.rounding_seed}" if self.stochastic_rounding else ""
        return f"method={self.method!r}, use_buffers={self.use_buffers}, backend={self.backend!r}{rounding}"

    def _reset_caches(self) -> None:
        for name in _TRANSIENT:
            self.__dict__[name] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in _TRANSIENT:
            state[name] = None
        return state

    def _apply(self, fn: Callable, recurse: bool = True) -> Averager:
        # .to(), .cuda(), .half() replace the shadow tensors: pack them again right away so the
        # old flat buffers are freed and the next update rebuilds its plan.
        super()._apply(fn, recurse)
        self._repack()
        return self

    def _repack(self) -> None:
        self._storage = pack_module(self.module)
        for name in ("_shadow_names", "_shadow_slots", "_plan_key", "_runs", "_watch"):
            self.__dict__[name] = None

    @property
    def storage(self) -> ShadowStorage:
        """The flat buffers holding the averaged copy (``.nbytes``, ``.tensor_bytes``)."""
        return self._storage

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load an ``Averager`` or ``torch.optim.swa_utils.AveragedModel`` state dict.

        Everything is checked before anything is copied, so a failed load leaves the average
        as it was.
        """
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}; nothing was loaded"
            )
        for key, value in state_dict.items():
            if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
                raise RuntimeError(
                    f"Error loading state_dict for {type(self).__name__}: {key!r} has shape "
                    f"{tuple(value.shape)}, expected {tuple(own[key].shape)}; nothing was loaded"
                )
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self._repack()
        return result

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average; call after ``optimizer.step()``.

        One fused pass per shadow device; ``n_averaged`` is read and bumped on the device, so
        the call never waits for the GPU. A model whose structure differs raises ``ValueError``
        naming the first mismatching tensor, and the average is left untouched.
        """
        model = de_parallel(model)
        if self._watch is None or self._model_ref() is not model or self._watch.moved():
            self._refresh(model)
        if not isinstance(self.method, Method):
            update_per_tensor(self._runs, self.method, self.n_averaged)
            return
        counter, bumped = self.n_averaged, False
        seed = self.rounding_seed if self.stochastic_rounding else -1
        for plan, backend in self._runs:  # the counter's own device runs last: others read it first
            if plan.device == counter.device:
                backend.update(plan, self.method, counter, True, seed)
                bumped = True
            else:
                # a copy into host memory must land before the CPU kernel reads it: blocking there
                copy = counter.to(plan.device, non_blocking=plan.device.type != "cpu")
                backend.update(plan, self.method, copy, False, seed)
        if not bumped:
            counter.add_(1)

    def _refresh(self, model: nn.Module) -> None:
        """The slow path, taken when the model object or a tensor address changed: check the
        structure, rebuild the plans if any address differs, and watch the new addresses."""
        models = self._model_tensors(model)
        shadows = self._shadow_tensors()
        key = _fingerprint(models, shadows)
        if key != self._plan_key:
            self._build_plans(models, shadows, key)
        self._watch = AddressWatch(self._model_slots + self._shadow_slots)

    def _shadow_tensors(self) -> list[torch.Tensor]:
        if self._shadow_slots is None:
            self._shadow_names, self._shadow_slots = _slots(self.module)
        return _read(self._shadow_slots)

    def _model_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        if self._model_ref is not None and self._model_ref() is model:
            try:
                return _read(self._model_slots)
            except KeyError:  # a tensor was removed from the model: check the structure again
                pass
        names, slots = _slots(model)
        tensors = _read(slots)
        shadows = self._shadow_tensors()
        check_structure(self._shadow_names, shadows, names, tensors)
        self._model_ref, self._model_slots, self._plan_key = weakref.ref(model), slots, None
        return tensors

    def _build_plans(self, models: list[torch.Tensor], shadows: list[torch.Tensor], key: tuple) -> None:
        check_structure(self._shadow_names, shadows, self._shadow_names, models)
        if not all(self._storage.owns(s) for s in shadows):
            self._repack()  # a shadow tensor was replaced behind our back (e.g. load with assign=True)
            shadows = self._shadow_tensors()
            key = _fingerprint(models, shadows)
        num_params = sum(1 for _ in self.module.parameters())
        by_device: dict[torch.device, list[int]] = {}
        for index, shadow in enumerate(shadows):
            by_device.setdefault(shadow.device, []).append(index)
        runs = []
        for device, indices in by_device.items():
            roles = [
                ROLE_AVERAGE
                if shadows[i].is_floating_point() and (i < num_params or self.use_buffers)
                else ROLE_COPY
                for i in indices
            ]
            plan = Plan(
                [self._shadow_names[i] for i in indices],
                [shadows[i] for i in indices],
                [models[i] for i in indices],
                roles,
                [self._storage.offset_of(shadows[i]) for i in indices],
                [flat for (flat_device, _), flat in self._storage.flats.items() if flat_device == device],
            )
            runs.append((plan, select_backend(self.backend, device)))
        runs.sort(key=lambda run: run[0].device == self.n_averaged.device)
        self._runs, self._plan_key = runs, key

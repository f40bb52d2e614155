"""``Averager``: an averaged copy of a model in contiguous storage, updated with one fused pass."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .backends.registry import select_backend
from .method_state import UnknownMethodError, decode_calls, decode_method, encode_method
from .methods import SWA, Method
from .plan import NONFINITE_SLOT, ROLE_AVERAGE, ROLE_COPY, Plan, check_kernel_dtypes, check_structure
from . import swap as _swap
from .schedule import Action, Schedule
from .sharded import (
    address, check_supported, copy_model, has_dtensors, local, local_named_tensors, local_pairs, reshard_fsdp,
)
from .storage import ShadowStorage, named_tensors, pack_module
from .compiled import check_unmoved
from .unfused import update_per_tensor
from .unwrap import de_parallel
from .watch import AddressWatch

__all__ = ["Averager", "AvgFn"]

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-tensor rule ``avg_fn(averaged, model, n_averaged) -> new averaged`` (the slow path)."""

# Per-update caches: they reference the live model's internals, so they are never pickled or
# deep-copied; they are rebuilt on the next update.
_TRANSIENT = ("_model_ref", "_model_slots", "_shadow_names", "_shadow_slots", "_plan_key", "_runs", "_watch", "_sharded_runs")
_EXTRA_STATE = "_extra_state"  # where nn.Module.state_dict puts get_extra_state()
_SKIPPED = "n_skipped"
_NOT_WHILE_SWAPPED = (
    "the averaged weights are swapped into the model: call swap(model) again (or leave the "
    "swapped() block) first"
)


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


def _module_slots(module: nn.Module) -> list[tuple[dict, str]]:
    """(parent's ``_modules`` dict, key) of every submodule: replacing one (``model.fc = ...``)
    changes what the tensor slots, which point into the old module's dicts, cannot show."""
    return [(parent._modules, key) for parent in module.modules() for key, child in parent._modules.items() if child is not None]


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """Whether ``name`` is an ``exclude`` entry or lies under one (a module prefix)."""
    return any(name == entry or name.startswith(entry + ".") for entry in exclude)


def _read(slots: list[tuple[dict, str]]) -> list[torch.Tensor]:
    return [table[key] for table, key in slots]


def _adopt(averaged_module: nn.Module, model: nn.Module) -> nn.Module:
    """``averaged_module`` as the averaged copy of ``model``, checked before anything changes."""
    if not isinstance(averaged_module, nn.Module):
        raise TypeError(f"averaged_module must be an nn.Module, got {type(averaged_module).__name__}")
    averaged_module = de_parallel(averaged_module)
    shadow_pairs, model_pairs = named_tensors(averaged_module), named_tensors(model)
    shadow_names, shadows = [n for n, _ in shadow_pairs], [t for _, t in shadow_pairs]
    models = [t for _, t in model_pairs]
    try:
        check_structure(shadow_names, shadows, [n for n, _ in model_pairs], models)
    except ValueError as error:
        raise ValueError(f"averaged_module does not match the model: {error}") from None
    # it becomes storage we write on every update: sharing memory with the model would corrupt it
    model_memory = {local(m).data_ptr() for m in models if local(m).numel()}  # a DTensor's bytes: its shard
    shared = [n for n, s in zip(shadow_names, shadows) if local(s).numel() and local(s).data_ptr() in model_memory]
    if averaged_module is model or shared:
        raise ValueError(f"averaged_module must be a separate module; it shares {shared[:3] or 'everything'} with the model")
    return averaged_module


def _checked_device(device: torch.device | str | int | None) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device, a device string or index, got {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r}: CUDA is not available on this machine")
    return device


def _load_problem(key: str, value: Any, own: torch.Tensor) -> str | None:
    """Why ``value`` cannot be loaded into the entry ``own`` (None if it can), checked before
    anything is copied: torch would fail half-way, or cast silently (1.5 into an int64 count)."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.is_meta:
        return "is on the meta device (it has no values)"
    if value.is_complex() and not own.is_complex():
        return f"is complex ({value.dtype}), expected {own.dtype}"
    if value.is_floating_point() and not own.is_floating_point():
        return f"is {value.dtype}, expected an integer {own.dtype}"
    if key in ("n_averaged", _SKIPPED) and (value.numel() != 1 or int(value) < 0):
        return f"must be one count >= 0, got {value.tolist()}"
    return None


def _fingerprint(models: list[torch.Tensor], shadows: list[torch.Tensor]) -> tuple:
    # Host metadata only (reading it never syncs a device): where each tensor's bytes are (a
    # DTensor's are its local tensor's) and how they are viewed, since `p.data = p.data.t()` or a
    # `.view()` of another shape keeps the address.
    return tuple((address(t), t.dtype, t.shape, t.stride()) for t in models + shadows)


class Averager(nn.Module):
    """An averaged copy of ``model`` (EMA, SWA, T-ADEMA, ...) updated in one fused pass.

    Args:
        model: the model to average (DataParallel, DDP and ``torch.compile`` wrappers are
            unwrapped). It is deep-copied; the copy is ``self.module``. Of an FSDP2
            (``fully_shard``) model only this rank's shards are kept, as DTensors, in a
            ``ShardedCopy`` (no forward: evaluate with ``swapped(model)``; docs/distributed.md).
        method: an averaging rule (``EMA(decay)``, ``SWA()``, ``TADEMA(alpha)``) or any per-tensor
            function ``avg_fn(averaged, model, n_averaged)`` (unfused, the slow path).
        use_buffers: average floating-point buffers like parameters. If ``False``, buffers are
            copied from the model on every update. Integer tensors are always copied.
        device: where the averaged copy lives (default: where each model tensor is).
        dtype: floating-point dtype of the averaged copy, e.g. ``torch.float32`` for an fp32
            average of a bf16 model (default: the model's dtypes).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (or the test tool
            ``"cuda-emulated"``: the CUDA kernel's code on CPU tensors, never chosen by ``"auto"``).
        stochastic_rounding: round averaged bfloat16 tensors up or down at random (unbiased)
            instead of to nearest, so a bf16 EMA with decay near 1 keeps moving. The random bits
            are a function of ``rounding_seed``, the update count and the element, so results
            are reproducible and equal on every rank and backend.
        averaged_module: use this module (same structure as ``model``) as the averaged copy
            instead of ``copy.deepcopy(model)``, for models that cannot be deep-copied (the
            deprecated ``torch.nn.utils.weight_norm``, modules whose ``__deepcopy__`` raises).
            It is taken over, not copied: its tensors move into the averager's storage and
            receive ``model``'s values at construction, so it starts equal to ``model``.
        skip_nonfinite: skip a whole update when any averaged model value is Inf or NaN: no
            shadow changes, ``n_averaged`` stays and ``n_skipped`` counts it. Decided on the
            device (a read-only check pass, then the update reads its flag), so no host sync;
            it costs one extra read of the averaged model tensors. Off by default, as in
            ``torch.optim.swa_utils.AveragedModel``, timm and ema-pytorch, so the default update
            moves the fewest bytes; a run that can diverge should turn it on. ``n_skipped`` is in
            the state dict only when it is on.

    The state dict has the keys ``torch.optim.swa_utils.AveragedModel`` writes
    (``module.<name>`` and ``n_averaged``) plus ``_extra_state``, the method and its
    hyperparameters (``load_state_dict`` restores them; see ``wavg_fused.method_state``).
    ``wavg_fused.AveragedModel`` writes exactly torch's keys.

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
        averaged_module: nn.Module | None = None,
        exclude: Iterable[str] = (),
        update_after: int = 0,
        update_every: int = 1,
        write_back_every: int | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        device = _checked_device(device)
        method = SWA() if method is None else method
        method = getattr(method, "wavg_method", method)  # avg_fns tagged with their fused rule
        if not isinstance(method, Method) and not callable(method):
            raise TypeError(f"method must be a wavg_fused Method or a callable avg_fn, got {method!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {backend!r}")
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int) or not 0 <= rounding_seed < 2**63:
            raise ValueError(f"rounding_seed must be an int in [0, 2**63), got {rounding_seed!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        self.method = method
        self.skip_nonfinite = skip_nonfinite
        self.use_buffers = bool(use_buffers)
        self.backend = backend
        self.stochastic_rounding = bool(stochastic_rounding)
        self.rounding_seed = rounding_seed
        self.schedule = Schedule(update_after, update_every)
        if write_back_every is not None and (
            isinstance(write_back_every, bool) or not isinstance(write_back_every, int) or write_back_every < 1
        ):
            raise ValueError(f"write_back_every must be None or an int >= 1, got {write_back_every!r}")
        self.write_back_every = write_back_every
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a collection of names or prefixes, got the string {exclude!r}")
        self.exclude = tuple(exclude)
        self._calls = 0  # update() calls so far: the schedule's clock, kept on the host
        model = de_parallel(model)
        check_supported(model)  # DeepSpeed ZeRO-3, FSDP1: a clear error instead of averaging placeholders
        if averaged_module is None:
            self.module = copy_model(model)  # copy.deepcopy, or the shards of an FSDP2 model
            self._storage = pack_module(self.module, device=device, dtype=dtype)
        else:
            self.module = _adopt(averaged_module, model)
            self._storage = pack_module(self.module, device=device, dtype=dtype)
            with torch.no_grad():
                for (_, shadow), (_, value) in zip(named_tensors(self.module), named_tensors(model)):
                    shadow.copy_(value.detach())
        first = next(iter(self._storage.flats), None)
        counter_device = torch.device(device) if device is not None else (first[0] if first else torch.device("cpu"))
        names = [name for name, _ in named_tensors(self.module)]
        for entry in self.exclude:
            if not any(_excluded(name, (entry,)) for name in names):
                raise ValueError(f"exclude: {entry!r} names no parameter or buffer of the model (nor a module prefix)")
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=counter_device))
        # updates the non-finite guard skipped; bumped on the device next to n_averaged
        self.register_buffer(
            "n_skipped", torch.tensor(0, dtype=torch.long, device=counter_device), persistent=skip_nonfinite
        )
        # update() calls made inside compiled graphs, which cannot bump the host count _calls without
        # recompiling each step; folded into _calls when a checkpoint reads it
        self.register_buffer("_traced_calls", torch.tensor(0, dtype=torch.long, device=counter_device), persistent=False)
        self._reset_caches()
        # dtypes no kernel handles (float8 ...) fail now, naming the tensor, not at the first update
        shadows = [t for _, t in named_tensors(self.module)]
        num_params = sum(1 for _ in self.module.parameters())
        check_kernel_dtypes(names, shadows, [t for _, t in named_tensors(model)],
                            [self._role(i, n, t, num_params) for i, (n, t) in enumerate(zip(names, shadows))])
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
        self.__dict__["_swap_state"] = None  # (model ref, backups or None, pinned model memory) while swapped in

    def __getstate__(self) -> dict:
        if self.__dict__.get("_swap_state") is not None:
            raise RuntimeError(f"cannot pickle or copy an Averager while {_NOT_WHILE_SWAPPED}")
        state = self.__dict__.copy()
        for name in _TRANSIENT:
            state[name] = None
        return state

    def _apply(self, fn: Callable, recurse: bool = True) -> Averager:
        # .to(), .cuda(), .half() replace the shadow tensors: pack them again right away so the
        # old flat buffers are freed and the next update rebuilds its plan.
        if self.__dict__.get("_swap_state") is not None:  # swapping out needs the storage it swapped in
            raise RuntimeError(f"cannot move or convert an Averager (.to(), .cuda(), .half()) while {_NOT_WHILE_SWAPPED}")
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
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``module.<name>`` and ``n_averaged`` (the keys ``AveragedModel`` writes).

        Refused while the averaged weights are swapped into a model: after an in-place exchange
        the averager holds the *live* weights, and saving them as the average is the trap
        Lightning users hit with checkpoints taken during validation.
        """
        if self.__dict__.get("_swap_state") is not None:
            raise RuntimeError(f"Averager.state_dict: {_NOT_WHILE_SWAPPED}")
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
        if method is None or method == self.method:
            return
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
        optional = {_EXTRA_STATE, _SKIPPED} & own.keys()  # absent from older and AveragedModel checkpoints
        missing = [k for k in own if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}; nothing was loaded"
            )
        for key, value in state_dict.items():
            if key in own and key != _EXTRA_STATE and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
                raise RuntimeError(
                    f"Error loading state_dict for {type(self).__name__}: {key!r} has shape "
                    f"{tuple(value.shape)}, expected {tuple(own[key].shape)}; nothing was loaded"
                )
        for key, value in state_dict.items():
            problem = _load_problem(key, value, own[key]) if key in own and key != _EXTRA_STATE else None
            if problem:
                raise RuntimeError(
                    f"Error loading state_dict for {type(self).__name__}: {key!r} {problem}; nothing was loaded"
                )
        for key in {_EXTRA_STATE} & optional & state_dict.keys():
            try:
                decode_calls(state_dict[key])
                decode_method(state_dict[key])
            except UnknownMethodError:
                pass  # set_extra_state warns and keeps the method; the weights still load
            except ValueError as error:
                raise RuntimeError(
                    f"Error loading state_dict for {type(self).__name__}: {key!r} is not a method "
                    f"entry ({error}); nothing was loaded"
                ) from None
        if optional - state_dict.keys():
            # torch's strict load reports missing entries; ours back in is a no-op
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict(state_dict)
            for key in optional - state_dict.keys():
                state_dict[key] = own[key]
            if metadata is not None:
                state_dict._metadata = metadata
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
        if self._swap_state is not None:
            raise RuntimeError(f"Averager.update: {_NOT_WHILE_SWAPPED}")
        if torch.compiler.is_compiling():
            self._update_traced(model)
            return
        action = self.schedule.action(self._calls + 1)
        if action is Action.SKIP:
            self._calls += 1
            return
        self._ensure_plans(model)
        if not isinstance(self.method, Method):
            if not (self.skip_nonfinite and self._skip_on_host()):
                self._track() if action is Action.TRACK else self._update_unfused()
        else:
            self._launch(tracking=action is Action.TRACK)
        self._calls += 1
        if action is Action.AVERAGE and self.write_back_every:
            if self.schedule.averaging_calls(self._calls) % self.write_back_every == 0:
                _swap.copy_into_model(self._runs)

    def _update_traced(self, model: nn.Module) -> None:
        """``update`` as ``torch.compile`` traces it: the plans of the last eager update, checked
        at run time (``compiled.check_unmoved``), then the fused op; no host bookkeeping."""
        if self._runs is None or self._model_ref() is not model:
            raise RuntimeError(
                "Averager.update under torch.compile needs the plans an eager update builds: call "
                "avg.update(model) once outside the compiled function first (with this model)"
            )
        if not isinstance(self.method, Method):
            raise NotImplementedError("Averager.update under torch.compile: a callable avg_fn runs eagerly only")
        if self.schedule != Schedule() or self.write_back_every:
            raise NotImplementedError(
                "Averager.update under torch.compile: update_after, update_every and write_back_every are "
                "decided on the host; call update outside the compiled function to use them"
            )
        # the model's tensors only: the shadows are views of the flat buffers the op mutates, and
        # passing both into a graph is aliasing AOTAutograd refuses; only eager code replaces them
        tensors, addresses = self._watch.current_and_expected()
        models = len(self._model_slots)
        if self._runs:
            check_unmoved(self._runs[0][0].spare_count, tensors[:models], addresses[:models])
        self._launch(tracking=False)
        self._traced_calls.add_(1)

    def _track(self) -> None:
        # Before averaging starts the average follows the model: a copy, counted nowhere
        update_per_tensor(self._runs, self.method, torch.zeros((), dtype=torch.long), bump=False)

    def _launch(self, tracking: bool) -> None:
        """One fused update per shadow device. ``tracking`` (the schedule's warm-up) copies the
        model: w_0 = 1 read from the plan's spare counter, which stays 0; n_averaged does not move."""
        counter = self.n_averaged
        guard = self.skip_nonfinite
        skipped = self.n_skipped if guard else None
        anywhere = self._check_nonfinite() if guard else None
        seed = self.rounding_seed if self.stochastic_rounding and not tracking else -1
        counted = False
        for plan, backend in self._runs:  # the counter's own device runs last: others read it first
            own = plan.device == counter.device
            if tracking:
                n = plan.spare_count
            elif own:
                n = counter
            else:  # a copy into host memory must land before the CPU kernel reads it: blocking there
                n = counter.to(plan.device, non_blocking=plan.device.type != "cpu")
            backend.update(plan, self.method, n, own and not tracking, seed, guard, skipped if own else None, guard)
            plan.mark_stream()
            counted = counted or own
        if counted:
            return
        if anywhere is not None:
            if not tracking:
                counter.sub_(anywhere).add_(1)
            skipped.add_(anywhere)
        elif not tracking:
            counter.add_(1)

    def _check_nonfinite(self) -> torch.Tensor | None:
        """Set every plan's non-finite flag if any device's averaged model values hold an Inf or a
        NaN (the whole update is skipped or none of it). Returns the flag on the counter's device
        when no plan lives there to bump the counters, else None."""
        for plan, backend in self._runs:
            backend.check_nonfinite(plan)
            plan.mark_stream()
        if self._sharded_runs and torch.distributed.is_initialized():
            # Each rank checked its own shards: an Inf on one rank must skip the update on all of
            # them, or their averages (and n_averaged) drift apart. One tiny all-reduce per plan,
            # stream-ordered on the GPU (no host sync); the guard's only collective.
            for plan, _ in self._runs:
                torch.distributed.all_reduce(plan.workspace[NONFINITE_SLOT : NONFINITE_SLOT + 1], torch.distributed.ReduceOp.MAX)
        counter_device = self.n_averaged.device
        if len(self._runs) == 1 and self._runs[0][0].device == counter_device:
            return None  # the common case: one device decides alone, on the device
        flags = [plan.workspace[NONFINITE_SLOT : NONFINITE_SLOT + 1] for plan, _ in self._runs]
        anywhere = torch.zeros(1, dtype=torch.long, device=counter_device)
        for flag in flags:  # into host memory: blocking, the CPU reads it next
            anywhere = torch.maximum(anywhere, flag.to(counter_device, torch.long, non_blocking=counter_device.type != "cpu"))
        for flag in flags:
            flag.copy_(anywhere, non_blocking=flag.device.type != "cpu")
        return anywhere.squeeze(0)

    def _skip_on_host(self) -> bool:
        """The guard for a user's avg_fn, whose slow path reads the device anyway: True (and
        n_skipped bumped) if an averaged model value is Inf or NaN."""
        for plan, _ in self._runs:
            for model, role in zip(plan.models, plan.roles):
                if role == ROLE_AVERAGE and model.numel() and not bool(torch.isfinite(model).all()):
                    self.n_skipped.add_(1)
                    return True
        return False

    def _update_unfused(self) -> None:
        update_per_tensor(self._runs, self.method, self.n_averaged)

    def _roles_by_name(self) -> dict[str, int]:
        """Each shadow tensor's role in the current plans (``plan.ROLE_*``): for tests and debugging."""
        return {name: role for plan, _ in self._runs or () for name, role in zip(plan.names, plan.roles)}

    def _ensure_plans(self, model: nn.Module) -> None:
        if self._watch is None or self._model_ref() is not model or self._watch.moved():
            self._refresh(model)

    # ------------------------------------------------------------------ swapping in and out
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

        >>> import torch, wavg_fused as wf
        >>> model = torch.nn.Linear(3, 1)
        >>> avg = wf.Averager(model, wf.EMA(0.5)); avg.update(model)
        >>> with torch.no_grad(): _ = model.weight.add_(1.0)
        >>> avg.copy_to(model); torch.equal(model.weight, avg.module.weight)
        True
        """
        model = de_parallel(model)
        if self._swap_state is not None:
            raise RuntimeError(f"Averager.copy_to: {_NOT_WHILE_SWAPPED}")
        self._check_averaged("copy_to")
        self._ensure_plans(model)
        _swap.copy_into_model(self._runs)

    @property
    def is_swapped(self) -> bool:
        """Whether the averaged weights are swapped into a model now."""
        return self._swap_state is not None

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Put the averaged weights into ``model``, or, if they are in already, take them out and
        restore ``model``'s own weights exactly. One launch per device each way (fused backends;
        an average in another dtype takes two to go in: backup, then copy).

        With equal dtypes the two are exchanged in place (no extra memory); for an average kept
        in another dtype (``dtype=torch.float32`` of a bf16 model) the model's weights are saved
        in a backup buffer while the average is in. While swapped in, ``update``, ``copy_to``,
        ``state_dict``, ``.to()`` and pickling raise, and after an exchange ``self.module`` holds
        the model's weights: evaluate ``model``, not the averager. Treat the model's weights as
        read-only meanwhile: in-place changes (``update_bn``) end up in the average after an
        exchange and are dropped after a backup. Swapping in raises ``RuntimeError`` if no
        update ever wrote the average (checking reads ``n_averaged``: it waits for the GPU).

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
        if self._swap_state is not None:
            self._swap_out(model)
            return
        self._check_averaged("swap")
        self._ensure_plans(model)
        pinned = _swap.pin_model(self._runs)
        if _swap.can_exchange(self._runs):
            _swap.exchange(self._runs)
            backups = None
        else:
            backups = _swap.save_model(self._runs)
            _swap.copy_into_model(self._runs)
        self._swap_state = (weakref.ref(model), backups, pinned)

    def _swap_out(self, model: nn.Module) -> None:
        swapped_into, backups, pinned = self._swap_state
        target = swapped_into()
        if target is None:  # deleted while the average was in it (its memory is pinned): take the average back
            self._swap_state = None
            _swap.restore_replaced(self._runs, pinned, backups, {})
            raise RuntimeError(
                "Averager.swap: the model the average was swapped into was deleted; the average is back "
                "in the averager and nothing was swapped (call swap again to swap it into this model)"
            )
        if target is not model:
            raise RuntimeError("Averager.swap: the averaged weights are swapped into another model; swap that one back")
        if self._watch is not None and self._watch.moved():
            reshard_fsdp(model)  # an eval forward inside the block leaves an FSDP2 root unsharded
        if self._watch is not None and not self._watch.moved():
            if backups is None:
                _swap.exchange(self._runs)
            else:
                _swap.restore_model(backups)
            self._swap_state = None
            return
        # A model tensor was replaced meanwhile (model.half(), .to(), a new Parameter): the plans'
        # addresses are the old memory (kept alive by `pinned`), so restore tensor by tensor.
        self._swap_state = None
        replaced, lost = _swap.restore_replaced(self._runs, pinned, backups, dict(local_named_tensors(model)))
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
                stacklevel=3,
            )

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights: inside the block ``model`` holds them; afterwards
        (also after an exception) it holds its own weights again, bit for bit.

        Swaps in and out as ``swap`` does (the same guards and costs); refuses to start while the
        average is swapped in already, and does not swap back if the block already did.

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
        if self._swap_state is not None:
            raise RuntimeError(f"Averager.swapped: {_NOT_WHILE_SWAPPED}")
        self.swap(model)
        try:
            yield model
        finally:
            if self._swap_state is not None:
                self.swap(model)

    def _refresh(self, model: nn.Module) -> None:
        """The slow path, taken when the model object or a tensor address changed: check the
        structure, rebuild the plans if any address differs, and watch the new addresses."""
        reshard_fsdp(model)  # an FSDP2 root left unsharded by an eval forward: back to its shards
        models = self._model_tensors(model)
        shadows = self._shadow_tensors()
        key = _fingerprint(models, shadows)
        if key != self._plan_key:
            self._build_plans(models, shadows, key)
        self._watch = AddressWatch(self._model_slots + self._shadow_slots, _module_slots(model))

    def _shadow_tensors(self) -> list[torch.Tensor]:
        if self._shadow_slots is None:
            self._shadow_names, self._shadow_slots = _slots(self.module)
        return _read(self._shadow_slots)

    def _model_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        stale = self._watch is not None and self._watch.modules_replaced()  # slots in a replaced module's dicts
        if self._model_ref is not None and self._model_ref() is model and not stale:
            try:
                return _read(self._model_slots)
            except KeyError:  # a tensor was removed from the model: check the structure again
                pass
        names, slots = _slots(model)
        tensors = _read(slots)
        shadows = self._shadow_tensors()
        self._check_pairing(names, tensors, shadows)
        self._model_ref, self._model_slots, self._plan_key = weakref.ref(model), slots, None
        return tensors

    def _role(self, index: int, name: str, shadow: torch.Tensor, num_params: int) -> int:
        """ROLE_AVERAGE for floating parameters (and buffers with use_buffers) not excluded."""
        averaged = index < num_params or self.use_buffers
        if shadow.is_floating_point() and averaged and not _excluded(name, self.exclude):
            return ROLE_AVERAGE
        return ROLE_COPY

    def _check_pairing(self, names: list[str], models: list[torch.Tensor], shadows: list[torch.Tensor]) -> None:
        """Raise ``ValueError`` unless the model's tensors pair with the shadows by name."""
        check_structure(self._shadow_names, shadows, names, models)

    def _build_plans(self, models: list[torch.Tensor], shadows: list[torch.Tensor], key: tuple) -> None:
        check_structure(self._shadow_names, shadows, self._shadow_names, models)
        if not all(self._storage.owns(s) for s in local_pairs(self._shadow_names, shadows, models)[0]):
            self._repack()  # a shadow tensor was replaced behind our back (e.g. load with assign=True)
            shadows = self._shadow_tensors()
            key = _fingerprint(models, shadows)
        shadows, models = local_pairs(self._shadow_names, shadows, models)  # DTensors: their shards
        num_params = sum(1 for _ in self.module.parameters())
        by_device: dict[torch.device, list[int]] = {}
        for index, shadow in enumerate(shadows):
            by_device.setdefault(shadow.device, []).append(index)
        runs = []
        for device, indices in by_device.items():
            roles = [self._role(i, self._shadow_names[i], shadows[i], num_params) for i in indices]
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
        self._sharded_runs = has_dtensors(self.module)  # ranks hold different shards: the guard must agree

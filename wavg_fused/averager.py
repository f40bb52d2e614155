"""``Averager``: an averaged copy of a model in contiguous storage, updated with one fused pass.

The ``nn.Module`` face only: it checks arguments, keeps the counters, the schedule and the
checkpoint state, and hands every update to the engine (``wavg_fused.engine``), which owns the
plans, the watch and the launches over the shadow storage (``wavg_fused.shadow``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import swap as _swap
from .checkpoint import SKIPPED, CheckpointMethods
from .engine import Engine, Run
from .guard import SkipWatch, first_nonfinite, skip_on_host
from .methods import Method
from .options import check_options, checked_device, checked_exclude, checked_method
from .schedule import Action, Schedule
from .shadow import Shadow
from .sharded import check_supported
from .storage import ShadowStorage
from .swap_state import NOT_WHILE_SWAPPED, SwapMethods, refuse_while_swapped
from .unfused import update_per_tensor
from .unwrap import de_parallel

__all__ = ["Averager", "AvgFn"]

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-tensor rule ``avg_fn(averaged, model, n_averaged) -> new averaged`` (the slow path)."""

class Averager(CheckpointMethods, SwapMethods, nn.Module):
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

    Layers (README, "How it works"): this class is the ``nn.Module`` face (construction,
    checkpoints, the schedule, swapping); ``wavg_fused.engine.Engine`` runs updates over a
    ``wavg_fused.shadow.Shadow`` (the averaged copy in flat storage).

    The state dict has the keys ``torch.optim.swa_utils.AveragedModel`` writes
    (``module.<name>`` and ``n_averaged``) plus ``_extra_state``, the method and its
    hyperparameters (``load_state_dict`` restores them; see ``wavg_fused.method_state``).
    ``wavg_fused.AveragedModel`` writes exactly torch's keys.

    Examples:
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
    _pair_by_position = False  # AveragedModel pairs tensors by position when only names differ
    _member = 0  # which of the engine's shadows is this average's (an AveragerGroup's engine serves several)

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
        device = checked_device(device)
        check_options(dtype, backend, rounding_seed, skip_nonfinite, write_back_every)
        self.method = checked_method(method)
        self.skip_nonfinite, self.use_buffers, self.backend = skip_nonfinite, bool(use_buffers), backend
        self.stochastic_rounding, self.rounding_seed = bool(stochastic_rounding), rounding_seed
        self.schedule = Schedule(update_after, update_every)
        self.write_back_every = write_back_every
        self.exclude = checked_exclude(exclude)
        self._calls = 0  # update() calls so far: the schedule's clock, kept on the host
        model = de_parallel(model)
        check_supported(model)  # DeepSpeed ZeRO-3, FSDP1: a clear error instead of averaging placeholders
        shadow = Shadow(model, use_buffers=self.use_buffers, exclude=self.exclude, device=device, dtype=dtype,
                        averaged_module=averaged_module)
        self.module = shadow.module
        self.module.register_forward_pre_hook(refuse_while_swapped)
        self.module.register_state_dict_pre_hook(refuse_while_swapped)
        counter_device = device if device is not None else shadow.counter_device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=counter_device))
        # updates the non-finite guard skipped; bumped on the device next to n_averaged
        self.register_buffer(SKIPPED, torch.tensor(0, dtype=torch.long, device=counter_device), persistent=skip_nonfinite)
        # update() calls made inside compiled graphs, which cannot bump the host count _calls without
        # recompiling each step; folded into _calls when a checkpoint reads it
        self.register_buffer("_traced_calls", torch.tensor(0, dtype=torch.long, device=counter_device), persistent=False)
        self.__dict__["_engine"] = Engine([shadow], backend, pair_by_position=self._pair_by_position)
        self.__dict__["_swapped"] = None  # a SwappedIn while the average is in a model
        self.__dict__["_repeat"] = None  # the runs that update may launch again: see update
        self.__dict__["_skip_watch"] = SkipWatch()
        self._engine.runs(model)  # plans now, so a compiled first update finds them

    def _share_engine(self, engine: Engine, member: int) -> None:
        """Be shadow ``member`` of ``engine``, which serves several averages of one model (``AveragerGroup``)."""
        self.__dict__["_engine"], self.__dict__["_member"] = engine, member

    # ------------------------------------------------------------------ nn.Module plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)  # refused while swapped in (refuse_while_swapped)

    def extra_repr(self) -> str:
        rounding = f", stochastic_rounding=True, rounding_seed={self.rounding_seed}" if self.stochastic_rounding else ""
        return f"method={self.method!r}, use_buffers={self.use_buffers}, backend={self.backend!r}{rounding}"

    def _refuse_while_swapped(self, action: str) -> None:
        if self.__dict__.get("_swapped") is not None:
            raise RuntimeError(f"{action}: {NOT_WHILE_SWAPPED}")

    def __setattr__(self, name: str, value: Any) -> None:
        # a new method, counter, schedule, submodule or flag: the next update takes the checked path
        self.__dict__["_repeat"] = None
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        self._refuse_while_swapped("cannot pickle or copy an Averager")
        state = self.__dict__.copy()  # the engine drops what references the live model
        state["_repeat"] = None
        return state

    def _apply(self, fn: Callable, recurse: bool = True) -> Averager:
        # .to(), .cuda(), .half() replace the shadow tensors: pack them again right away so the
        # old flat buffers are freed and the next update rebuilds its plan.
        self._refuse_while_swapped("cannot move or convert an Averager (.to(), .cuda(), .half())")
        super()._apply(fn, recurse)
        if "_engine" in self.__dict__:
            self._repack()
        return self

    def _repack(self) -> None:
        self._engine.shadows[self._member].repack()
        self._engine.forget()

    @property
    def storage(self) -> ShadowStorage:
        """The flat buffers holding the averaged copy (``.nbytes``, ``.tensor_bytes``)."""
        return self._engine.shadows[self._member].storage

    @property
    def _runs(self) -> list[Run] | None:
        """The current (plan, backend) pairs, as the last update left them: for tests and debugging."""
        runs = self._engine._runs
        return None if runs is None else runs[self._member]

    def _roles_by_name(self) -> dict[str, int]:
        """Each shadow tensor's role in the current plans (``plan.ROLE_*``): for tests and debugging."""
        return {name: role for plan, _ in self._runs or () for name, role in zip(plan.names, plan.roles)}

    # ------------------------------------------------------------------ the update
    def _checked_model(self, model: nn.Module, action: str) -> nn.Module:
        if model is self or model is self.__dict__["_modules"].get("module"):
            which = "the averager" if model is self else "the averager's own module (avg.module)"
            raise ValueError(
                f"Averager.{action}: got {which} instead of the model being trained; pass that model "
                "(an average cannot be updated from itself)"
            )
        self._refuse_while_swapped(f"Averager.{action}")
        return de_parallel(model)

    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average; call after ``optimizer.step()``.

        One fused pass per shadow device; ``n_averaged`` is read and bumped on the device, so
        the call never waits for the GPU. A model whose structure differs raises ``ValueError``
        naming the first mismatching tensor, and the average is left untouched.
        """
        # The steady state (the same model, nothing moved, no setting changed since the last
        # update averaged through the engine's bound launch) repeats that launch: a few calls,
        # as the host work of a GPU step and a cold cache on a CPU step are both paid per call.
        if not torch.compiler.is_compiling():
            runs = self.__dict__.get("_repeat")
            if runs is not None and self.__dict__.get("_swapped") is None \
                    and self._engine.launch_again(model, self._member, runs):
                self.__dict__["_calls"] += 1
                return
        self._update_checked(model)

    @torch.no_grad()
    def _update_checked(self, model: nn.Module) -> None:
        passed = model
        model = self._checked_model(model, "update")
        if torch.compiler.is_compiling():
            self._update_traced(model)
            return
        action = self.schedule.action(self._calls + 1)
        if action is Action.SKIP:
            self._calls += 1
            return
        runs = self._engine.runs(model, self._member)
        tracking = action is Action.TRACK
        if not isinstance(self.method, Method):
            if self.skip_nonfinite and skip_on_host(runs):
                self.n_skipped.add_(1)
            elif tracking:  # before averaging starts the average follows the model, counted nowhere
                update_per_tensor(runs, self.method, torch.zeros((), dtype=torch.long), bump=False)
            else:
                self._update_unfused(runs)
        else:
            self._launch(runs, tracking)
            if self.skip_nonfinite:
                self._skip_watch.after_update(self.n_skipped, self.n_averaged, lambda: first_nonfinite(runs))
            elif action is Action.AVERAGE and passed is model and self.schedule.update_every == 1 \
                    and not self.write_back_every:  # every later call averages the same way too
                self.__dict__["_repeat"] = runs
        self.__dict__["_calls"] = self._calls + 1  # an int: nn.Module.__setattr__ would only end up here
        if action is Action.AVERAGE and self.write_back_every:
            if self.schedule.averaging_calls(self._calls) % self.write_back_every == 0:
                _swap.copy_into_model(runs)

    def _launch(self, runs: list[Run], tracking: bool) -> None:
        seed = self.rounding_seed if self.stochastic_rounding else -1
        skipped = self.n_skipped if self.skip_nonfinite else None
        self._engine.launch(runs, self.method, self.n_averaged, skipped, tracking=tracking, rounding_seed=seed)

    def _update_unfused(self, runs: list[Run]) -> None:
        update_per_tensor(runs, self.method, self.n_averaged)

    def _update_traced(self, model: nn.Module) -> None:
        """``update`` as ``torch.compile`` traces it: the plans built at construction (or by the
        last eager update), checked at run time (``compiled.check_unmoved``), then the fused op."""
        if not self._engine.planned(model):
            raise RuntimeError(
                "Averager.update under torch.compile: this model is not the one the plans were built for (or the "
                "averager was just loaded or moved); call avg.update(model) once outside the compiled function"
            )
        if not isinstance(self.method, Method):
            raise NotImplementedError("Averager.update under torch.compile: a callable avg_fn runs eagerly only")
        if self.schedule != Schedule() or self.write_back_every:
            raise NotImplementedError(
                "Averager.update under torch.compile: update_after, update_every and write_back_every are "
                "decided on the host; call update outside the compiled function to use them"
            )
        self._engine.check_unmoved_in_graph(self._member)
        self._launch(self._runs, tracking=False)
        self._traced_calls.add_(1)

"""The update engine, read top-down: a model's tensors -> the watch -> the plans -> the backends ->
the shadow storage. Each step uses only the ones after it; nothing here knows the ``Averager``.

* ``slots.TensorSlots``: where the model keeps each tensor, read without walking the model.
* ``watch.AddressWatch``: did any model or shadow tensor move, or a submodule get replaced, since
  the plans were built? Host metadata only, every update (the fast path ends here).
* ``plan.Plan``: per shadow and device, the tables a kernel reads (built when something moved).
* ``backends``: one launch per plan (``backends.registry.select_backend`` picks the backend).
* ``shadow.Shadow``: the averaged copy and its flat storage, which the kernels write.

An engine serves one model and any number of shadows of it (``shadows``); ``runs(model, k)``
gives shadow ``k``'s (plan, backend) pairs, current for ``model``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .backends.base import Backend
from .backends.registry import select_backend
from .compiled import check_unmoved
from .group_plan import MAX_FLATS, MAX_MEMBERS, GroupPlan
from .guard import combine_flags
from .methods import Method
from .plan import Plan, check_structure
from .shadow import Shadow
from .sharded import address, has_dtensors, local_pairs, reshard_fsdp
from .slots import TensorSlots, tied_names
from .watch import AddressWatch

__all__ = ["Run", "Engine", "MemberStep", "check_pairing"]

Run = tuple[Plan, Backend]


@dataclass(frozen=True)
class MemberStep:
    """What one update does to one shadow of a group (``Engine.launch_group``): ``active`` False
    leaves it as it is (its schedule skips this call); ``tracking`` copies the model without
    counting (a schedule's warm-up)."""

    method: Method
    n_averaged: torch.Tensor
    active: bool = True
    tracking: bool = False
    rounding_seed: int = -1


def _fingerprint(tensors: Sequence[torch.Tensor]) -> tuple:
    # Host metadata only (reading it never syncs a device): where each tensor's bytes are (a
    # DTensor's are its local tensor's) and how they are viewed, since `p.data = p.data.t()` or a
    # `.view()` of another shape keeps the address.
    return tuple((address(t), t.dtype, t.shape, t.stride()) for t in tensors)


def check_pairing(
    shadow: Shadow, model_slots: TensorSlots, models: Sequence[torch.Tensor], shadows: Sequence[torch.Tensor],
    by_position: bool = False,
) -> None:
    """Raise ``ValueError`` unless the model's tensors pair with the shadow's by name (or, with
    ``by_position``, by position when only the names differ, as torch's ``AveragedModel`` zips)."""
    names = model_slots.names
    if by_position and names != shadow.names and len(names) == len(shadow.names):
        try:
            check_structure(shadow.names, shadows, shadow.names, models)
            return
        except ValueError:
            pass
    shadow_names = set(shadow.names)
    untied = [name for name in names if name not in shadow_names]
    if untied and untied[0] in tied_names(shadow.module):
        raise ValueError(
            f"model tensor {untied[0]!r} was tied to another when the averager was built and is not any more "
            "(a new Parameter was assigned to it): the average keeps one tensor for both names; build a new "
            "averager for the untied model, or tie them again"
        )
    check_structure(shadow.names, shadows, names, models)


def _modes_active() -> bool:
    # a TorchDispatchMode or TorchFunctionMode sees ops only through the dispatcher: the direct
    # call would pass it by (a logging mode, FakeTensorMode)
    return bool(torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack())


def _follow_requires_grad(shadows: Sequence[torch.Tensor], models: Sequence[torch.Tensor], before: list[bool] | None) -> None:
    # A layer (un)frozen in the model after construction: its shadow follows (the watch records
    # the flags, so the change re-plans and lands here). Only changes are followed, so a shadow
    # frozen on purpose (ema-pytorch's habit) stays frozen while the model's flag stays.
    if before is None or len(before) != len(models):
        return
    for shadow, model, was in zip(shadows, models, before):
        if model.requires_grad != was and isinstance(shadow, nn.Parameter):
            shadow.requires_grad_(model.requires_grad)


class Engine:
    """The plans and launches for ``shadows`` of one model, rebuilt only when the watch says so.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> engine = Engine([Shadow(model)], "auto")
    >>> [plan.names for plan, _ in engine.runs(model)]
    [['weight', 'bias']]
    """

    def __init__(self, shadows: Sequence[Shadow], backend: str, *, pair_by_position: bool = False) -> None:
        self.shadows = list(shadows)
        self.backend = backend
        self.pair_by_position = pair_by_position
        for shadow in self.shadows:  # an explicit backend that cannot run fails now
            for flat_device, _ in shadow.storage.flats:
                select_backend(backend, flat_device)
        self.forget()

    def forget(self) -> None:
        """Drop the plans and the watch (after the shadows were repacked, or on unpickling)."""
        self._model_ref: weakref.ref | None = None
        self._watch: AddressWatch | None = None
        self._model_count = 0
        self._key: tuple | None = None
        self._runs: list[list[Run]] | None = None
        self._sharded = False
        self._model_flags: list[bool] | None = None  # the model's requires_grad when last planned
        # (the runs it was decided for, their merged tables or None): made at the first group launch
        self._group: tuple[Sequence[Sequence[Run]], GroupPlan | None] | None = None
        # id(runs) -> (runs, method, n_averaged, rounding_seed, the bound launch or None): see `launch`
        self._prepared: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # they reference a live model
        state.update(_model_ref=None, _watch=None, _key=None, _runs=None, _model_flags=None, _group=None, _prepared={})
        return state

    # ------------------------------------------------------------------ the fast path
    def runs(self, model: nn.Module, index: int = 0) -> list[Run]:
        """Shadow ``index``'s (plan, backend) pairs, checked (host metadata only) to describe
        ``model`` as it is now; rebuilt when a tensor moved or the model is another object."""
        if self._watch is None or self._model_ref() is not model or self._watch.moved():
            self._refresh(model)
        return self._runs[index]

    def all_runs(self, model: nn.Module) -> list[list[Run]]:
        """Every shadow's (plan, backend) pairs, checked once (``runs`` checks per shadow)."""
        if self._watch is None or self._model_ref() is not model or self._watch.moved():
            self._refresh(model)
        return self._runs

    def moved(self) -> bool:
        """Whether a watched tensor moved (or nothing is watched) since the plans were built."""
        return self._watch is None or self._watch.moved()

    def planned(self, model: nn.Module) -> bool:
        """Whether plans for this very model object exist (the compiled path needs them)."""
        return self._runs is not None and self._model_ref() is model

    def check_unmoved_in_graph(self, index: int = 0) -> None:
        """Inside a compiled graph: raise at run time if a model tensor moved since the plans
        were built (``compiled.check_unmoved``); the host watch cannot run there."""
        tensors, addresses = self._watch.current_and_expected()
        if self._runs[index]:
            check_unmoved(self._runs[index][0][0].spare_count, tensors[: self._model_count], addresses[: self._model_count])

    # ------------------------------------------------------------------ launches
    def launch(
        self, runs: Sequence[Run], method: Method, n_averaged: torch.Tensor, n_skipped: torch.Tensor | None,
        *, tracking: bool = False, rounding_seed: int = -1,
    ) -> None:
        """One fused update per plan; ``n_averaged`` (and with the guard, ``n_skipped``: pass it
        to turn the guard on) read and bumped on the device. ``tracking`` (a schedule's warm-up)
        copies the model: w = 1 read from the plan's spare counter, ``n_averaged`` does not move.

        The common update (no guard, no tracking, one plan on the counter's device, nothing to
        stage) is one op call whose arguments are bound once per plan, method and counter: the
        host work per step stays a few microseconds, whatever the number of tensors."""
        if n_skipped is None and not tracking and not torch.compiler.is_compiling():  # a traced dict would recompile
            prepared = self._prepared.get(id(runs))
            if prepared is None or prepared[0] is not runs or prepared[1] is not method or prepared[2] is not n_averaged \
                    or prepared[3] != rounding_seed:
                prepared = (runs, method, n_averaged, rounding_seed, *self._bound_launches(runs, method, n_averaged, rounding_seed))
                self._prepared[id(runs)] = prepared
            if prepared[4] is not None:
                prepared[4]()
                return
        guard = n_skipped is not None
        anywhere = None
        if guard:
            for plan, backend in runs:
                backend.check_nonfinite(plan)
                plan.mark_stream()
            anywhere = combine_flags(runs, n_averaged.device, self._sharded)
        seed = -1 if tracking else rounding_seed
        counted = False
        # the counter's own device runs last: the others read it before it is bumped
        ordered = runs if len(runs) == 1 else sorted(runs, key=lambda run: run[0].device == n_averaged.device)
        for plan, backend in ordered:
            own = plan.device == n_averaged.device
            if tracking:
                n = plan.spare_count
            elif own:
                n = n_averaged
            else:  # a copy into host memory must land before the CPU kernel reads it: blocking there
                n = n_averaged.to(plan.device, non_blocking=plan.device.type != "cpu")
            backend.update(plan, method, n, own and not tracking, seed, guard, n_skipped if own else None, guard)
            plan.mark_stream()
            counted = counted or own
        if counted:
            return
        if anywhere is not None:
            if not tracking:
                n_averaged.sub_(anywhere).add_(1)
            n_skipped.add_(anywhere)
        elif not tracking:
            n_averaged.add_(1)

    def launch_again(self, model: nn.Module, index: int, runs: Sequence[Run]) -> bool:
        """Repeat the bound launch ``launch`` last made of ``runs`` (its method, counter and seed)
        if they are still shadow ``index``'s plans for ``model`` as it is now; else launch nothing
        and return False (the caller takes the checked path)."""
        if self._runs is None or self._runs[index] is not runs or self._model_ref() is not model:
            return False
        prepared = self._prepared.get(id(runs))
        if prepared is None or prepared[0] is not runs or prepared[4] is None:
            return False
        if prepared[5] is not None and self._watch.record is not None and not _modes_active():
            return prepared[5](self._watch.record)  # the watch and the launch in one call
        if self._watch.moved():
            return False
        prepared[4]()
        return True

    @staticmethod
    def _bound_launches(runs: Sequence[Run], method: Method, n_averaged: torch.Tensor,
                        rounding_seed: int) -> tuple[Callable[[], None] | None, Callable[[object], bool] | None]:
        # the backend's bound launch, and (where the backend has one) the same launch behind the
        # watch's record in one call
        if len(runs) != 1:
            return None, None
        plan, backend = runs[0]
        if plan.device != n_averaged.device or plan.staged_count or not hasattr(backend, "bound_update"):
            return None, None
        behind_watch = getattr(backend, "bound_update_if_unmoved", None)
        return (backend.bound_update(plan, method, n_averaged, rounding_seed),
                behind_watch(plan, method, n_averaged, rounding_seed) if behind_watch is not None else None)

    def launch_group(self, every_runs: Sequence[Sequence[Run]], steps: Sequence[MemberStep]) -> None:
        """Update every shadow (``every_runs[k]``, as ``all_runs`` gives them) as ``steps[k]`` says,
        in one launch that reads each model tensor once where the backend has a group kernel and
        each shadow is one plan on its counter's device; else one ``launch`` per active shadow
        (the same results: each shadow's elements are computed by the same code either way)."""
        group = self._group_plan(every_runs, steps)
        if group is None:
            for runs, step in zip(every_runs, steps):
                if step.active:
                    self.launch(runs, step.method, step.n_averaged, None, tracking=step.tracking,
                                rounding_seed=-1 if step.tracking else step.rounding_seed)
            return
        counters, flags, seeds = [], [], []
        for runs, step in zip(every_runs, steps):
            plan = runs[0][0]
            if step.active:
                plan.stage()
            counters.append(plan.spare_count if step.tracking else step.n_averaged)
            flags.append((0 if step.tracking else 1) | (2 if step.active else 0))
            seeds.append(-1 if step.tracking else step.rounding_seed)
        backend = every_runs[0][0][1]
        backend.update_group(group, [step.method for step in steps], counters, flags, seeds)
        group.mark_stream()
        for runs in every_runs:
            runs[0][0].mark_stream()

    def _group_plan(self, every_runs: Sequence[Sequence[Run]], steps: Sequence[MemberStep]) -> GroupPlan | None:
        """The merged tables for one launch, or ``None`` when the shadows cannot share one: decided
        once per set of plans (``_refresh`` and ``forget`` drop it), not every update."""
        if self._group is None or self._group[0] is not every_runs:
            self._group = (every_runs, self._merged(every_runs, steps))
        return self._group[1]

    @staticmethod
    def _merged(every_runs: Sequence[Sequence[Run]], steps: Sequence[MemberStep]) -> GroupPlan | None:
        if not 1 < len(every_runs) <= MAX_MEMBERS or any(len(runs) != 1 for runs in every_runs):
            return None
        plans = [runs[0][0] for runs in every_runs]
        backend = every_runs[0][0][1]
        if any(runs[0][1] is not backend for runs in every_runs) or not getattr(backend, "can_update_group", bool)():
            return None
        if any(plan.device != plans[0].device or step.n_averaged.device != plan.device
               for plan, step in zip(plans, steps)) or sum(len(plan.flats) for plan in plans) > MAX_FLATS:
            return None
        return GroupPlan(plans)

    # ------------------------------------------------------------------ the slow path
    def _refresh(self, model: nn.Module) -> None:
        """The model object or a tensor changed: walk the model again, check it against every
        shadow, rebuild the plans if any address or view differs, and watch the new slots."""
        reshard_fsdp(model)  # an FSDP2 root left unsharded by an eval forward: back to its shards
        model_slots = TensorSlots.of(model)
        models = model_slots.read()
        every_shadow = [shadow.tensors() for shadow in self.shadows]
        for shadow, shadows in zip(self.shadows, every_shadow):
            check_pairing(shadow, model_slots, models, shadows, self.pair_by_position)
            _follow_requires_grad(shadows, models, self._model_flags)
        self._model_flags = [m.requires_grad for m in models]
        key = _fingerprint(models + [t for shadows in every_shadow for t in shadows])
        if key != self._key or self._runs is None:
            self._runs = [self._build(shadow, models) for shadow in self.shadows]
            self._group = None
            self._prepared = {}
            key = _fingerprint(models + [t for shadow in self.shadows for t in shadow.tensors()])
        self._model_ref, self._key = weakref.ref(model), key
        shadow_slots = [slot for shadow in self.shadows for slot in shadow.slots.slots]
        self._watch = AddressWatch(model_slots.slots + model_slots.aliases, model_slots.modules, flagless_slots=shadow_slots)
        self._model_count = len(model_slots.slots)

    def _build(self, shadow: Shadow, models: list[torch.Tensor]) -> list[Run]:
        shadows = shadow.tensors()
        if not all(shadow.storage.owns(s) for s in local_pairs(shadow.names, shadows, models)[0]):
            shadow.repack()  # a shadow tensor was replaced behind our back (e.g. load with assign=True)
            shadows = shadow.tensors()
        roles = shadow.roles(shadows)
        shadows, models = local_pairs(shadow.names, shadows, models)  # DTensors: their shards
        self._sharded = self._sharded or has_dtensors(shadow.module)  # ranks hold different shards
        by_device: dict[torch.device, list[int]] = {}
        for index, tensor in enumerate(shadows):
            by_device.setdefault(tensor.device, []).append(index)
        runs = []
        for device, indices in by_device.items():
            plan = Plan(
                [shadow.names[i] for i in indices],
                [shadows[i] for i in indices],
                [models[i] for i in indices],
                [roles[i] for i in indices],
                [shadow.storage.offset_of(shadows[i]) for i in indices],
                [flat for (flat_device, _), flat in shadow.storage.flats.items() if flat_device == device],
            )
            backend = select_backend(self.backend, device)
            backend.prepare(plan)  # tables made now, so a compiled graph never builds one
            runs.append((plan, backend))
        return runs

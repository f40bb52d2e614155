"""``AveragerGroup``: several averages of one model (EMAs at two decays, an EMA beside an SWA, the
power-EMA profiles of post-hoc EMA) updated in one pass that reads each model tensor once.

Each member is a full ``Averager`` (``group["fast"]``: its module, forward, state dict, swapping);
the members share one engine (``wavg_fused.engine``), whose ``launch_group`` runs one kernel over
all of them where the backend has one (``cpu``, ``cuda``, ``triton``, ``cuda-emulated``) and one
update per member elsewhere (``torch``, a model spread over devices), with the same results.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .averager import Averager
from .checkpoint import checked_state_dict
from .engine import Engine, MemberStep
from .group_plan import MAX_MEMBERS
from .methods import Method
from .options import checked_device
from .schedule import Action
from .unwrap import de_parallel

__all__ = ["AveragerGroup"]

# Options each member may set for itself (a mapping with "method"), or the group for all.
MEMBER_OPTIONS = ("use_buffers", "dtype", "exclude", "stochastic_rounding", "rounding_seed", "update_after",
                  "update_every")
# Options that cannot share a pass, and why.
_NOT_IN_A_GROUP = {
    "skip_nonfinite": "the non-finite guard decides per update whether to write a shadow, from a check pass of "
                      "its own; use a separate Averager for a guarded average",
    "write_back_every": "it writes one average back into the model; use a separate Averager",
    "averaged_module": "each member makes its own copy of the model",
    "backend": "every member runs on the group's backend: pass backend= to AveragerGroup",
    "device": "every member lives on the group's device: pass device= to AveragerGroup",
}


def _unsupported(option: str, where: str) -> ValueError:
    if option in _NOT_IN_A_GROUP:
        return ValueError(f"AveragerGroup: {where} {option!r} cannot be set here: {_NOT_IN_A_GROUP[option]}")
    return ValueError(f"AveragerGroup: {where} {option!r} is not an Averager option a member can take "
                      f"(they are: method, {', '.join(MEMBER_OPTIONS)})")


def _member_spec(name: str, spec: Method | Mapping[str, Any]) -> tuple[Method, dict[str, Any]]:
    if isinstance(spec, Method):
        return spec, {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        method = options.pop("method", None)
        for option in options:
            if option not in MEMBER_OPTIONS:
                raise _unsupported(option, f"member {name!r}:")
        if isinstance(method, Method):
            return method, options
    else:
        method = spec
    raise TypeError(
        f"AveragerGroup: member {name!r} must be a wavg_fused Method (EMA(0.999), SWA(), PowerEMA(...)) or a mapping "
        f"with one under 'method' and its own options, got {method!r} (a callable avg_fn runs per tensor and cannot "
        "share a fused pass: use a separate Averager)"
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier() or hasattr(AveragerGroup, name):
        raise ValueError(f"AveragerGroup: member names must be identifiers that are not AveragerGroup attributes "
                         f"(they key the state dict and group[name]), got {name!r}")
    return name


class AveragerGroup(nn.Module):
    """Several averages of ``model`` updated in one fused pass: each model tensor is read once.

    Args:
        model: the model to average (as for ``Averager``).
        members: name -> ``Method``, or name -> a mapping with the member's ``"method"`` and any of
            its own options (``use_buffers``, ``dtype``, ``exclude``, ``stochastic_rounding``,
            ``rounding_seed``, ``update_after``, ``update_every``). At most 8.
        backend: shared by every member (``Averager``'s argument).
        device: shared by every member (``Averager``'s argument).
        **options: defaults for every member's options (a member's own mapping overrides them).
            ``skip_nonfinite``, ``write_back_every`` and ``averaged_module`` cannot share a pass:
            asking for them raises and says why.

    ``group[name]`` is that member, a full ``Averager``; each equals an ``Averager`` with the same
    arguments updated alone, bit for bit. The state dict holds each member's entries under its
    name (``"fast.module.weight"``, ``"fast.n_averaged"``, ...) and loads atomically: every
    member's entries are checked before any is copied.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> model = torch.nn.Linear(4, 2)
        >>> group = wf.AveragerGroup(model, {"fast": wf.EMA(0.99), "slow": wf.EMA(0.9999),
        ...                                  "swa": {"method": wf.SWA(), "update_after": 10}})
        >>> for step in range(20):
        ...     group.update(model)      # one pass updates all three
        >>> int(group["fast"].n_averaged), int(group["swa"].n_averaged)
        (20, 10)
        >>> group["slow"](torch.ones(1, 4)).shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, members: Mapping[str, Method | Mapping[str, Any]], *,
                 backend: str = "auto", device: torch.device | str | int | None = None, **options: Any) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(members, Mapping) or not members:
            raise ValueError(f"AveragerGroup: members must be a non-empty mapping of name -> Method, got {members!r}")
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"AveragerGroup: at most {MAX_MEMBERS} members share a pass, got {len(members)}")
        for option in options:
            if option not in MEMBER_OPTIONS:
                raise _unsupported(option, "option")
        device = checked_device(device)
        model = de_parallel(model)
        averagers = []
        for name, spec in members.items():
            method, own = _member_spec(_check_name(name), spec)
            averager = Averager(model, method, backend=backend, device=device, **{**options, **own})
            self.add_module(name, averager)
            averagers.append(averager)
        engine = Engine([averager._engine.shadows[0] for averager in averagers], backend)
        for index, averager in enumerate(averagers):
            averager._share_engine(engine, index)
        self.__dict__["_engine"] = engine
        engine.all_runs(model)  # plans now, as Averager builds its own

    # ------------------------------------------------------------------ the members
    def __getitem__(self, name: str) -> Averager:
        try:
            return self._modules[name]
        except KeyError:
            raise KeyError(f"AveragerGroup has no member {name!r} (it has {list(self._modules)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def names(self) -> list[str]:
        return list(self._modules)

    def items(self) -> list[tuple[str, Averager]]:
        return list(self._modules.items())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an AveragerGroup has no forward of its own: call a member, group[name](x)")

    # ------------------------------------------------------------------ the update
    def _checked_model(self, model: nn.Module) -> nn.Module:
        members = list(self._modules.values())
        if model is self or any(model is m or model is m.__dict__["_modules"].get("module") for m in members):
            raise ValueError("AveragerGroup.update: got the group, a member or a member's module instead of the model "
                             "being trained; pass that model")
        for member in members:
            member._refuse_while_swapped("AveragerGroup.update")
        return de_parallel(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s weights into every member, each by its own method and schedule, in one
        pass; call after ``optimizer.step()``. Nothing is written if the model does not match."""
        model = self._checked_model(model)
        members: list[Averager] = list(self._modules.values())
        if torch.compiler.is_compiling():  # each member's traced update: one fused op per member
            for member in members:
                member.update(model)
            return
        actions = [member.schedule.action(member._calls + 1) for member in members]
        if any(action is not Action.SKIP for action in actions):
            every_runs = self._engine.all_runs(model)
            steps = [
                MemberStep(member.method, member.n_averaged, active=action is not Action.SKIP,
                           tracking=action is Action.TRACK,
                           rounding_seed=member.rounding_seed if member.stochastic_rounding else -1)
                for member, action in zip(members, actions)
            ]
            self._engine.launch_group(every_runs, steps)
        for member in members:
            member._calls += 1

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load every member's entries (``"<name>.<key>"``), all checked before any is copied, so a
        failed load leaves every member as it was."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in self._modules}
        unexpected = []
        for key, value in state_dict.items():
            name, _, rest = key.partition(".")
            if name in parts and rest:
                parts[name][rest] = value
            else:
                unexpected.append(key)
        if strict and unexpected:
            raise RuntimeError(f"Error loading state_dict for AveragerGroup: unexpected keys {unexpected} (members: "
                               f"{list(parts)}); nothing was loaded")
        checked = {}
        for name, member in self._modules.items():
            member._refuse_while_swapped("AveragerGroup.load_state_dict")
            try:
                checked[name] = checked_state_dict(type(member).__name__, member.state_dict(keep_vars=True),
                                                   parts[name], strict)
            except RuntimeError as error:
                raise RuntimeError(f"AveragerGroup member {name!r}: {error}") from None
        missing = []
        for name, member in self._modules.items():
            result = member.load_state_dict(checked[name], strict=strict, assign=assign)
            missing += [f"{name}.{key}" for key in result.missing_keys]
            unexpected += [f"{name}.{key}" for key in result.unexpected_keys]
        return _IncompatibleKeys(missing, unexpected)

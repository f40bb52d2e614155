"""``WeightAverage``: weight averaging as an optimizer wrapper (torchcontrib's SWA, seed post 002).

The wrapper owns an ``Averager`` over the optimizer's parameters, so averaging, swapping and
checkpointing ride on the same fused kernels as the module form.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, update_bn

from .averager import Averager
from .methods import EMA, SWA, Method

__all__ = ["WeightAverage"]


class _Parameters(nn.Module):
    """The optimizer's parameters as a module, so the ``Averager`` can pair them by name."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)  # the same Parameter objects, not copies


def _group_layout(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    # groups and parameters, counted: cheap enough for every step (no per-tensor Python work)
    return len(optimizer.param_groups), sum(len(group["params"]) for group in optimizer.param_groups)


def _unique_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class WeightAverage(torch.optim.Optimizer):
    """Wrap ``optimizer`` to keep an average of its parameters (SWA or EMA).

    Manual mode (``start=None``): call ``update()`` whenever the current weights should be
    folded in. Automatic mode, as seed post 002 and torchcontrib's SWA: ``step()`` counts steps
    from 1 and averages after step ``s`` when ``s > start and s % freq == 0`` (``start=10,
    freq=3``: steps 12, 15, 18, ...), and, if ``swa_lr`` is given, drives the learning rate with
    torch's ``SWALR`` from step ``start`` on. ``swap()`` exchanges the averaged and the current
    weights in place (call it again to swap back); ``bn_update`` recomputes BatchNorm
    statistics for the weights now in the model (torch's ``update_bn``). ``skip_nonfinite``,
    ``backend`` and ``dtype`` are ``Averager``'s.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, also
    after ``load_state_dict`` (which replaces them there), so LR schedulers, LR monitors and
    checkpoint loading built on the wrapper all change the learning rate that is used. Step hooks
    registered on the wrapper run around its whole ``step`` (the average already updated).

    Differences from seed post 002: the first update copies the weights (the post's EMA started
    from zeros, biasing early averages towards 0), and the averaged state is one flat buffer
    per (device, dtype) updated in one fused pass instead of a per-parameter loop.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = wf.optim.WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=2, freq=1)
        >>> for _ in range(5):
        ...     opt.zero_grad(); model(torch.randn(8, 4)).square().mean().backward(); _ = opt.step()
        >>> int(opt.n_averaged)   # steps 3, 4 and 5 were averaged
        3
        >>> opt.swap(); opt.swap()   # averaged weights in, then the trained ones back
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        mode: str = "swa",
        *,
        decay: float = 0.999,
        start: int | None = None,
        freq: int = 1,
        swa_lr: float | None = None,
        anneal_steps: int = 0,
        anneal_strategy: str = "cos",
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mode not in ("swa", "ema"):
            raise ValueError(f"mode must be 'swa' or 'ema', got {mode!r}")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"start must be None or an int >= 0, got {start!r}")
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"freq must be an int >= 1, got {freq!r}")
        if swa_lr is not None and (start is None or swa_lr < 0):
            raise ValueError(f"swa_lr needs start (automatic mode) and must be >= 0, got swa_lr={swa_lr!r}, start={start!r}")
        method: Method = SWA() if mode == "swa" else EMA(decay)
        self.optimizer = optimizer  # param_groups, state, defaults: properties reading it
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}
        self.mode, self.start, self.freq = mode, start, freq
        self.swa_lr, self.anneal_steps, self.anneal_strategy = swa_lr, anneal_steps, anneal_strategy
        self.steps = 0
        self._swa_scheduler: SWALR | None = None
        self._params = _Parameters(_unique_params(optimizer))
        self._layout = _group_layout(optimizer)
        self.averager = Averager(self._params, method, backend=backend, dtype=dtype, skip_nonfinite=skip_nonfinite)

    # Properties, not copies: torch's Optimizer.load_state_dict replaces the wrapped optimizer's
    # param_groups and state with new objects, and a copy taken at construction would go stale.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups (the same list)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's per-parameter state (the same mapping)."""
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults (the same dict)."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups, which here are the wrapped
        # optimizer's: keep everything, so copy.deepcopy and pickling give a working wrapper.
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _check_layout(self) -> None:
        if _group_layout(self.optimizer) != self._layout:
            raise RuntimeError(
                "WeightAverage: the wrapped optimizer's parameter groups changed after wrapping "
                f"(groups x parameters {self._layout} -> {_group_layout(self.optimizer)}, e.g. by its "
                "add_param_group); their new parameters would not be averaged. Add the groups "
                "before wrapping, or wrap again"
            )

    @property
    def n_averaged(self) -> torch.Tensor:
        """Number of updates folded into the average (a device tensor)."""
        return self.averager.n_averaged

    @property
    def averaged_parameters(self) -> list[torch.Tensor]:
        """The averaged tensors, in the optimizer's parameter order."""
        return list(self.averager.module.parameters())

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average (one fused pass)."""
        self._check_layout()
        self.averager.update(self._params)

    def swap(self) -> None:
        """Exchange the averaged and the current parameters in place; call again to undo."""
        self.averager.swap(self._params)

    swap_swa_sgd = swap  # the name seed post 002 and torchcontrib use

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """The wrapped optimizer's step, then (automatic mode) the averaging schedule.

        Hooks registered on the wrapper (``register_step_pre_hook`` / ``_post_hook``) run around
        all of it, as torch runs an optimizer's; torch's global hooks run on the wrapped step."""
        self._check_layout()  # before the inner step changes anything
        args: tuple[Any, ...] = () if closure is None else (closure,)
        kwargs: dict[str, Any] = {}
        for hook in list(self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (new_args, new_kwargs), got {result!r}")
                args, kwargs = result
        loss = self._step(*args, **kwargs)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)
        return loss

    def _step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = self.optimizer.step(closure)
        self.steps += 1  # counted after the step, as seed post 002's step_counter
        if self.start is not None and self.steps > self.start and self.steps % self.freq == 0:
            self.update()
        if self.swa_lr is not None and self.steps >= self.start:
            # SWALR sets the learning rate of the next step, as a scheduler stepped after the optimizer
            if self._swa_scheduler is None:
                self._swa_scheduler = self._make_swa_scheduler()
            else:
                self._swa_scheduler.step()
        return loss

    def _make_swa_scheduler(self) -> SWALR:
        return SWALR(self.optimizer, self.swa_lr, anneal_epochs=self.anneal_steps, anneal_strategy=self.anneal_strategy)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(
            "WeightAverage: add parameter groups to the wrapped optimizer before wrapping it "
            "(the average's storage is laid out once)"
        )

    @staticmethod
    def bn_update(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None) -> None:
        """Recompute ``model``'s BatchNorm statistics with one pass over ``loader`` (torch's
        ``update_bn``); call it after ``swap()`` so the statistics match the averaged weights."""
        update_bn(loader, model, device)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the average and the schedule position."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "average": self.averager.state_dict(),
            "steps": self.steps,
            "swa_scheduler": self._swa_scheduler.state_dict() if self._swa_scheduler is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; a missing entry raises before anything changes."""
        missing = [k for k in ("optimizer", "average", "steps") if k not in state_dict]
        if missing:
            raise KeyError(f"WeightAverage.load_state_dict: missing entries {missing}; nothing was loaded")
        self.averager.load_state_dict(state_dict["average"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.steps = int(state_dict["steps"])
        if state_dict.get("swa_scheduler") is not None:
            lrs = [group["lr"] for group in self.param_groups]
            self._swa_scheduler = self._make_swa_scheduler()  # its constructor steps the lr: undo that
            self._swa_scheduler.load_state_dict(state_dict["swa_scheduler"])
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr

    def __repr__(self) -> str:
        return (f"WeightAverage(mode={self.mode!r}, start={self.start}, freq={self.freq}, swa_lr={self.swa_lr}, "
                f"optimizer={self.optimizer!r})")

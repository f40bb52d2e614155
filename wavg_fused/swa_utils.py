"""``torch.optim.swa_utils.AveragedModel``, drop-in, on the fused path.

``AveragedModel(model, device=None, avg_fn=None, multi_avg_fn=None, use_buffers=False)`` has
torch's constructor, ``update_parameters``, ``n_averaged`` (long, on ``device``, the CPU when
``None``), attributes and state dict keys (``module.<name>``, ``n_averaged``), so torch's
checkpoints load into it and its checkpoints load into torch's, strictly. It is an
``Averager``, so ``update``, ``copy_to``, ``swapped`` and the rest work too.

Which averaging rule runs where:

* fused (one pass for the whole model): no averaging function (SWA, torch's default), this
  module's ``get_ema_multi_avg_fn(decay)`` / ``get_swa_multi_avg_fn()``, the seed blog's
  ``wavg_fused.get_*_avg_fn``, and torch's own ``get_ema_multi_avg_fn(decay)`` and
  ``get_swa_multi_avg_fn()``, recognised by their code (the EMA decay is read from the closure).
  The fused rule is torch's ``lerp`` (weight ``1 - decay`` or ``1 / (n + 1)``, rounded to
  float32 for float32 and 16-bit tensors, from the nearer end), so for float32, bfloat16 and
  float16 models the ``cpu`` and ``torch`` backends give torch's ``_foreach_lerp_`` results bit
  for bit (the tests check this); the Triton interpreter, which does not fuse the multiply-add,
  differs by an ulp per update (a few over a run). GPU backends are not yet compared on a GPU.
* unfused, exactly torch's calls: any other ``avg_fn`` (per tensor; torch's ``get_ema_avg_fn``
  and ``get_swa_avg_fn`` included, whose formulas are not lerp) or ``multi_avg_fn`` (once per
  device and dtype group).

Where it differs from torch (all deliberate):

* Default SWA on the CPU: torch computes ``a + (b - a) / (n + 1)`` per tensor there (its foreach
  path is GPU-only); ours is the fused lerp, within an ulp or two of it. On the GPU torch uses
  the lerp too. Pass ``avg_fn=torch.optim.swa_utils.get_swa_avg_fn()`` for torch's CPU formula.
* float64 SWA: torch's ``get_swa_multi_avg_fn`` rounds the weight ``1 / (n + 1)`` to float32;
  ours keeps it in float64 (about 1e-8 relative difference).
* Integer tensors (BatchNorm's ``num_batches_tracked``) with ``use_buffers=True`` are copied
  from the model. Torch averages them: its EMA truncates ``decay * a + (1 - decay) * b`` into
  them (the counter stalls near its first value), its foreach SWA (``get_swa_multi_avg_fn``, and
  the default on the GPU) raises "Integer division with addcdiv" on every BatchNorm model, and
  its CPU default truncates ``a + (b - a) / (n + 1)``; ours works and keeps the model's counter.
  A user ``avg_fn`` / ``multi_avg_fn`` never sees integer tensors.
* Complex tensors are copied, not averaged (torch lerps them).
* Tensors pair with the model's by name (DataParallel, DDP and ``torch.compile`` wrappers are
  unwrapped); only when the names differ but the count, shapes and dtype kinds match do they
  pair by position, as torch's ``zip`` does. A mismatch raises ``ValueError`` and changes
  nothing, where torch zips silently or fails half-way.
* Extra keyword-only arguments: ``backend``, ``dtype`` (e.g. an fp32 average of a bf16 model)
  and ``averaged_module`` (for models ``copy.deepcopy`` cannot copy), as in ``Averager``.

Examples:
    >>> import torch, wavg_fused as wf
    >>> from torch.optim import swa_utils
    >>> model = torch.nn.Linear(4, 2)
    >>> ours = wf.AveragedModel(model, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9))
    >>> theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    >>> for _ in range(3):
    ...     with torch.no_grad():
    ...         _ = model.weight.mul_(1.5)
    ...     ours.update_parameters(model)
    ...     theirs.update_parameters(model)
    >>> torch.equal(ours.module.weight, theirs.module.weight), int(ours.n_averaged)
    (True, 3)
    >>> theirs.load_state_dict(ours.state_dict())   # the same keys: module.*, n_averaged
    <All keys matched successfully>
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim import swa_utils as _torch_swa_utils

from .averager import Averager
from .methods import EMA, SWA, Method
from .plan import check_structure
from .unfused import update_multi_tensor

__all__ = ["AveragedModel", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn", "fused_method"]

MultiAvgFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], "torch.Tensor | int"], None]


class _MultiAvgFn:
    """A ``multi_avg_fn`` tagged with its fused rule (``wavg_method``); a class, not a closure,
    so an ``AveragedModel`` holding one can be pickled."""

    wavg_method: Method

    def _weight(self, num_averaged: torch.Tensor | int) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        averaged_param_list: Sequence[torch.Tensor],
        current_param_list: Sequence[torch.Tensor],
        num_averaged: torch.Tensor | int,
    ) -> None:
        if not averaged_param_list:
            return
        first = averaged_param_list[0]
        if first.is_floating_point() or first.is_complex():  # what _foreach_lerp_ supports
            torch._foreach_lerp_(list(averaged_param_list), list(current_param_list), self._weight(num_averaged))
        else:
            # integers are counters (num_batches_tracked): copied, as the fused path does
            torch._foreach_copy_(list(averaged_param_list), list(current_param_list))


class _EMAMultiAvgFn(_MultiAvgFn):
    def __init__(self, decay: float) -> None:
        self.wavg_method = EMA(float(decay))
        self.decay = decay  # as given: torch computes 1 - decay in the caller's type

    def _weight(self, num_averaged: torch.Tensor | int) -> float:
        return 1 - self.decay

    def __repr__(self) -> str:
        return f"get_ema_multi_avg_fn(decay={self.decay!r})"


class _SWAMultiAvgFn(_MultiAvgFn):
    def __init__(self) -> None:
        self.wavg_method = SWA()

    def _weight(self, num_averaged: torch.Tensor | int) -> float:
        # torch's expression: for a tensor count the weight is rounded to float32, then read
        # on the host (a sync; torch's AveragedModel already syncs on n_averaged every update)
        weight = 1 / (num_averaged + 1)
        return float(weight)

    def __repr__(self) -> str:
        return "get_swa_multi_avg_fn()"


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """EMA for ``AveragedModel(multi_avg_fn=...)``: ``torch._foreach_lerp_(averaged, model,
    1 - decay)``, as torch's function of the same name. Fused in ``wavg_fused.AveragedModel``;
    in torch's ``AveragedModel`` it gives torch's results, except that integer tensors are
    copied rather than truncated.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> a, b = [torch.zeros(3)], [torch.ones(3)]
        >>> wf.get_ema_multi_avg_fn(0.75)(a, b, torch.tensor(1)); a[0]
        tensor([0.2500, 0.2500, 0.2500])
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")
    return _EMAMultiAvgFn(decay)


def get_swa_multi_avg_fn() -> MultiAvgFn:
    """SWA for ``AveragedModel(multi_avg_fn=...)``: ``torch._foreach_lerp_(averaged, model,
    1 / (n + 1))``, as torch's function of the same name; integer tensors are copied (torch's
    raises on them). Fused in ``wavg_fused.AveragedModel``.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> a, b = [torch.zeros(2)], [torch.full((2,), 3.0)]
        >>> wf.get_swa_multi_avg_fn()(a, b, torch.tensor(2)); a[0]
        tensor([1., 1.])
    """
    return _SWAMultiAvgFn()


def _code(fn: Callable) -> object:
    return getattr(inspect.unwrap(fn), "__code__", None)


# torch's multi_avg_fns are closures under torch.no_grad(): recognised by their code object
_TORCH_EMA_CODE = _code(_torch_swa_utils.get_ema_multi_avg_fn())
_TORCH_SWA_CODE = _code(_torch_swa_utils.get_swa_multi_avg_fn())


def fused_method(avg_fn: Callable | None = None, multi_avg_fn: Callable | None = None) -> Method | None:
    """The fused ``Method`` equivalent to an ``AveragedModel`` averaging function, or ``None``
    when it has to run as given.

    Examples:
        >>> import wavg_fused as wf
        >>> from torch.optim import swa_utils
        >>> fused_method(multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
        EMA(decay=0.9)
        >>> fused_method(), fused_method(avg_fn=swa_utils.get_ema_avg_fn(0.9))
        (SWA(), None)
    """
    fn = multi_avg_fn if multi_avg_fn is not None else avg_fn
    if fn is None:
        return SWA()
    tagged = getattr(fn, "wavg_method", None)
    if isinstance(tagged, Method):
        return tagged
    if multi_avg_fn is None:
        return None
    code = _code(multi_avg_fn)
    if code is not None and code is _TORCH_SWA_CODE:
        return SWA()
    if code is not None and code is _TORCH_EMA_CODE:
        original = inspect.unwrap(multi_avg_fn)
        cells = dict(zip(code.co_freevars, original.__closure__ or (), strict=False))
        decay = cells["decay"].cell_contents if "decay" in cells else None
        if isinstance(decay, numbers.Real) and not isinstance(decay, bool) and math.isfinite(decay) and 0 <= decay <= 1:
            return EMA(float(decay))
    return None


class AveragedModel(Averager):
    """``torch.optim.swa_utils.AveragedModel`` with the same arguments, behaviour and state dict,
    updated in one fused pass where the averaging function allows (see the module docstring
    for the rules and the list of differences).

    ``model``, ``device``, ``avg_fn``, ``multi_avg_fn`` and ``use_buffers`` are torch's.
    ``device`` places the averaged copy and ``n_averaged`` (which stays on the CPU when
    ``device`` is None, as in torch, also for a GPU model). ``backend``, ``dtype``,
    ``averaged_module`` and ``skip_nonfinite`` are keyword-only, as in ``Averager``
    (``n_skipped`` joins the state dict only with ``skip_nonfinite=True``).
    """

    def __init__(
        self,
        model: nn.Module,
        device: int | torch.device | str | None = None,
        avg_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor] | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
        use_buffers: bool = False,
        *,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        averaged_module: nn.Module | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        super().__init__(
            model,
            fused_method(avg_fn, multi_avg_fn) or multi_avg_fn or avg_fn,
            use_buffers=use_buffers,
            device=device,
            dtype=dtype,
            backend=backend,
            averaged_module=averaged_module,
            skip_nonfinite=skip_nonfinite,
        )
        self.__dict__["_avg_fn"], self.__dict__["_multi_avg_fn"] = avg_fn, multi_avg_fn
        self.n_averaged = torch.tensor(0, dtype=torch.long, device=device)
        self.n_skipped = torch.tensor(0, dtype=torch.long, device=device)  # bumped next to n_averaged

    # torch zips the tensors by position; names that differ (a re-wrapped or renamed model)
    # pair by position too when count, shapes and dtype kinds agree
    _pair_by_position = True

    # torch's state dict has no extra state; without it torch loads ours strictly
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    # torch reads these on every update, so assigning one later changes the rule: re-resolve it
    @property
    def avg_fn(self) -> Callable | None:
        return self._avg_fn

    @avg_fn.setter
    def avg_fn(self, fn: Callable | None) -> None:
        self.__dict__["_avg_fn"] = fn
        self._resolve()

    @property
    def multi_avg_fn(self) -> MultiAvgFn | None:
        return self._multi_avg_fn

    @multi_avg_fn.setter
    def multi_avg_fn(self, fn: MultiAvgFn | None) -> None:
        self.__dict__["_multi_avg_fn"] = fn
        self._resolve()

    def _resolve(self) -> None:
        avg_fn, multi_avg_fn = self._avg_fn, self._multi_avg_fn
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.method = fused_method(avg_fn, multi_avg_fn) or multi_avg_fn or avg_fn

    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model`` into the average (the first call copies it); ``n_averaged += 1``."""
        self.update(model)

    def _update_unfused(self, runs: list) -> None:
        if self._multi_avg_fn is not None and self.method is self._multi_avg_fn:
            update_multi_tensor(runs, self._multi_avg_fn, self.n_averaged)
        else:
            super()._update_unfused(runs)

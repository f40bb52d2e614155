"""ema-pytorch's ``EMA`` (ema-pytorch >= 0.8.3) on the fused path.

Change the import, keep the rest::

    from wavg_fused.integrations.ema_pytorch import EMA   # was: from ema_pytorch import EMA
    ema = EMA(model, beta=0.9999, update_after_step=100, update_every=10)
    ema.update()                                          # after each optimizer step

Same constructor and defaults, ``update()`` (it holds the online model),
``add_to_optimizer_post_step_hook``, ``ema_model``, calling it, ``forward_eval``,
``copy_params_from_model_to_ema`` / ``copy_params_from_ema_to_model``, ``update_model_with_ema``,
``get_current_decay``, the ``step`` and ``initted`` buffers and the state dict layout
(``initted``, ``step``, ``online_model.*`` unless ``include_online_model=False``,
``ema_model.*``), so checkpoints move between ema-pytorch's class and this one both ways. The
schedule is decided on the host from a mirror of ``step`` (ema-pytorch reads ``step`` and
``initted`` from the device on every call); the decay is computed in float32 as ema-pytorch
computes it, so values equal its own bit for bit on the ``cpu`` and ``torch`` backends.

Where it differs from ema-pytorch (docs/migrating.md): integer buffers
(BatchNorm's ``num_batches_tracked``) follow the model, where ema-pytorch never writes them after
the deepcopy (``copy_params_from_ema_to_model`` leaves the model's own, as ema-pytorch does, at
two small copies each); a tensor in ``ignore_names`` costs two small copies per update (it is
saved and restored around the fused pass); ``allow_different_devices``, ``coerce_dtype`` and ``use_foreach`` are accepted and have no
effect (the fused kernel reads any device and dtype; ema-pytorch raises without the first two);
complex tensors are copied, not averaged; only ``nn.Module`` models (no pytrees:
use ``ema_pytorch.EMAPytree``). Writing ``step`` costs one tiny device write per call.

Examples:
    >>> import torch
    >>> from wavg_fused.integrations.ema_pytorch import EMA
    >>> model = torch.nn.Linear(4, 2)
    >>> ema = EMA(model, beta=0.9, update_after_step=0, update_every=1)
    >>> for _ in range(3):
    ...     ema.update()
    >>> int(ema.step), bool(ema.initted), round(ema.get_current_decay(), 4)
    (3, True, 0.5193)
    >>> list(ema.state_dict())[:3]
    ['initted', 'step', 'online_model.weight']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..averager import Averager
from ..methods import EMA as _FusedEMA
from ._holder import AveragerHolder

__all__ = ["EMA"]

_COUNTERS = ("step", "initted")


def _floating(tensor: torch.Tensor) -> bool:
    return torch.is_floating_point(tensor) or torch.is_complex(tensor)


@contextlib.contextmanager
def _kept(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Put ``tensors`` back as they were after the block: the few tensors ema-pytorch leaves alone
    that the one fused pass writes (two small copies each, instead of a pass of their own)."""
    if not tensors:  # the common case: nothing to keep, no cost
        yield
        return
    with torch.no_grad():
        saved = [t.clone() for t in tensors]
    yield
    with torch.no_grad():
        torch._foreach_copy_(tensors, saved)


class EMA(AveragerHolder):
    """ema-pytorch's ``EMA``; arguments as in ema-pytorch 0.8.3, plus ``backend`` (keyword-only,
    ``Averager``'s)."""

    def __init__(
        self,
        model: nn.Module,
        ema_model: nn.Module | Callable[[], nn.Module] | None = None,
        beta: float = 0.9999,
        update_after_step: int = 100,
        update_every: int = 10,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
        param_or_buffer_names_no_ema: set[str] | list[str] = frozenset(),
        ignore_names: set[str] = frozenset(),
        ignore_startswith_names: set[str] = frozenset(),
        include_online_model: bool = True,
        allow_different_devices: bool = False,
        use_foreach: bool = False,
        update_model_with_ema_every: int | None = None,
        update_model_with_ema_beta: float = 0.0,
        forward_method_names: tuple[str, ...] = (),
        move_ema_to_online_device: bool = False,
        coerce_dtype: bool = False,
        lazy_init_ema: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA: model must be an nn.Module (for pytrees use ema_pytorch.EMAPytree), got {type(model).__name__}")
        super().__init__()
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.include_online_model = include_online_model
        # a list hides the online model from the module tree (and the state dict), as ema-pytorch does
        self.online_model = model if include_online_model else [model]
        if not isinstance(ema_model, nn.Module) and callable(ema_model):
            ema_model = ema_model()
        self.ema_model = None
        self.forward_method_names = forward_method_names
        self.update_every, self.update_after_step = update_every, update_after_step
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names, self.ignore_startswith_names = ignore_names, ignore_startswith_names
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = update_model_with_ema_beta
        # the fused kernel reads any device and casts any dtype, so these three change nothing
        self.allow_different_devices, self.coerce_dtype, self.use_foreach = allow_different_devices, coerce_dtype, use_foreach
        self.move_ema_to_online_device = move_ema_to_online_device
        self.__dict__["_backend"] = backend
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self.__dict__["_mirror"] = None  # (step, initted, what the buffers were when last seen)
        self.__dict__["_scratch"] = torch.zeros(())  # float32, on the host: get_current_decay's
        if lazy_init_ema:
            assert ema_model is None, "lazy_init_ema builds the EMA model itself"
        else:
            self.init_ema(ema_model)

    # ------------------------------------------------------------------ ema-pytorch's surface
    @property
    def model(self) -> nn.Module:
        return self.online_model if self.include_online_model else self.online_model[0]

    def init_ema(self, ema_model: nn.Module | None = None) -> None:
        """Build the averaged copy (a deepcopy of the model unless ``ema_model`` is given)."""
        model = self.model
        names = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _floating(t)]
        copied = [n for n in names if self._ignored(n) or n in self.param_or_buffer_names_no_ema]
        averager = Averager(model, _FusedEMA(0.0), use_buffers=True, averaged_module=ema_model,
                            exclude=copied, backend=self._backend)
        self.ema_model = self._hold(averager)
        for parameter in self.ema_model.parameters():
            parameter.requires_grad_(False)
        for name in self.forward_method_names:
            setattr(self, name, getattr(self.ema_model, name))
        self.parameter_names = {n for n, p in self.ema_model.named_parameters() if _floating(p)}
        self.buffer_names = {n for n, b in self.ema_model.named_buffers() if _floating(b)}
        self.__dict__["_frozen"] = [n for n in names if self._ignored(n)]

    def add_to_optimizer_post_step_hook(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run ``update()`` after every ``optimizer.step()``; returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def get_params_iter(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, p) for n, p in model.named_parameters() if n in self.parameter_names)

    def get_buffers_iter(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, b) for n, b in model.named_buffers() if n in self.buffer_names)

    def get_current_decay(self) -> float:
        """The decay of an averaging update now, from ``step``, in float32 as ema-pytorch has it."""
        elapsed = self._counters()[0] - self.update_after_step - 1
        if elapsed <= 0:
            return 0.0
        # ema-pytorch's float32 tensor ops, in place on one host scalar: the same roundings, no
        # device read, and a third of the time of fresh tensors (this runs on every averaging call)
        x = self._scratch.fill_(float(elapsed)).div_(self.inv_gamma).add_(1.0).pow_(-self.power)
        return x.neg_().add_(1.0).clamp_(min=self.min_value, max=self.beta).item()

    def update(self) -> None:
        """One call per optimizer step: copies while ``step <= update_after_step``, then blends on
        every ``update_every``-th call (one fused pass), and writes the EMA back into the model
        every ``update_model_with_ema_every`` calls."""
        step, initted = self._counters()
        self._publish(step + 1, set_initted=not initted)
        if not initted:
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            return
        due = step % self.update_every == 0
        if due and step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
            return
        if due:
            self._average()
        every = self.update_model_with_ema_every
        if every is not None and step % every == 0:
            self.update_model_with_ema()

    def copy_params_from_model_to_ema(self) -> None:
        self._blend(self.model, 0.0)

    def copy_params_from_ema_to_model(self) -> None:
        assert self._averager is not None
        counters = [b for _, b in self.model.named_buffers() if not _floating(b)]  # the model keeps its own
        with _kept(counters):
            self._averager.copy_to(self.model)

    @torch.no_grad()
    def update_model_with_ema(self, decay: float | None = None) -> None:
        """Move the online model toward the EMA: a copy when ``decay`` (default
        ``update_model_with_ema_beta``) is 0, else ``model.lerp_(ema, 1 - decay)`` per tensor."""
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            self.copy_params_from_ema_to_model()
            return
        if self.is_frozen:
            return
        ema_tensors = dict([*self.get_params_iter(self.ema_model), *self.get_buffers_iter(self.ema_model)])
        for name, tensor in [*self.get_params_iter(self.model), *self.get_buffers_iter(self.model)]:
            if self._ignored(name):
                continue
            source = ema_tensors[name].to(tensor.device, tensor.dtype)
            if name in self.param_or_buffer_names_no_ema:
                tensor.copy_(source)
            else:
                tensor.lerp_(source, 1.0 - decay)

    def restore_ema_model_device(self) -> None:
        assert self._averager is not None
        self._averager.to(self.initted.device)

    def eval(self) -> nn.Module:  # type: ignore[override]  # ema-pytorch's: the EMA model only
        return self.ema_model.eval()

    @torch.no_grad()
    def forward_eval(self, *args: Any, **kwargs: Any) -> Any:
        training = self.ema_model.training
        out = self.ema_model(*args, **kwargs)
        self.ema_model.train(training)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ema_model(*args, **kwargs)

    # ------------------------------------------------------------------ the fused average
    def _ignored(self, name: str) -> bool:
        return name in self.ignore_names or any(name.startswith(prefix) for prefix in self.ignore_startswith_names)

    def _average(self) -> None:
        if self.is_frozen:
            return
        if self.move_ema_to_online_device:
            online = next(self.model.parameters()).device
            if next(self.ema_model.parameters()).device != online:
                self._averager.to(online)
        # ignored tensors are copied by the fused pass (they are excluded), then put back
        frozen = [self.ema_model.get_parameter(n) if n in self.parameter_names else self.ema_model.get_buffer(n)
                  for n in self._frozen]
        with _kept(frozen):
            self._blend(self.model, self.get_current_decay())

    # ------------------------------------------------------------------ step and initted
    # The host decides the schedule from its mirror of the two buffers; the buffers are written
    # (no read) so state dicts and users see them. A buffer changed by anyone else (load_state_dict,
    # an in-place write, .to()) is noticed by its identity and version and read once.
    def _seen(self) -> tuple:
        return tuple((id(self._buffers[n]), self._buffers[n]._version) for n in _COUNTERS)

    def _counters(self) -> tuple[int, bool]:
        mirror = self._mirror
        if mirror is None or mirror[2] != self._seen():
            mirror = (int(self._buffers["step"]), bool(self._buffers["initted"]), self._seen())
            self.__dict__["_mirror"] = mirror
        return mirror[0], mirror[1]

    def _publish(self, step: int, set_initted: bool) -> None:
        self._buffers["step"].fill_(step)
        if set_initted:
            self._buffers["initted"].fill_(True)
        self.__dict__["_mirror"] = (step, True, self._seen())

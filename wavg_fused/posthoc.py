"""``PostHocEMA``: post-hoc EMA (Karras et al. 2024, EDM2, Appendix C.2), a drop-in for ema-pytorch's.

Two or more power-function EMAs of the model (``wavg_fused.PowerEMA``, the *profiles*) are
updated every step; every ``checkpoint_every_num_steps`` updates each one is saved as a snapshot
(``wavg_fused.posthoc_snapshots``). After training, an EMA of any other width is synthesised as
the least-squares combination of the snapshots (``wavg_fused.posthoc_math``). The profiles are
one ``AveragerGroup`` (``self.profiles``; members ``p0``, ``p1``, ...), so an update reads the
model once for all of them (at most 8 profiles).

Differences from ema-pytorch 0.8.3's ``PostHocEMA``, and decisions of this one:

- ``update()`` uses the model given at construction, as ema-pytorch's does; ``update(model)``
  averages that model instead (a compiled or wrapped one, say), leaving the held one as it is.
- A profile is exactly the paper's power EMA at any ``update_every``: its time is the number of
  updates it averaged. ema-pytorch's time is the ``update`` call count, so every update it skips
  stretches its profile, and its first update counts as two. ``update_every`` defaults to 1 (the
  paper's) where ema-pytorch's ``KarrasEMA`` defaults to 100.
- ``use_buffers=True`` by default: floating buffers are averaged, as ema-pytorch does.
  ``param_or_buffer_names_no_ema`` names tensors copied from the model (``Averager``'s
  ``exclude``). ``ignore_names``, ``ignore_startswith_names``, ``frozen=True`` and ``ema_model``
  are refused with an error saying what to do instead; ``allow_different_devices`` and
  ``move_ema_to_online_device`` are accepted and do nothing (the profiles live on ``device``,
  by default where the model is).
- Snapshots are safetensors files ``<index>.<step>.safetensors`` written atomically; only
  floating tensors are cast to ``checkpoint_dtype`` (ema-pytorch casts its counters too).
- A new ``PostHocEMA`` over a folder that holds snapshots continues from the latest step every
  profile has a snapshot of (the profiles are loaded from them, so at ``checkpoint_dtype``
  precision: ``state_dict()``/``load_state_dict()`` resume at full precision). Snapshots of other
  profiles in the folder are an error. Synthesis uses the snapshots up to the current step only;
  later ones (a run resumed from an earlier state dict) are overwritten as the run gets there.
- ``synthesize_ema_model(..., step=s)`` combines the snapshots up to step ``s`` only (ema-pytorch
  combines all of them, later ones included), with ``torch.linalg.lstsq`` in float64 (the paper's
  least squares; ema-pytorch uses a plain solve). It returns the averaged module itself, not a
  ``KarrasEMA`` around it. Tensors the profiles copy rather than average (integer buffers, and
  those named in ``param_or_buffer_names_no_ema``) are taken from the latest snapshot used.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import posthoc_snapshots as snapshots
from .averager import Averager
from .group import AveragerGroup
from .checkpoint import EXTRA_STATE
from .method_state import encode_method
from .methods import PowerEMA
from .posthoc_math import solve_weights
from .shadow import excluded

__all__ = ["PostHocEMA"]


def _sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _checked_gammas(sigma_rels: Iterable[float] | None, gammas: Iterable[float] | None) -> tuple[float, ...]:
    if (sigma_rels is None) == (gammas is None):
        raise ValueError(f"PostHocEMA: give exactly one of sigma_rels and gammas, got sigma_rels={sigma_rels!r}, "
                         f"gammas={gammas!r}")
    arg, values = ("sigma_rels", sigma_rels) if sigma_rels is not None else ("gammas", gammas)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"PostHocEMA: {arg} must be a sequence of numbers, got {values!r}")
    values = tuple(values)
    if len(values) < 2:
        raise ValueError(f"PostHocEMA: {arg} needs at least two profiles to synthesise others from, got {values!r}")
    found = []
    for i, value in enumerate(values):
        try:
            found.append(PowerEMA(**{arg[:-1]: value}).gamma)
        except ValueError as error:
            raise ValueError(f"PostHocEMA: {arg}[{i}]: {error}") from None
    if len(set(found)) != len(found):
        raise ValueError(f"PostHocEMA: the profiles must all differ, got {arg}={values!r}")
    return tuple(found)


def _target_gamma(gamma: float | None, sigma_rel: float | None, action: str) -> float:
    if (gamma is None) == (sigma_rel is None):
        raise ValueError(f"PostHocEMA.{action}: give exactly one of gamma and sigma_rel, got gamma={gamma!r}, "
                         f"sigma_rel={sigma_rel!r}")
    try:
        return PowerEMA(gamma=gamma, sigma_rel=sigma_rel).gamma
    except ValueError as error:
        raise ValueError(f"PostHocEMA.{action}: {error}") from None


def _refuse(**unsupported: tuple[bool, str]) -> None:
    for arg, (given, instead) in unsupported.items():
        if given:
            raise ValueError(f"PostHocEMA: {arg} is not supported; {instead}")


class PostHocEMA(nn.Module):
    """Post-hoc EMA (EDM2): power-EMA profiles of ``model``, snapshots of them on disk, and EMAs
    of any width synthesised from those after training. Takes ema-pytorch's ``PostHocEMA``
    arguments (``from wavg_fused import PostHocEMA``; the differences are in this module's doc).

    Args:
        model: the model being trained; ``update()`` averages it.
        sigma_rels: the profiles' relative widths (EDM2: ``(0.05, 0.10)``), or ``gammas``, their
            power-EMA exponents: exactly one of the two, at least two distinct profiles.
        checkpoint_every_num_steps: snapshot every profile after this many ``update`` calls, or
            ``"manual"`` (call ``checkpoint()``).
        checkpoint_folder: where the snapshots go (created if missing); one that holds this
            run's snapshots continues the series.
        checkpoint_dtype: the snapshots' floating dtype (None: the profiles' own).
        update_every: average on every ``update_every``-th call only.
        param_or_buffer_names_no_ema: tensors copied from the model instead of averaged.
        use_buffers: as ``wavg_fused.Averager``'s, but True by default, as in ema-pytorch.
        device: as ``wavg_fused.Averager``'s.
        dtype: as ``wavg_fused.Averager``'s.
        backend: as ``wavg_fused.Averager``'s.

    Examples:
        >>> import shutil, tempfile, torch, wavg_fused as wf
        >>> model, folder = torch.nn.Linear(4, 2), tempfile.mkdtemp()
        >>> ema = wf.PostHocEMA(model, sigma_rels=(0.05, 0.28), checkpoint_every_num_steps=10, checkpoint_folder=folder)
        >>> for _ in range(30):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(0.01)
        ...     ema.update()
        >>> sorted(p.name for p in ema.checkpoint_folder.iterdir())[:3]
        ['0.10.safetensors', '0.20.safetensors', '0.30.safetensors']
        >>> synthesized = ema.synthesize_ema_model(sigma_rel=0.15)   # an nn.Module like model
        >>> synthesized(torch.ones(1, 4)).shape
        torch.Size([1, 2])
        >>> shutil.rmtree(folder)
    """

    def __init__(
        self,
        model: nn.Module,
        ema_model: Callable[[], nn.Module] | None = None,
        sigma_rels: Iterable[float] | None = None,
        gammas: Iterable[float] | None = None,
        checkpoint_every_num_steps: int | Literal["manual"] = 1000,
        checkpoint_folder: str | Path = "./post-hoc-ema-checkpoints",
        checkpoint_dtype: torch.dtype | None = torch.float16,
        *,
        update_every: int = 1,
        param_or_buffer_names_no_ema: Iterable[str] = (),
        ignore_names: Iterable[str] = (),
        ignore_startswith_names: Iterable[str] = (),
        frozen: bool = False,
        allow_different_devices: bool = False,
        move_ema_to_online_device: bool = False,
        use_buffers: bool = True,
        device: torch.device | str | int | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"PostHocEMA: model must be an nn.Module, got {type(model).__name__}")
        _refuse(
            ema_model=(ema_model is not None, "the profiles are deep copies of model (see Averager's averaged_module)"),
            ignore_names=(bool(ignore_names), "use param_or_buffer_names_no_ema to copy those tensors from the model"),
            ignore_startswith_names=(bool(ignore_startswith_names), "use param_or_buffer_names_no_ema (module "
                                     "prefixes are allowed) to copy those tensors from the model"),
            frozen=(bool(frozen), "to keep the profiles still, do not call update()"),
        )
        self.gammas = _checked_gammas(sigma_rels, gammas)
        self.sigma_rels = tuple(float(s) for s in sigma_rels) if sigma_rels is not None else tuple(map(_sigma_rel, self.gammas))
        every = checkpoint_every_num_steps
        if every != "manual" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"PostHocEMA: checkpoint_every_num_steps must be an int >= 1 or 'manual', got {every!r}")
        if checkpoint_dtype is not None and not (isinstance(checkpoint_dtype, torch.dtype) and checkpoint_dtype.is_floating_point):
            raise ValueError(f"PostHocEMA: checkpoint_dtype must be a floating-point torch.dtype or None, got {checkpoint_dtype!r}")
        self.checkpoint_every_num_steps, self.checkpoint_dtype = every, checkpoint_dtype
        self.update_every, self.use_buffers = update_every, bool(use_buffers)
        self.exclude = tuple(param_or_buffer_names_no_ema)
        self.allow_different_devices, self.move_ema_to_online_device = allow_different_devices, move_ema_to_online_device
        self.__dict__["_model"] = model  # held, not a submodule: not in .parameters() or the state dict
        methods = {f"p{i}": PowerEMA(gamma=g) for i, g in enumerate(self.gammas)}
        self.profiles = AveragerGroup(model, methods, use_buffers=self.use_buffers, device=device, dtype=dtype,
                                  backend=backend, exclude=self.exclude, update_every=update_every)
        self.checkpoint_folder = Path(checkpoint_folder)
        self.checkpoint_folder.mkdir(parents=True, exist_ok=True)
        self._step = 0
        self._resume_from_folder()

    # ------------------------------------------------------------------ ema-pytorch's face
    @property
    def model(self) -> nn.Module:
        return self.__dict__["_model"]

    @property
    def step(self) -> torch.Tensor:
        """``update`` calls so far (a tensor, as ema-pytorch's)."""
        return torch.tensor(self._step)

    @property
    def num_ema_models(self) -> int:
        return len(self.gammas)

    @property
    def ema_models(self) -> list[Averager]:
        """The profiles, one ``wavg_fused.Averager`` each (``.module`` is its averaged copy)."""
        return [self.profiles[name] for name in self.profiles.names()]

    @property
    def device(self) -> torch.device:
        return self.ema_models[0].n_averaged.device

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Every profile's output, as ema-pytorch's ``PostHocEMA.__call__``."""
        return tuple(profile(*args, **kwargs) for profile in self.ema_models)

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """Fold the model (the one given at construction, or ``model``) into every profile; every
        ``checkpoint_every_num_steps`` calls, snapshot them."""
        self.profiles.update(self.model if model is None else model)
        self._step += 1
        every = self.checkpoint_every_num_steps
        if every != "manual" and self._step % every == 0:
            self.checkpoint()

    def checkpoint(self) -> list[Path]:
        """Write a snapshot of every profile at the current step now; return their paths."""
        t = int(self.ema_models[0].n_averaged)
        if t == 0:
            raise RuntimeError("PostHocEMA.checkpoint: no update has been averaged yet; call update() first")
        return [snapshots.write_snapshot(self.checkpoint_folder, i, self._step, int(profile.n_averaged), self.gammas[i],
                                         {name: self._stored(value) for name, value in profile.module.state_dict().items()})
                for i, profile in enumerate(self.ema_models)]

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        cast = tensor.is_floating_point() and self.checkpoint_dtype is not None
        return tensor.detach().to("cpu", self.checkpoint_dtype if cast else tensor.dtype, copy=True).contiguous()

    # ------------------------------------------------------------------ the series on disk
    def _snapshots(self) -> list[snapshots.Snapshot]:
        """The folder's snapshots, checked to be of these profiles."""
        found = snapshots.list_snapshots(self.checkpoint_folder)
        for snap in found:
            if snap.index >= len(self.gammas) or (snap.gamma is not None and not math.isclose(
                    snap.gamma, self.gammas[snap.index], rel_tol=1e-9)):
                raise ValueError(
                    f"PostHocEMA: checkpoint_folder {str(self.checkpoint_folder)!r} holds {snap.path.name}, a snapshot of "
                    f"another profile (gamma {snap.gamma}) than these (gammas {self.gammas}); use another folder"
                )
        return found

    def _resume_from_folder(self) -> None:
        found = self._snapshots()
        by_step: dict[int, list[snapshots.Snapshot]] = {}
        for snap in found:
            by_step.setdefault(snap.step, []).append(snap)
        complete = [step for step, snaps in by_step.items() if len(snaps) == len(self.gammas)]
        if not complete:
            return
        step = max(complete)
        for snap in by_step[step]:
            profile = self.ema_models[snap.index]
            state = profile.state_dict()
            for name, value in snapshots.read_tensors(snap).items():
                if f"module.{name}" not in state:
                    raise ValueError(f"PostHocEMA: {snap.path} holds {name!r}, which the model does not have")
                state[f"module.{name}"] = value
            state["n_averaged"] = torch.tensor(snap.t)
            state[EXTRA_STATE] = encode_method(profile.method, step)
            profile.load_state_dict(state)
        self._step = step

    def state_dict(self, *, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:  # type: ignore[override]
        """``step``, ``gammas`` and every profile's ``Averager`` state as ``profiles.<index>.<key>``."""
        own = {"step": torch.tensor(self._step), "gammas": torch.tensor(self.gammas, dtype=torch.float64)}
        own.update({f"profiles.{key}": value for key, value in self.profiles.state_dict().items()})
        destination = {} if destination is None else destination
        destination.update({prefix + key: value for key, value in own.items()})
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        """Load what ``state_dict`` wrote; the run continues its snapshot series from that step."""
        if "gammas" in state_dict and tuple(state_dict["gammas"].tolist()) != self.gammas:
            raise ValueError(f"PostHocEMA.load_state_dict: the state dict's gammas {tuple(state_dict['gammas'].tolist())} "
                             f"are not these profiles' {self.gammas}")
        if "step" not in state_dict:
            raise RuntimeError("PostHocEMA.load_state_dict: missing key 'step'; nothing was loaded")
        self.profiles.load_state_dict({key.removeprefix("profiles."): value for key, value in state_dict.items()
                                       if key.startswith("profiles.")}, strict=strict)
        self._step = int(state_dict["step"])
        later = [snap.path.name for snap in self._snapshots() if snap.step > self._step]
        if later:
            warnings.warn(f"PostHocEMA.load_state_dict: {len(later)} snapshots in {str(self.checkpoint_folder)!r} are after "
                          f"step {self._step} (e.g. {later[0]}); they are not used, and are replaced as the run gets there",
                          stacklevel=2)

    # ------------------------------------------------------------------ synthesis
    def _chosen(self, step: int | None, action: str) -> tuple[list[snapshots.Snapshot], int]:
        """The snapshots to combine for ``step`` and the profile time there."""
        found = [snap for snap in self._snapshots() if snap.step <= self._step]
        if not found:
            raise RuntimeError(
                f"PostHocEMA.{action}: no snapshots yet in {str(self.checkpoint_folder)!r} (one is written every "
                "checkpoint_every_num_steps updates, or by checkpoint())"
            )
        latest = found[-1].step
        step = latest if step is None else step
        if isinstance(step, bool) or not isinstance(step, int) or not found[0].step <= step <= latest:
            raise ValueError(f"PostHocEMA.{action}: step must be an int from the first snapshot's step {found[0].step} "
                             f"to the latest's {latest}, got {step!r}")
        chosen = [snap for snap in found if snap.step <= step]
        t = next((snap.t for snap in chosen if snap.step == step), step // self.update_every)
        return chosen, t

    def _averaged_names(self) -> set[str]:
        module = self.ema_models[0].module
        names = {n for n, p in module.named_parameters(remove_duplicate=False) if p.is_floating_point()}
        if self.use_buffers:
            names |= {n for n, b in module.named_buffers(remove_duplicate=False) if b.is_floating_point()}
        return {n for n in names if not excluded(n, self.exclude)}

    @torch.no_grad()
    def synthesize_ema_state_dict(self, gamma: float | None = None, sigma_rel: float | None = None,
                                  step: int | None = None) -> dict[str, torch.Tensor]:
        """The state dict (the model's keys) of the EMA with ``gamma`` or ``sigma_rel`` at ``step``
        (default: the latest snapshot's), combined from the snapshots up to ``step``; the
        combination is computed in float64, then cast to the profiles' dtypes and device."""
        action = "synthesize_ema_state_dict"
        gamma = _target_gamma(gamma, sigma_rel, action)
        chosen, t = self._chosen(step, action)
        weights = solve_weights([s.t for s in chosen], [self.gammas[s.index] for s in chosen], t, gamma).tolist()
        averaged, own = self._averaged_names(), self.ema_models[0].module.state_dict()
        total: dict[str, torch.Tensor] = {}
        for snap, weight in zip(chosen, weights):
            tensors = snapshots.read_tensors(snap)
            absent = sorted(own.keys() - tensors.keys())
            if absent:
                raise ValueError(f"PostHocEMA.{action}: {snap.path} has no {absent[0]!r}")
            for name in averaged & own.keys():
                term = tensors[name].double() * weight
                total[name] = total[name].add_(term) if name in total else term
        total.update({name: value for name, value in tensors.items() if name not in averaged})  # the latest snapshot's
        return {name: total[name].to(ref.device, ref.dtype) for name, ref in own.items()}

    def synthesize_ema_model(self, gamma: float | None = None, sigma_rel: float | None = None,
                             step: int | None = None) -> nn.Module:
        """A copy of the averaged module holding ``synthesize_ema_state_dict(gamma, sigma_rel, step)``."""
        state = self.synthesize_ema_state_dict(gamma, sigma_rel, step)
        module = copy.deepcopy(self.ema_models[0].module)
        module.load_state_dict(state, assign=True)
        return module

"""Lightning's ``WeightAveraging`` and ``EMAWeightAveraging`` callbacks on the fused path.

Drop-in subclasses of Lightning's own callbacks (lightning >= 2.6): same constructor, same
``should_update`` hook, same checkpoint layout; the average is a ``wavg_fused.AveragedModel``,
updated in one fused pass, and swapped in for validation with one launch instead of a Python
loop over tensors. Two fixes over the originals: an average that was never updated is not
swapped into the model (Lightning #21724), and ``EMAWeightAveraging`` takes the fused EMA
instead of torch's per-tensor ``get_ema_avg_fn`` (equal up to rounding: lerp instead of
``decay * a + (1 - decay) * b``).

    from wavg_fused.integrations.lightning import EMAWeightAveraging
    trainer = lightning.Trainer(callbacks=[EMAWeightAveraging(decay=0.999)])
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import weight_averaging as _lightning
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError as error:  # pragma: no cover - exercised only without Lightning
    raise ImportError("wavg_fused.integrations.lightning needs Lightning >= 2.6: pip install lightning") from error

from ..swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightAveraging", "EMAWeightAveraging"]


class _Fused:
    """What both callbacks change: the averaged model's class and how weights move."""

    _average_model: AveragedModel | None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning's own setup, with wavg_fused's AveragedModel (same constructor) in place of torch's
        if stage != "fit":
            return
        if is_overridden("configure_model", pl_module):
            rank_zero_warn("WeightAveraging does not shard the averaged copy of a model built in configure_model")
            pl_module.configure_model()
        device = self._device or pl_module.device
        self._average_model = AveragedModel(model=pl_module, device=device, use_buffers=self._use_buffers, **self._kwargs)

    def _swap_models(self, pl_module: Any) -> None:
        average = self._average_model
        assert average is not None
        if average.is_swapped:
            average.swap(pl_module)
        elif int(average.n_averaged) > 0:  # never swap in an average no update has touched
            average.swap(pl_module)

    def _copy_average_to_current(self, pl_module: Any) -> None:
        average = self._average_model
        assert average is not None
        if int(average.n_averaged) > 0:
            average.copy_to(pl_module)


class WeightAveraging(_Fused, _lightning.WeightAveraging):
    """Lightning's ``WeightAveraging`` (SWA unless ``avg_fn``/``multi_avg_fn`` say otherwise),
    fused. Pass ``multi_avg_fn=wavg_fused.get_ema_multi_avg_fn(decay)`` for an EMA."""


class EMAWeightAveraging(_Fused, _lightning.EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments), with the fused EMA."""

    def __init__(self, *args: Any, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(*args, decay=decay, **kwargs)
        self._kwargs["avg_fn"] = None
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)

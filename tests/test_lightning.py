"""The Lightning callbacks (run when Lightning is installed): same result as Lightning's own,
validation on the averaged weights, no swap of a never-updated average, checkpoints."""

import copy

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA  # noqa: E402

from wavg_fused.integrations.lightning import EMAWeightAveraging, WeightAveraging  # noqa: E402


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.validation_weights = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.validation_weights.append(self.net[0].weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(callback, module, epochs=2, sanity=0):
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=sanity, callbacks=[callback], limit_val_batches=1,
    )
    trainer.fit(module, _loader(0), _loader(1))
    return trainer


def test_fused_ema_matches_lightnings_own():
    torch.manual_seed(0)
    ours_module = Regressor()
    theirs_module = copy.deepcopy(ours_module)
    ours, theirs = EMAWeightAveraging(decay=0.9), LightningEMA(decay=0.9)
    _fit(ours, ours_module)
    _fit(theirs, theirs_module)
    assert int(ours._average_model.n_averaged) == int(theirs._average_model.n_averaged) == 16
    # on_train_end copies the average into the model, in both
    for (name, a), b in zip(ours_module.state_dict().items(), theirs_module.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # lerp vs decay*a + (1-decay)*b
    # integers are copied, not averaged: BatchNorm keeps counting batches (torch's avg_fn would
    # have blended the counts and truncated them)
    assert int(ours_module.net[1].num_batches_tracked) == 16
    # validation ran on the averaged weights, which differ from the trained ones
    for a, b in zip(ours_module.validation_weights, theirs_module.validation_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sanity_validation_does_not_swap_in_a_never_updated_average():
    torch.manual_seed(0)
    module = Regressor()
    initial = module.net[0].weight.detach().clone()
    callback = WeightAveraging()
    _fit(callback, module, epochs=1, sanity=1)
    assert torch.equal(module.validation_weights[0], initial)  # sanity check: the model's own weights
    assert not callback._average_model.is_swapped


def test_checkpoint_holds_the_average_and_resumes(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    callback = EMAWeightAveraging(decay=0.8)
    trainer = _fit(callback, module, epochs=1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    average = callback._average_model.module.state_dict()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in average.items())
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 8

    resumed = EMAWeightAveraging(decay=0.8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[resumed], limit_val_batches=1)
    trainer.fit(Regressor(), _loader(0), _loader(1), ckpt_path=path)
    assert int(resumed._average_model.n_averaged) == 16

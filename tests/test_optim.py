"""The optimizer-wrapper form (seed post 002): schedule, swap, checkpoints, SWALR, BatchNorm refresh."""

import copy
import warnings

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.optim import WeightAverage


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(opt, model, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _seed_schedule(start, freq, steps):
    """Seed post 002's rule, as written there (and in torchcontrib's SWA): the step counter is
    bumped after the inner step, then ``steps > wa_start and steps % wa_freq == 0`` averages."""
    averaged, counter = [], 0
    for _ in range(steps):
        counter += 1
        if counter > start and counter % freq == 0:
            averaged.append(counter)
    return averaged


@pytest.mark.parametrize("start, freq", [(10, 3), (0, 1), (0, 4), (3, 2), (5, 5), (7, 4), (2, 5), (1, 3)])
def test_automatic_mode_averages_at_the_seed_posts_steps(start, freq):
    model = nn.Linear(3, 2)
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=start, freq=freq)
    averaged_at = []
    for step in range(1, 31):
        before = int(opt.n_averaged)
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        if int(opt.n_averaged) != before:
            averaged_at.append(step)
    assert averaged_at == _seed_schedule(start, freq, 30)
    if (start, freq) == (10, 3):
        assert averaged_at[:3] == [12, 15, 18]  # the example: not 13, 16, 19


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_automatic_mode_averages_the_scheduled_steps(mode, backend):
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), mode, decay=0.8, start=3, freq=2, backend=backend)
    expected = None
    averaged = 0
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 12):
        x = torch.randn(16, 6, generator=generator)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if step in _seed_schedule(3, 2, 11):  # steps 4, 6, 8, 10
            current = [p.detach().double() for p in model.parameters()]
            if expected is None:
                expected = current
            else:
                w = 1 / (averaged + 1) if mode == "swa" else 0.2
                expected = [e + w * (c - e) for e, c in zip(expected, current)]
            averaged += 1
    assert averaged == 4 and int(opt.n_averaged) == 4
    for got, want in zip(opt.averaged_parameters, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_manual_mode_never_averages_on_its_own():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1))
    _train(opt, model, 5)
    assert int(opt.n_averaged) == 0
    opt.update()
    assert int(opt.n_averaged) == 1
    for got, want in zip(opt.averaged_parameters, model.parameters()):
        assert torch.equal(got, want)


def test_swap_exchanges_and_swapping_back_restores_exactly(backend):
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=0, backend=backend)
    _train(opt, model, 6)
    live, average = _snapshot(model), [a.clone() for a in opt.averaged_parameters]
    assert not all(torch.equal(a, b) for a, b in zip(live, average))
    opt.swap()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average))
    opt.swap_swa_sgd()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), live))
    assert all(torch.equal(p, a) for p, a in zip(opt.averaged_parameters, average))


def test_state_dict_round_trip_resumes_the_same_run():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "ema", decay=0.9, start=2)
    _train(opt, model, 5)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(opt, model, 4, seed=7)
    expected = [a.clone() for a in opt.averaged_parameters]

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = WeightAverage(torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9), "ema", decay=0.9, start=2)
    opt2.load_state_dict(saved)
    assert opt2.steps == 5 and int(opt2.n_averaged) == int(saved["average"]["n_averaged"])
    _train(opt2, resumed, 4, seed=7)
    for got, want in zip(opt2.averaged_parameters, expected):
        assert torch.equal(got, want)


def test_swa_lr_drives_the_learning_rate_from_start():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.5), "swa", start=3, swa_lr=0.05)
    lrs = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        model(torch.randn(4, 6, generator=generator)).sum().backward()
        opt.step()
    assert lrs[:3] == [0.5, 0.5, 0.5]
    assert lrs[4:] == pytest.approx([0.05, 0.05])  # anneal_steps=0: SWALR switches at once


def test_bn_update_refreshes_statistics_for_the_swapped_in_weights():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=0)
    _train(opt, model, 5)
    opt.swap()
    loader = [torch.randn(16, 6) for _ in range(3)]
    before = model[1].running_mean.clone()
    opt.bn_update(loader, model)
    assert not torch.equal(model[1].running_mean, before)
    opt.swap()


def test_bad_arguments_name_the_argument():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        WeightAverage(sgd, "polyak")
    with pytest.raises(ValueError, match="freq"):
        WeightAverage(sgd, start=1, freq=0)
    with pytest.raises(ValueError, match="start"):
        WeightAverage(sgd, start=-1)
    with pytest.raises(ValueError, match="swa_lr"):
        WeightAverage(sgd, swa_lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        WeightAverage(_model(), "swa")


def test_failed_load_leaves_everything_as_it_was():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=0)
    _train(opt, model, 3)
    average, steps = [a.clone() for a in opt.averaged_parameters], opt.steps
    with pytest.raises(KeyError, match="steps"):
        opt.load_state_dict({"optimizer": opt.optimizer.state_dict(), "average": opt.averager.state_dict()})
    assert opt.steps == steps and all(torch.equal(a, b) for a, b in zip(opt.averaged_parameters, average))


def test_lr_scheduler_accepts_the_wrapper():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(opt, model, 1)
    scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    assert isinstance(opt, torch.optim.Optimizer) and wf.optim.WeightAverage is WeightAverage


def test_scheduler_built_before_loading_a_checkpoint_drives_the_real_learning_rate():
    # the usual order: build optimizer and scheduler, then load the checkpoint
    model = nn.Linear(4, 2)
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.5), "swa", start=0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    scheduler.step()
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_param_groups_state_and_defaults_stay_the_wrapped_optimizers():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "ema", start=0)
    _train(opt, model, 2)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state and opt.defaults is opt.optimizer.defaults
    first = next(model.parameters())
    assert "momentum_buffer" in opt.state[first]  # the loaded momentum, seen through the wrapper
    opt.param_groups[0]["lr"] = 0.25  # what an LR monitor or a manual schedule does
    assert opt.optimizer.param_groups[0]["lr"] == 0.25


def test_deep_copy_is_a_working_independent_wrapper():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=0)
    _train(opt, model, 2)
    twin = copy.deepcopy(opt)
    assert twin.param_groups is twin.optimizer.param_groups and twin.optimizer is not opt.optimizer
    assert twin.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]
    assert int(twin.n_averaged) == int(opt.n_averaged) == 2


def test_step_hooks_registered_on_the_wrapper_run_around_the_whole_step():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=0)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt, int(opt.n_averaged))))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt, int(opt.n_averaged))))
    _train(opt, model, 2)
    pre.remove()
    _train(opt, model, 1)
    # the post hook sees the step's average already folded in
    assert seen == [("pre", True, 0), ("post", True, 1), ("pre", True, 1), ("post", True, 2), ("post", True, 3)]


def test_param_group_added_to_the_wrapped_optimizer_is_an_error_not_a_silent_gap():
    model = _model()
    opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "swa", start=0)
    _train(opt, model, 1)
    extra = nn.Parameter(torch.zeros(3))
    opt.optimizer.add_param_group({"params": [extra]})
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.step()
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.update()
    with pytest.raises(NotImplementedError, match="before wrapping"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_lr_schedulers_and_swa_lr_on_a_resumed_wrapper_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # schedulers wrap opt.step: no "step() before optimizer.step()" etc.
        model = _model()
        opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=1.0), "swa", start=1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
        for _ in range(2):
            _train(opt, model, 1)
            scheduler.step()
        saved, saved_scheduler = copy.deepcopy(opt.state_dict()), scheduler.state_dict()
        resumed = _model()
        opt2 = WeightAverage(torch.optim.SGD(resumed.parameters(), lr=1.0), "swa", start=1)
        scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda epoch: 0.5**epoch)
        opt2.load_state_dict(saved)
        scheduler2.load_state_dict(saved_scheduler)
        _train(opt2, resumed, 1)
        scheduler2.step()
        assert opt2.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)

        model = _model()
        opt = WeightAverage(torch.optim.SGD(model.parameters(), lr=1.0), "swa", start=2, swa_lr=0.05)
        _train(opt, model, 3)
        opt2 = WeightAverage(torch.optim.SGD(_model().parameters(), lr=1.0), "swa", start=2, swa_lr=0.05)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        _train(opt2, model, 2)
        assert opt2.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_lightning_resume_keeps_the_scheduler_on_the_real_optimizer(tmp_path):
    # Lightning builds optimizer and scheduler in configure_optimizers, then loads the checkpoint's
    # optimizer state into the wrapper: the resumed run must decay the learning rate in use.
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(4, 1)
            self.lrs = []

        def training_step(self, batch, batch_idx):
            self.lrs.append(self.trainer.optimizers[0].optimizer.param_groups[0]["lr"])
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            opt = WeightAverage(torch.optim.SGD(self.parameters(), lr=1.0), "swa", start=0)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)

    def fit(module, epochs, ckpt_path=None):
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight = Module()
        fit(straight, 3)
        first = Module()
        trainer = fit(first, 1)
        trainer.save_checkpoint(tmp_path / "one.ckpt")
        resumed = Module()
        fit(resumed, 3, ckpt_path=tmp_path / "one.ckpt")
    about_steps = [str(w.message) for w in caught if "step()" in str(w.message) or "lr_scheduler" in str(w.message)]
    assert not about_steps
    assert straight.lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert first.lrs + resumed.lrs == straight.lrs
    for got, want in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(got, want)

"""The optimizer-wrapper form (seed post 002): schedule, swap, checkpoints, SWALR, BatchNorm refresh."""

import copy

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

"""Schedules: the EMA warm-up and power-EMA methods on every backend against the float64
reference, their hyperparameter checks, and the host-side call schedule."""

import copy
import math

import pytest
import torch
from conftest import CPU_BACKENDS, cached_run
from reference import Reference, assert_matches_reference, reference_weight

import wavg_fused as wf
from wavg_fused.schedule import Action, Schedule

SCHEDULED = {
    "warmup": wf.EMAWarmup(decay=0.99, inv_gamma=2.0, power=0.75, min_decay=0.1),
    "power": wf.PowerEMA(gamma=6.94),
    "power_sigma": wf.PowerEMA(sigma_rel=0.05),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("name", list(SCHEDULED))
def test_scheduled_methods_match_float64_reference(name, dtype, backend):
    method = SCHEDULED[name]
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial).to(dtype)
    avg = wf.Averager(model, method, use_buffers=True, backend=backend)
    ref = Reference(method, use_buffers=True)
    for state in states:
        model.load_state_dict(state)
        avg.update(model)
        ref.update(model)
    assert_matches_reference(avg, ref)


@pytest.mark.parametrize("name", list(SCHEDULED))
def test_step_weight_matches_reference_and_kernels_agree_with_torch(name):
    method = SCHEDULED[name]
    for n in (0, 1, 2, 5, 100, 12345, 10**7):
        ours = float(method.step_weight(torch.tensor(n)))
        assert ours == pytest.approx(reference_weight(method, n), rel=1e-12, abs=1e-15), n
    # the fused kernels compute w_n themselves: after one averaging step from a known state the
    # shadow must be s + w (m - s) with the torch formula's w
    model = torch.nn.Linear(64, 64, dtype=torch.float64)
    for backend in CPU_BACKENDS:
        avg = wf.Averager(model, method, backend=backend)
        avg.update(model)
        avg.n_averaged.fill_(12345)
        before = avg.module.weight.detach().clone()
        with torch.no_grad():
            target = model.weight + 1.0
        moved = torch.nn.Linear(64, 64, dtype=torch.float64)
        moved.load_state_dict({"weight": target, "bias": model.bias.detach()})
        avg.update(moved)
        w = reference_weight(method, 12345)
        torch.testing.assert_close(avg.module.weight.detach(), before + w * (target - before), rtol=1e-13, atol=1e-13)


def test_warmup_reaches_its_decay_where_the_formula_says():
    m = wf.EMAWarmup(decay=0.9999, inv_gamma=1.0, power=2 / 3)
    assert 1 - float(m.step_weight(torch.tensor(31622))) == pytest.approx(0.999, abs=1e-6)
    assert float(m.step_weight(torch.tensor(10**9))) == pytest.approx(1e-4)  # capped at decay


def test_power_ema_gamma_zero_is_swa_and_sigma_rel_inverts():
    m = wf.PowerEMA(gamma=0.0)
    for n in range(6):
        assert float(m.step_weight(torch.tensor(n))) == pytest.approx(1 / (n + 1))
    for sigma in (0.01, 0.05, 0.1, 0.2):
        g = wf.sigma_rel_to_gamma(sigma)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma, rel=1e-9)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: wf.EMAWarmup(decay=1.5), "decay"),
        (lambda: wf.EMAWarmup(inv_gamma=0), "inv_gamma"),
        (lambda: wf.EMAWarmup(power=-1), "power"),
        (lambda: wf.EMAWarmup(decay=0.9, min_decay=0.95), "min_decay"),
        (lambda: wf.PowerEMA(), "exactly one"),
        (lambda: wf.PowerEMA(gamma=1.0, sigma_rel=0.1), "exactly one"),
        (lambda: wf.PowerEMA(gamma=-0.5), "gamma"),
        (lambda: wf.PowerEMA(sigma_rel=0.5), "sigma_rel"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_call_schedule():
    s = Schedule(update_after=3, update_every=2)
    actions = [s.action(call) for call in range(1, 10)]
    assert actions[:3] == [Action.TRACK] * 3
    assert actions[3:] == [Action.SKIP, Action.AVERAGE] * 3
    with pytest.raises(ValueError, match="update_every"):
        Schedule(update_every=0)
    with pytest.raises(ValueError, match="update_after"):
        Schedule(update_after=-1)


def _linear_run(steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    states = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, states


def test_update_after_tracks_then_update_every_skips(backend):
    model, states = _linear_run(9)
    avg = wf.Averager(model, wf.EMA(0.5), update_after=3, update_every=2, backend=backend)
    expected = None
    for call, state in enumerate(states, start=1):
        model.load_state_dict(state)
        avg.update(model)
        current = model.weight.detach().double()
        if call <= 3:  # tracking: the average is the model, nothing counted yet
            assert torch.equal(avg.module.weight, model.weight) and int(avg.n_averaged) == 0
        elif (call - 3) % 2 == 0:  # calls 5, 7, 9 average; the first of them copies (w_0 = 1)
            expected = current if expected is None else expected + 0.5 * (current - expected)
        if expected is not None:
            torch.testing.assert_close(avg.module.weight.double(), expected, rtol=1e-6, atol=1e-6)
    assert int(avg.n_averaged) == 3


def test_excluded_tensors_are_copied_not_averaged(backend):
    model, states = _linear_run(4)
    avg = wf.Averager(model, wf.EMA(0.5), exclude=["bias"], backend=backend)
    for state in states:
        model.load_state_dict(state)
        avg.update(model)
    assert torch.equal(avg.module.bias, model.bias)  # copied: always the latest
    assert not torch.equal(avg.module.weight, model.weight)  # averaged
    nested = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    avg = wf.Averager(nested, wf.EMA(0.5), exclude=["1"])  # a module prefix excludes its tensors
    avg.update(nested)
    assert [role for role in avg._roles_by_name().values()] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="'head'"):
        wf.Averager(nested, wf.EMA(0.5), exclude=["head"])
    with pytest.raises(TypeError, match="exclude"):
        wf.Averager(nested, wf.EMA(0.5), exclude="1")


def test_write_back_every_puts_the_average_into_the_model(backend):
    model, states = _linear_run(4)
    avg = wf.Averager(model, wf.EMA(0.5), write_back_every=2, backend=backend)
    for call, state in enumerate(states, start=1):
        model.load_state_dict(state)
        live = model.weight.detach().clone()
        avg.update(model)
        if call % 2 == 0:
            assert torch.equal(model.weight, avg.module.weight)
        else:
            assert torch.equal(model.weight, live)
    with pytest.raises(ValueError, match="write_back_every"):
        wf.Averager(model, wf.EMA(0.5), write_back_every=0)


def test_schedule_position_survives_a_checkpoint():
    model, states = _linear_run(8)
    avg = wf.Averager(model, wf.EMA(0.5), update_after=2, update_every=3)
    for state in states[:4]:
        model.load_state_dict(state)
        avg.update(model)
    saved = copy.deepcopy(avg.state_dict())
    resumed = wf.Averager(model, wf.EMA(0.5), update_after=2, update_every=3)
    resumed.load_state_dict(saved)
    for state in states[4:]:
        model.load_state_dict(state)
        avg.update(model)
        resumed.update(model)
    assert resumed._calls == avg._calls == 8
    assert int(resumed.n_averaged) == int(avg.n_averaged) == 2  # calls 5 and 8 averaged
    assert torch.equal(resumed.module.weight, avg.module.weight)
    bad = dict(saved)
    bad["_extra_state"] = wf.method_state.encode_method(wf.EMA(0.5), calls=-1)
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        resumed.load_state_dict(bad)
    assert resumed._calls == 8

"""``Averager.update``'s steady state: once an update averaged through the engine's bound launch,
the next ones repeat that launch after the watch (``Engine.launch_again``) and skip the checked
path. Every change that the checked path would act on sends the next update there again, so a
run with the repeats ends bit for bit where the same run without them ends."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.engine import Engine
from wavg_fused.schedule import Schedule

from models import OpLog


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def step(model: nn.Module, k: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (k + 1) * (i + 1))


def _state(avg: wf.Averager) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in avg.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.fixture
def checked_calls(monkeypatch):
    """How many updates took the checked path."""
    calls = []
    checked = wf.Averager._update_checked
    monkeypatch.setattr(wf.Averager, "_update_checked", lambda self, model: (calls.append(1), checked(self, model)))
    return calls


def test_updates_after_the_first_repeat_the_bound_launch(checked_calls):
    model = small_model()
    avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
    for k in range(5):
        step(model, k)
        avg.update(model)
    assert len(checked_calls) == 1
    assert avg.n_averaged.item() == 5 and avg._calls == 5


def test_the_torch_backend_has_no_bound_launch_and_always_checks(checked_calls):
    model = small_model()
    avg = wf.Averager(model, wf.EMA(0.9), backend="torch")
    for _ in range(3):
        avg.update(model)
    assert len(checked_calls) == 3


CHANGES = {
    "method reassigned": lambda avg, model: setattr(avg, "method", wf.SWA()),
    "guard turned on": lambda avg, model: setattr(avg, "skip_nonfinite", True),
    "write-back turned on": lambda avg, model: setattr(avg, "write_back_every", 2),
    "a parameter re-bound": lambda avg, model: setattr(model[0], "weight", nn.Parameter(model[0].weight.detach() + 1)),
    "a submodule replaced": lambda avg, model: model.__setitem__(2, copy.deepcopy(model[2])),
    "a model flag turned off": lambda avg, model: model[2].bias.requires_grad_(False),
    "converted to float64": lambda avg, model: avg.to(torch.float64),
    "a checkpoint loaded": lambda avg, model: avg.load_state_dict(avg.state_dict()),
    "the counter's data replaced": lambda avg, model: setattr(avg.n_averaged, "data", avg.n_averaged.data.clone()),
    "the counter swapped": lambda avg, model: torch.utils.swap_tensors(avg.n_averaged, avg.n_averaged.clone()),
    "a warm-up schedule loaded": lambda avg, model: (setattr(avg, "schedule", Schedule(update_after=10)),
                                                     avg.load_state_dict(avg.state_dict())),
}


def run_with_or_without_repeats(monkeypatch, make_model, change, repeat: bool, steps: int = 6):
    """``steps`` updates of a fresh model and average, ``change(avg, model)`` before the fourth; with
    ``repeat`` False every update takes the checked path."""
    model = make_model()
    avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
    with monkeypatch.context() as patch:
        if not repeat:
            patch.setattr(Engine, "launch_again", lambda self, model, index, runs: False)
        for k in range(steps):
            if k == 3:
                change(avg, model)
            step(model, k)
            avg.update(model)
    return avg, model


def assert_equal_states(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_updates_ends_where_the_checked_path_ends(monkeypatch, change):
    (avg, model), (expected_avg, expected_model) = (
        run_with_or_without_repeats(monkeypatch, small_model, CHANGES[change], repeat) for repeat in (True, False))
    assert avg._calls == expected_avg._calls
    assert_equal_states(_state(avg), _state(expected_avg))
    assert_equal_states(model.state_dict(), expected_model.state_dict())


def test_a_repeat_still_refuses_what_the_checked_path_refuses():
    model = small_model()
    avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
    avg.update(model)
    avg.update(model)
    with pytest.raises(ValueError, match="instead of the model being trained"):
        avg.update(avg.module)
    avg.swap(model)
    with pytest.raises(RuntimeError, match="swapped"):
        avg.update(model)
    avg.swap(model)
    other = small_model()
    avg.update(other)  # another model object: a new plan, averaged from it
    assert avg.n_averaged.item() == 3


def test_a_repeat_outside_no_grad_records_no_graph():
    """The repeat runs the op without ``torch.no_grad`` (its tensors never require grad): nothing is
    recorded, nothing warns, and the flags the average follows from the model stay as they were."""
    model = small_model()
    avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
    checked = wf.Averager(model, wf.EMA(0.9), backend="torch")
    avg.update(model), checked.update(model)
    step(model, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.enable_grad():
            avg.update(model)
    checked.update(model)
    shadow = dict(avg.module.named_parameters())
    for name, p in model.named_parameters():
        assert shadow[name].grad_fn is None and shadow[name].requires_grad == p.requires_grad, name
    for name, value in checked.module.state_dict().items():
        assert torch.equal(avg.module.state_dict()[name], value), name
    assert avg.n_averaged.item() == 2


def many_tensor_model() -> nn.Module:
    """More slots than one thread checks (1,024) and more bytes than one thread updates (1 MB): the
    cpu repeat's parallel region, with its chunks of slots and of elements."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 640), *[nn.Linear(1, 1) for _ in range(600)])


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


MANY_TENSOR_CHANGES = {
    "nothing": lambda model: None,
    "the last tensor re-viewed": lambda model: setattr(model[-1].weight, "data", model[-1].weight.data.as_strided((1, 1), (1, 2))),
    "the last tensor replaced in place": lambda model: setattr(model[-1].bias, "data", torch.zeros(1)),
    "the first tensor re-bound": lambda model: setattr(model[0], "bias", nn.Parameter(torch.ones(640))),
    "the last submodule replaced": lambda model: model.__setitem__(len(model) - 1, nn.Linear(1, 1)),
}


@pytest.mark.parametrize("change", list(MANY_TENSOR_CHANGES))
def test_the_cpu_repeat_in_one_region_ends_where_the_checked_path_ends(monkeypatch, threads, change):
    def change_model(avg, model):
        MANY_TENSOR_CHANGES[change](model)

    (avg, _), (expected_avg, _) = (
        run_with_or_without_repeats(monkeypatch, many_tensor_model, change_model, repeat, steps=5) for repeat in (True, False))
    assert avg._engine._prepared and all(p[5] is not None for p in avg._engine._prepared.values())
    assert_equal_states(_state(avg), _state(expected_avg))


def test_a_moved_slot_stops_the_cpu_repeat_before_it_writes(threads):
    model = many_tensor_model()
    avg = wf.Averager(model, wf.EMA(0.5), backend="cpu")
    step(model, 0)
    avg.update(model)
    engine = avg._engine
    [prepared] = engine._prepared.values()
    update_if_unmoved, record = prepared[5], engine._watch.record
    step(model, 1)
    assert update_if_unmoved(record) is True and avg.n_averaged.item() == 2
    before = _state(avg)
    model[-1].weight.data = model[-1].weight.data.clone()  # the last slot checked: a new address
    step(model, 2)
    assert update_if_unmoved(record) is False
    after = _state(avg)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    avg.update(model)  # the checked path: a new plan, then averaged
    assert avg.n_averaged.item() == 3
    assert torch.equal(avg.module[-1].weight, 0.5 * (before["module.600.weight"] + model[-1].weight))


def test_a_dispatch_mode_sees_the_cpu_repeat_as_the_op():
    """The one-call repeat bypasses the dispatcher; under a TorchDispatchMode (op loggers,
    FakeTensorMode) the repeat goes through the op, which the mode then sees."""
    model = small_model()
    avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
    avg.update(model)
    avg.update(model)
    with OpLog() as log:
        avg.update(model)
    assert [op for op in log.ops if "wavg_fused" in op] == ["wavg_fused.update_.default"]
    assert avg.n_averaged.item() == 3

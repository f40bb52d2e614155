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
    "a warm-up schedule loaded": lambda avg, model: (setattr(avg, "schedule", Schedule(update_after=10)),
                                                     avg.load_state_dict(avg.state_dict())),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_updates_ends_where_the_checked_path_ends(monkeypatch, change):
    def run(repeat: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        model = small_model()
        avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
        with monkeypatch.context() as patch:
            if not repeat:
                patch.setattr(Engine, "launch_again", lambda self, model, index, runs: False)
            for k in range(6):
                if k == 3:
                    CHANGES[change](avg, model)
                step(model, k)
                avg.update(model)
        return _state(avg), {k: v.clone() for k, v in model.state_dict().items()}, avg._calls

    (average, trained, calls), (expected_average, expected_trained, expected_calls) = run(True), run(False)
    assert calls == expected_calls
    assert average.keys() == expected_average.keys()
    for name in expected_average:
        assert torch.equal(average[name], expected_average[name]), name
    for name in expected_trained:
        assert torch.equal(trained[name], expected_trained[name]), name


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

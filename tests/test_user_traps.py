"""Ways a user could get a wrong average without a word (issue 18, items 2-6): each is now seen
and either handled or refused with an error that says what to do."""

import warnings

import pytest
import torch
from torch import nn

import wavg_fused as wf


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _fill(layer: nn.Linear, value: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)


@pytest.mark.parametrize("replacements", [1, 2], ids=["deleted-then-new", "replaced-twice"])
def test_a_recreated_submodule_is_seen_even_where_the_old_one_was(backend, replacements):
    """``del model.fc; model.fc = nn.Linear(...)`` often gets the freed module's id(); the
    averager must still average (and write back into) the new module."""
    for trial in range(10):
        model = Head()
        avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
        avg.update(model)
        start = avg.module.fc.weight.detach().clone()
        for _ in range(replacements):
            del model.fc  # CPython hands the freed module's memory (and id) to the next one
            model.fc = nn.Linear(4, 2)
        _fill(model.fc, float(replacements))
        avg.update(model)
        expected = start + 0.5 * (float(replacements) - start)
        torch.testing.assert_close(avg.module.fc.weight, expected, msg=f"trial {trial}")
        with torch.no_grad():
            model.fc.weight.zero_()
        avg.copy_to(model)
        torch.testing.assert_close(model.fc.weight, expected, msg=f"trial {trial}: copy_to")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


def test_untying_after_construction_is_refused_and_changes_nothing():
    model = Tied()
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    before = {k: v.clone() for k, v in avg.state_dict().items()}
    model.out.weight = nn.Parameter(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="'out.weight' was tied to another when the averager was built"):
        avg.update(model)
    assert all(torch.equal(v, before[k]) for k, v in avg.state_dict().items())


def test_the_average_cannot_be_updated_from_itself():
    model = Head()
    avg = wf.Averager(model, wf.SWA())
    avg.update(model)
    with pytest.raises(ValueError, match="the averager's own module"):
        avg.update(avg.module)
    with pytest.raises(ValueError, match="got the averager instead of the model"):
        avg.update(avg)
    with pytest.raises(ValueError, match="own module"):
        avg.copy_to(avg.module)
    assert int(avg.n_averaged) == 1


def test_forward_and_module_state_dict_are_refused_while_swapped(backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend, use_buffers=True)
    avg.update(model)
    live_mean = model[1].running_mean.clone()
    average_mean = avg.module[1].running_mean.clone()
    x = torch.randn(8, 3)
    with avg.swapped(model):
        for call in (lambda: avg(x), lambda: avg.module(x), lambda: avg.module.state_dict()):
            with pytest.raises(RuntimeError, match="cannot run or be saved while the averaged weights are swapped"):
                call()
    assert torch.equal(model[1].running_mean, live_mean)  # no forward ran on the live weights
    assert torch.equal(avg.module[1].running_mean, average_mean)
    avg(x)  # allowed again
    assert "0.weight" in avg.module.state_dict()


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0]))


def _runtime_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "skip_nonfinite" in str(w.message)]


def test_the_guard_says_once_which_tensor_skips_every_update(backend):
    model = Masked()
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend, use_buffers=True, skip_nonfinite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            avg.update(model)
    messages = _runtime_warnings(caught)
    assert int(avg.n_averaged) == 0 and int(avg.n_skipped) == 5
    assert len(messages) == 1 and "'mask'" in messages[0] and "the first update" in messages[0]


def test_the_guard_warns_after_a_run_of_skipped_updates():
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9), skip_nonfinite=True)
    avg.update(model)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(wf.guard.RUN_LENGTH - 1):
            avg.update(model)
        assert not _runtime_warnings(caught)  # a short run of bad steps is what the guard is for
        avg.update(model)
        avg.update(model)
    messages = _runtime_warnings(caught)
    assert len(messages) == 1 and "'weight'" in messages[0] and f"{wf.guard.RUN_LENGTH} updates in a row" in messages[0]


def test_unfreezing_after_construction_reaches_the_averaged_copy(backend):
    model = Head()
    model.body.requires_grad_(False)
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend)
    assert not avg.module.body.weight.requires_grad
    plan = avg._runs[0][0]
    model.body.requires_grad_(True)
    avg.update(model)
    assert avg.module.body.weight.requires_grad and avg.module.body.bias.requires_grad
    assert avg._runs[0][0] is plan  # a flag is not a new plan
    model.fc.requires_grad_(False)
    avg.update(model)
    assert not avg.module.fc.weight.requires_grad and avg.module.body.weight.requires_grad

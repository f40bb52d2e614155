"""state_dict / load_state_dict: AveragedModel's keys, plain-module loading, atomic failures."""

import copy
import io
import pickle

import pytest
import torch
from conftest import cached_run
from torch import nn
from torch.optim.swa_utils import AveragedModel

import wavg_fused as wf


def _trained_averager(method=wf.EMA(0.9), backend="torch"):
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial)
    avg = wf.Averager(model, method, backend=backend)
    for state in states[:5]:
        model.load_state_dict(state)
        avg.update(model)
    return model, avg


def test_keys_match_torch_averaged_model():
    model, avg = _trained_averager()
    keys = list(AveragedModel(model).state_dict())
    # plus the method entry (see test_checkpoint_interop.py); wf.AveragedModel writes torch's keys exactly
    assert list(avg.state_dict()) == keys[:1] + ["_extra_state"] + keys[1:]
    assert list(wf.AveragedModel(model).state_dict()) == keys
    assert avg.state_dict()["n_averaged"].dtype == torch.long


def test_round_trip_through_torch_save(backend):
    model, avg = _trained_averager(backend=backend)
    buffer = io.BytesIO()
    torch.save(avg.state_dict(), buffer)
    buffer.seek(0)
    fresh = wf.Averager(model, wf.EMA(0.9), backend=backend)
    fresh.load_state_dict(torch.load(buffer))
    assert int(fresh.n_averaged) == 5
    for (name, a), b in zip(fresh.state_dict().items(), avg.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(fresh.storage.owns(t) for t in fresh.module.parameters())  # loaded in place
    fresh.update(model)
    avg.update(model)
    torch.testing.assert_close(fresh.module.stem[0].weight, avg.module.stem[0].weight, rtol=0, atol=0)


def test_module_state_dict_loads_into_plain_model():
    model, avg = _trained_averager()
    plain = copy.deepcopy(model)
    plain.load_state_dict(avg.module.state_dict())
    x = torch.randn(2, 3, 8, 8)
    avg.eval()
    plain.eval()
    torch.testing.assert_close(plain(x), avg(x))


def test_loads_torch_averaged_model_state():
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial)
    theirs = AveragedModel(model)
    for state in states[:4]:
        model.load_state_dict(state)
        theirs.update_parameters(model)
    ours = wf.Averager(model, wf.SWA())
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.n_averaged) == 4
    torch.testing.assert_close(ours.module.head.weight, theirs.module.head.weight)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd: sd.pop("module.head.weight"), "missing keys.*module.head.weight"),
        (lambda sd: sd.__setitem__("module.extra", torch.zeros(1)), "unexpected keys.*module.extra"),
        (lambda sd: sd.__setitem__("module.head.bias", torch.zeros(3)), "module.head.bias.*shape"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_failed_load_leaves_average_untouched(corrupt, match):
    _, avg = _trained_averager()
    before = {k: v.clone() for k, v in avg.state_dict().items()}
    bad = {k: torch.full_like(v, 7) for k, v in avg.state_dict().items()}
    corrupt(bad)
    with pytest.raises(RuntimeError, match=match):
        avg.load_state_dict(bad)
    for name, value in avg.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a failed load"


def test_pickle_and_deepcopy_keep_working():
    model, avg = _trained_averager()
    for clone in (pickle.loads(pickle.dumps(avg)), copy.deepcopy(avg)):
        assert int(clone.n_averaged) == 5
        clone.update(model)
        avg_next = copy.deepcopy(avg)
        avg_next.update(model)
        torch.testing.assert_close(clone.module.head.weight, avg_next.module.head.weight)
        assert all(clone.storage.owns(t) for t in clone.module.parameters())


def test_deepcopy_does_not_copy_the_live_model():
    model = nn.Linear(1000, 1000)
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    clone = copy.deepcopy(avg)
    assert clone._engine._model_ref is None and clone._runs is None

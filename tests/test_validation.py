"""Bad input: each gets an error naming the argument or tensor, and leaves the averager as it was."""

import copy

import pytest
import torch
from torch import nn

import wavg_fused as wf

NAN, INF = float("nan"), float("inf")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


BAD_METHODS = [
    (lambda: wf.EMA(-0.1), ValueError, "decay must be in \\[0, 1\\], got -0.1"),
    (lambda: wf.EMA(1.5), ValueError, "decay must be in \\[0, 1\\]"),
    (lambda: wf.EMA(NAN), ValueError, "decay must be in \\[0, 1\\], got nan"),
    (lambda: wf.EMA(INF), ValueError, "decay must be in"),
    (lambda: wf.EMA("0.9"), TypeError, "decay must be a float"),
    (lambda: wf.EMA(True), TypeError, "decay must be a float"),
    (lambda: wf.TADEMA(-0.1), ValueError, "alpha must be in \\[0, 1\\]"),
    (lambda: wf.TADEMA(NAN), ValueError, "alpha must be in"),
    (lambda: wf.EMAWarmup(power=-1), ValueError, "power must be a finite number > 0"),
    (lambda: wf.EMAWarmup(inv_gamma=0), ValueError, "inv_gamma must be a finite number > 0"),
    (lambda: wf.EMAWarmup(decay=0.9, min_decay=0.95), ValueError, "min_decay \\(0.95\\) must not exceed decay"),
    (lambda: wf.PowerEMA(gamma=-2), ValueError, "gamma must be a finite number >= 0"),
    (lambda: wf.PowerEMA(sigma_rel=0.5), ValueError, "sigma_rel must be in"),
]


@pytest.mark.parametrize("make, error, message", BAD_METHODS)
def test_bad_hyperparameters(make, error, message):
    with pytest.raises(error, match=message):
        make()


BAD_ARGUMENTS = [
    ({"model": None}, TypeError, "model must be an nn.Module, got NoneType"),
    ({"method": "ema"}, TypeError, "method must be a wavg_fused Method or a callable avg_fn, got 'ema'"),
    ({"backend": "cudnn"}, ValueError, "backend must be 'auto' or one of"),
    ({"backend": 3}, TypeError, "backend must be a string"),
    ({"dtype": torch.int32}, ValueError, "dtype must be a floating-point torch.dtype"),
    ({"device": "foo"}, ValueError, "device must be a torch.device"),
    ({"update_after": -1}, ValueError, "update_after must be an int >= 0"),
    ({"update_every": 0}, ValueError, "update_every must be an int >= 1"),
    ({"write_back_every": 0}, ValueError, "write_back_every must be None or an int >= 1"),
    ({"exclude": "0.weight"}, TypeError, "exclude must be a collection"),
    ({"exclude": ["nope"]}, ValueError, "exclude: 'nope' names no parameter"),
    ({"rounding_seed": -1}, ValueError, "rounding_seed must be an int in"),
    ({"skip_nonfinite": 1}, TypeError, "skip_nonfinite must be a bool"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS, ids=[str(k) for k, _, _ in BAD_ARGUMENTS])
def test_bad_constructor_arguments(kwargs, error, message):
    kwargs = {"model": _model(), **kwargs}
    with pytest.raises(error, match=message):
        wf.Averager(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_device_without_cuda():
    with pytest.raises(RuntimeError, match="device='cuda': CUDA is not available"):
        wf.Averager(_model(), device="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable on cpu"):
        wf.Averager(_model(), backend="cuda")


@pytest.fixture
def averaged():
    model = _model()
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    avg.update(model)
    return model, avg, copy.deepcopy(avg.state_dict())


def _assert_unchanged(avg: wf.Averager, saved: dict) -> None:
    for key, value in avg.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} changed"


def _other_structure():
    return nn.Sequential(nn.Linear(3, 4))


def _other_shape():
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))


def _float_counter():
    model = _model()
    model[1].num_batches_tracked = model[1].num_batches_tracked.float()
    return model


def _renamed():
    return nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)))


BAD_MODELS = [
    (_other_structure, ValueError, "the model is missing tensor '1.weight'"),
    (_other_shape, ValueError, "tensor '0.weight': model shape \\(5, 3\\) differs"),
    (_float_counter, ValueError, "tensor '1.num_batches_tracked': model dtype torch.float32 cannot update a torch.int64"),
    (_renamed, ValueError, "expected '1.weight', got '1.0.weight'"),
    (lambda: torch.ones(3), TypeError, "model must be an nn.Module, got Tensor"),
]


@pytest.mark.parametrize("make, error, message", BAD_MODELS)
@pytest.mark.parametrize("call", ["update", "copy_to", "swap"])
def test_a_model_of_another_structure_is_refused(averaged, make, error, message, call):
    _, avg, saved = averaged
    with pytest.raises(error, match=message):
        getattr(avg, call)(make())
    assert not avg.is_swapped
    _assert_unchanged(avg, saved)


def _entries(saved: dict, **changes) -> dict:
    entries = dict(saved)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            entries.pop(key)
        else:
            entries[key] = value
    return entries


BAD_STATE_DICTS = [
    ({"module__0__weight": None}, "missing keys \\['module.0.weight'\\]"),
    ({"bogus": torch.ones(1)}, "unexpected keys \\['bogus'\\]"),
    ({"module__0__weight": torch.ones(5, 3)}, "'module.0.weight' has shape \\(5, 3\\), expected \\(4, 3\\)"),
    ({"module__0__weight": "x"}, "'module.0.weight' is a str, not a tensor"),
    ({"module__0__bias": torch.ones(4, dtype=torch.complex64)}, "'module.0.bias' is complex"),
    ({"module__0__bias": torch.ones(4, device="meta")}, "'module.0.bias' is on the meta device"),
    ({"module__1__num_batches_tracked": torch.tensor(1.5)}, "is torch.float32, expected an integer torch.int64"),
    ({"n_averaged": torch.tensor(-3)}, "'n_averaged' must be one count >= 0, got -3"),
    ({"_extra_state": torch.tensor([1, 2, 3], dtype=torch.uint8)}, "'_extra_state' is not a method entry"),
]


@pytest.mark.parametrize("changes, message", BAD_STATE_DICTS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD_STATE_DICTS)])
def test_a_bad_state_dict_loads_nothing(averaged, changes, message):
    _, avg, saved = averaged
    # the good entries come first, so a load that copied as it went would have changed them
    entries = _entries(saved, **changes)
    if "module.0.bias" not in changes and "module__0__bias" not in changes:
        entries["module.0.bias"] = torch.full((4,), 7.0)
    with pytest.raises(RuntimeError, match=message):
        avg.load_state_dict(entries)
    _assert_unchanged(avg, saved)
    assert int(avg.n_averaged) == 2 and avg.method == wf.EMA(0.9)

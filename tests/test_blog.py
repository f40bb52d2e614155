"""The seed blog's classes against the blog's own formulas (T-ADEMA: the intended per-update rule)."""

import copy
import math
import warnings

import pytest
import torch
from conftest import cached_run
from torch import nn

import wavg_fused as wf


def _blog_loop(kind, make_avg, blog_rule, use_buffers=False, steps=20):
    """Run the wavg_fused class and a float64 per-tensor loop of the blog's formula side by side."""
    initial, states = cached_run(kind)
    model = copy.deepcopy(initial)
    avg = make_avg(model)
    ref = {k: v.detach().double().clone() for k, v in avg.module.state_dict().items()}
    for n, state in enumerate(states[:steps]):
        model.load_state_dict(state)
        avg.update(model)
        params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
        for name, value in model.state_dict().items():
            averaged = value.is_floating_point() and (name in params or use_buffers)
            ref[name] = blog_rule(ref[name], value.double(), n) if (averaged and n > 0) else value.double()
    for name, value in avg.module.state_dict().items():
        torch.testing.assert_close(value.double(), ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(avg.n_averaged) == steps


@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_model(use_buffers):
    _blog_loop(
        "cnn",
        lambda m: wf.EMAModel(m, decay=0.9, use_buffers=use_buffers),
        lambda avg, cur, n: 0.9 * avg + (1 - 0.9) * cur,
        use_buffers,
    )


def test_swa_model():
    _blog_loop("transformer", wf.SWAModel, lambda avg, cur, n: avg + (cur - avg) / (n + 1))


def test_t_adema_model_counts_per_update():
    def rule(avg, cur, n):
        decay = 0.9 * math.tanh(n)
        return decay * avg + (1 - decay) * cur

    _blog_loop("cnn", lambda m: wf.T_ADEMAModel(m, alpha=0.9), rule)


def test_defaults_match_the_blog():
    net = nn.Linear(2, 2)
    assert wf.EMAModel(net).method == wf.EMA(0.9)
    assert wf.T_ADEMAModel(net).method == wf.TADEMA(0.9)
    assert wf.SWAModel(net).method == wf.SWA()
    base = wf.AveragingBaseModel(net)
    assert base.method == wf.SWA() and base.use_buffers is False
    assert base.n_averaged.device.type == "cpu"
    if not torch.cuda.is_available():
        assert wf.EMAModel(net, cuda=True).n_averaged.device.type == "cpu"


def test_avg_fns_compute_the_blog_formulas():
    a, b, n = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor(3)
    torch.testing.assert_close(wf.get_ema_avg_fn(0.75)(a, b, n), 0.75 * a + 0.25 * b)
    torch.testing.assert_close(wf.get_swa_avg_fn()(a, b, n), a + (b - a) / 4)
    decay = 0.5 * math.tanh(3)
    torch.testing.assert_close(wf.get_t_adema(0.5)(a, b, n), decay * a + (1 - decay) * b)
    assert wf.get_ema_avg_fn(0.75).wavg_method == wf.EMA(0.75)


def test_custom_avg_fn_takes_the_slow_path():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    avg = wf.AveragingBaseModel(net, avg_fn=lambda a, b, n: torch.maximum(a, b))
    avg.update(net)
    high = copy.deepcopy(net)
    with torch.no_grad():
        high[0].weight.fill_(100.0)
        net[0].weight.fill_(-100.0)
    avg.update(high)
    avg.update(net)
    assert torch.equal(avg.module[0].weight, torch.full((3, 3), 100.0))
    assert int(avg.n_averaged) == 3


def test_de_parallel_unwraps_wrappers():
    net = nn.Linear(2, 2)
    assert wf.de_parallel(nn.DataParallel(net)) is net
    assert wf.de_parallel(torch.compile(net)) is net
    assert wf.de_parallel(net) is net
    avg = wf.EMAModel(nn.DataParallel(net), decay=0.5)
    assert isinstance(avg.module, nn.Linear)
    avg.update(nn.DataParallel(net))
    assert torch.equal(avg.module.weight, net.weight)


def test_cuda_without_cuda_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(wf.blog, "_warned_no_cuda", False, raising=False)
    net = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="CUDA is not available.*stays on the CPU") as record:
        ema = wf.EMAModel(net, cuda=True)
        wf.SWAModel(net, cuda=True)
        wf.AveragingBaseModel(net, cuda=True)
    assert len([w for w in record if "CUDA is not available" in str(w.message)]) == 1
    assert record[0].filename == __file__  # points at the caller, not at blog.py
    assert ema.module.weight.device.type == "cpu"


def test_cuda_false_does_not_warn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(wf.blog, "_warned_no_cuda", False, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wf.EMAModel(nn.Linear(2, 2), cuda=False)

"""bf16 averages with stochastic rounding: unbiased, moving where round-to-nearest stalls,
reproducible, and the same bits on every backend."""

import pytest
import torch
from conftest import CPU_BACKENDS
from torch import nn

import wavg_fused as wf
from wavg_fused.rounding import stochastic_round_bf16


class Constant(nn.Module):
    def __init__(self, value: float, numel: int = 20_000, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((numel,), value, dtype=dtype))


def test_rounding_is_unbiased():
    values = torch.linspace(1.0, 1.5, 257)[1:-1].repeat(2000)  # 255 values between bf16 neighbours
    rounded = stochastic_round_bf16(values, seed=7, n_averaged=torch.tensor(3), first=0).float()
    mean = rounded.reshape(2000, 255).mean(0)
    ulp = 2.0**-7
    # each element rounds to a neighbour with probability by distance: mean within 4 sigma
    assert (mean - values[:255]).abs().max() < 4 * ulp / 2 / 2000**0.5
    assert set((rounded - values).abs().lt(ulp).tolist()) == {True}


def test_exact_values_stay_exact():
    values = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf"), 3.0e38])
    rounded = stochastic_round_bf16(values, seed=1, n_averaged=torch.tensor(0), first=0)
    assert torch.equal(rounded.float()[:5], values[:5])
    assert torch.isnan(stochastic_round_bf16(torch.tensor([float("nan")]), 1, torch.tensor(0), 0)).all()


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_slow_ema_keeps_moving_only_with_stochastic_rounding(stochastic, backend):
    start, target, decay, steps = 1.0, 1.01, 0.9999, 300
    model = Constant(start)
    avg = wf.Averager(model, wf.EMA(decay), dtype=torch.bfloat16, stochastic_rounding=stochastic, backend=backend)
    avg.update(model)
    with torch.no_grad():
        model.weight.fill_(target)
    for _ in range(steps):
        avg.update(model)
    exact = target + (start - target) * decay**steps  # 1.0002996
    mean = avg.module.weight.float().mean().item()
    if stochastic:
        assert abs(mean - exact) < 0.1 * (exact - start), (mean, exact)
    else:
        assert mean == start  # every step is below half a bf16 ulp: round-to-nearest drops it


def test_same_seed_same_bits_other_seed_other_bits(backend):
    def run(seed):
        model = Constant(1.0, numel=4099)
        avg = wf.Averager(model, wf.EMA(0.999), dtype=torch.bfloat16, stochastic_rounding=True,
                          rounding_seed=seed, backend=backend)
        avg.update(model)
        with torch.no_grad():
            model.weight.add_(0.003)
        avg.update(model)
        return avg.module.weight.detach().clone()

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


@pytest.mark.skipif(len(CPU_BACKENDS) < 2, reason="needs a second CPU backend")
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32], ids=["bf16_model", "fp32_model"])
def test_backends_draw_identical_bits(model_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.Linear(65, 7)).to(model_dtype)
    averages = {
        name: wf.Averager(model, wf.TADEMA(0.95), dtype=torch.bfloat16, stochastic_rounding=True,
                          rounding_seed=2**40 + 3, backend=name)
        for name in CPU_BACKENDS
    }
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        for avg in averages.values():
            avg.update(model)
    first, *others = averages.values()
    for other in others:
        for (name, a), b in zip(first.module.state_dict().items(), other.module.state_dict().values()):
            assert torch.equal(a, b), name


def test_stochastic_rounding_leaves_other_dtypes_alone(backend):
    model = nn.Linear(4, 4)
    plain = wf.Averager(model, wf.EMA(0.9), backend=backend)
    rounded = wf.Averager(model, wf.EMA(0.9), stochastic_rounding=True, backend=backend)
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.1)
        plain.update(model)
        rounded.update(model)
    assert torch.equal(plain.module.weight, rounded.module.weight)


def test_bad_seed():
    with pytest.raises(ValueError, match="rounding_seed"):
        wf.Averager(nn.Linear(2, 2), wf.EMA(0.9), stochastic_rounding=True, rounding_seed=-1)

"""Plan-level safety that CPU tests can show: dtypes no kernel handles are refused by name (never
copied silently or read out of bounds), and staged copies from host memory block."""

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.plan import ROLE_AVERAGE, Plan

FLOAT8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


def _model_with(dtype: torch.dtype) -> nn.Module:
    model = nn.Linear(3, 2)
    model.register_buffer("scale", torch.full((5,), 2.0).to(dtype))
    return model


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_average_is_refused_by_name(backend, dtype):
    model = _model_with(dtype)
    with pytest.raises(ValueError, match="'scale'.*cannot be averaged"):
        wf.Averager(model, wf.EMA(0.5), use_buffers=True, backend=backend)


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("shadow_dtype", [None, torch.float32], ids=["same", "fp32-average"])
def test_float8_buffer_is_copied_exactly(backend, dtype, shadow_dtype):
    """Not averaged (use_buffers=False): copied bit for bit in its own dtype, also with an fp32
    average of the rest (dtype= converts only the dtypes the kernels compute in)."""
    model = _model_with(dtype)
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend, dtype=shadow_dtype)
    assert avg.module.scale.dtype == dtype
    with torch.no_grad():
        model.scale.copy_(torch.arange(5.0).to(dtype))
    avg.update(model)
    assert torch.equal(avg.module.scale.view(torch.uint8), model.scale.view(torch.uint8))
    with torch.no_grad():
        model.scale.zero_()
    avg.copy_to(model)
    assert torch.equal(model.scale.float(), torch.arange(5.0))


def test_plan_refuses_a_float8_average_it_is_handed():
    x = torch.zeros(4, dtype=FLOAT8[0])
    with pytest.raises(ValueError, match="'w'"):
        Plan(["w"], [torch.zeros(4)], [x], [ROLE_AVERAGE], [0], [torch.zeros(4)])


def test_staging_from_host_memory_blocks(monkeypatch):
    """A model tensor in (pinned) host memory staged into a device average is copied blocking:
    a non-blocking copy from pinned memory would run after the optimizer's next write."""
    calls = []
    real = torch._foreach_copy_

    def record(dst, src, non_blocking=False):
        calls.append(non_blocking)
        if dst[0].device.type != "meta":
            real(dst, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch, "_foreach_copy_", record)
    shadow = torch.empty(6, device="meta")  # stands in for a GPU average: another device than the model's
    plan = Plan(["w"], [shadow], [torch.randn(6)], [ROLE_AVERAGE], [0], [shadow])
    assert plan.staged_count == 1
    plan.stage()
    assert calls == [False]

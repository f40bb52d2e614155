"""skip_nonfinite: an Inf or NaN in any averaged model value skips the whole update on every
backend (shadow bit for bit unchanged, n_averaged kept, n_skipped bumped), decided on the device."""

import copy

import pytest
import torch
from conftest import CPU_BACKENDS, DTYPES, METHODS
from reference import Reference, assert_matches_reference
from torch import nn

import wavg_fused as wf

BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
CASES = {  # (model dtype, average dtype)
    **{name: (dtype, None) for name, dtype in DTYPES.items()},
    "bf16/fp32": (torch.bfloat16, torch.float32),
}


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 300), nn.BatchNorm1d(300), nn.Linear(300, 5))
    return model.to(dtype)


def _nudge(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (step + 1))


def _snapshot(avg: wf.Averager) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in avg.module.state_dict().items()}


def _assert_bitwise(avg: wf.Averager, snapshot: dict[str, torch.Tensor]) -> None:
    for name, tensor in avg.module.state_dict().items():
        before = snapshot[name]
        assert tensor.view(-1).view(torch.uint8).equal(before.view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("bad", list(BAD_VALUES), ids=list(BAD_VALUES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_nonfinite_model_value_skips_the_whole_update(backend, method, case, bad):
    model_dtype, average_dtype = CASES[case]
    model = _model(model_dtype)
    avg = wf.Averager(model, method, backend=backend, dtype=average_dtype, use_buffers=True, skip_nonfinite=True)
    ref = Reference(method, use_buffers=True, shadow_dtype=average_dtype)
    for step in range(3):
        _nudge(model, step)
        avg.update(model)
        ref.update(model)
    before = _snapshot(avg)
    poisoned = model[2].weight  # one element, in the last tensor: the check must read them all
    with torch.no_grad():
        saved = poisoned[4, 299].clone()
        poisoned[4, 299] = BAD_VALUES[bad]
        model[1].running_mean.add_(1.0)  # a buffer change that must not land either
    avg.update(model)
    _assert_bitwise(avg, before)
    assert (int(avg.n_averaged), int(avg.n_skipped)) == (3, 1)
    with torch.no_grad():
        poisoned[4, 299] = saved
    avg.update(model)  # the next finite update goes on from where the average was
    ref.update(model)
    assert int(avg.n_skipped) == 1
    assert_matches_reference(avg, ref)


def test_the_guard_changes_nothing_for_a_finite_model(backend, method):
    model = _model(torch.float32)
    plain = wf.Averager(model, method, backend=backend, use_buffers=True)
    guarded = wf.Averager(model, method, backend=backend, use_buffers=True, skip_nonfinite=True)
    for step in range(4):
        _nudge(model, step)
        plain.update(model)
        guarded.update(model)
    _assert_bitwise(guarded, _snapshot(plain))
    assert (int(guarded.n_averaged), int(guarded.n_skipped)) == (4, 0)


def test_copied_tensors_do_not_trigger_the_guard(backend):
    # A -inf attention-mask buffer is a normal model tensor; only averaged values are checked.
    model = _model(torch.float32)
    model.register_buffer("mask", torch.full((4,), float("-inf")))
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend, skip_nonfinite=True)  # use_buffers=False: copied
    avg.update(model)
    avg.update(model)
    assert (int(avg.n_averaged), int(avg.n_skipped)) == (2, 0)
    assert torch.equal(avg.module.mask, model.mask)


def test_the_guard_without_it_lets_nan_in(backend):
    # why the option exists: without it one NaN step corrupts the average for good
    model = _model(torch.float32)
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend)
    avg.update(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    avg.update(model)
    assert torch.isnan(avg.module[0].weight[0, 0])


def test_skipped_during_the_warm_up_and_with_a_schedule(backend):
    model = _model(torch.float32)
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend, skip_nonfinite=True, update_after=2)
    before = _snapshot(avg)
    with torch.no_grad():
        model[0].bias[3] = float("inf")
    avg.update(model)  # a warm-up copy: skipped too
    _assert_bitwise(avg, before)
    assert (int(avg.n_averaged), int(avg.n_skipped)) == (0, 1)


def test_user_avg_fn_is_guarded_too():
    model = _model(torch.float32)
    avg = wf.Averager(model, lambda a, m, n: a + (m - a) / (n + 1), skip_nonfinite=True)
    avg.update(model)
    before = _snapshot(avg)
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    avg.update(model)
    _assert_bitwise(avg, before)
    assert (int(avg.n_averaged), int(avg.n_skipped)) == (1, 1)


def test_n_skipped_is_saved_only_with_the_guard_and_loads_either_way():
    model = _model(torch.float32)
    guarded = wf.Averager(model, wf.EMA(0.9), skip_nonfinite=True)
    plain = wf.Averager(model, wf.EMA(0.9))
    assert "n_skipped" in guarded.state_dict() and "n_skipped" not in plain.state_dict()
    guarded.update(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    guarded.update(model)
    restored = wf.Averager(model, wf.EMA(0.9), skip_nonfinite=True)
    restored.load_state_dict(guarded.state_dict())
    assert int(restored.n_skipped) == 1
    restored.load_state_dict(plain.state_dict())  # an older or unguarded checkpoint: strict is fine
    assert int(restored.n_skipped) == 1
    plain.load_state_dict(guarded.state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="unexpected keys \\['n_skipped'\\]"):
        plain.load_state_dict(guarded.state_dict())


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        wf.Averager(nn.Linear(2, 2), skip_nonfinite="yes")


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the compiled extension is not built")
def test_check_pass_reads_only_and_the_update_clears_the_flag():
    model = _model(torch.float32)
    avg = wf.Averager(model, wf.SWA(), backend="cpu", skip_nonfinite=True)
    avg.update(model)
    plan, backend = avg._runs[0]
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    before = _snapshot(avg)
    backend.check_nonfinite(plan)
    assert plan.workspace.tolist() == [0, 1]
    _assert_bitwise(avg, before)
    backend.update(plan, avg.method, avg.n_averaged, True, -1, True, avg.n_skipped, True)
    assert plan.workspace.tolist() == [0, 0]
    assert (int(avg.n_averaged), int(avg.n_skipped)) == (1, 1)


def test_deepcopy_and_pickle_keep_the_option():
    avg = wf.Averager(_model(torch.float32), wf.EMA(0.9), skip_nonfinite=True)
    assert copy.deepcopy(avg).skip_nonfinite


@pytest.mark.parametrize("method_name", list(METHODS))
def test_torch_and_fused_backends_skip_the_same_updates(method_name):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the compiled extension is not built")
    method = METHODS[method_name]
    model = _model(torch.bfloat16)
    runs = {name: wf.Averager(model, method, backend=name, dtype=torch.float32, skip_nonfinite=True) for name in ("cpu", "torch")}
    for step in range(6):
        _nudge(model, step)
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan") if step % 3 == 1 else 0.5
        for avg in runs.values():
            avg.update(model)
    fused, plain = runs["cpu"], runs["torch"]
    assert (int(fused.n_averaged), int(fused.n_skipped)) == (int(plain.n_averaged), int(plain.n_skipped)) == (4, 2)
    for (name, a), b in zip(fused.module.state_dict().items(), plain.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7, msg=name)


def test_the_wrappers_pass_the_guard_on():
    model = _model(torch.float32)
    opt = wf.optim.WeightAverage(torch.optim.SGD(model.parameters(), lr=0.1), "ema", skip_nonfinite=True)
    opt.update()
    swa = wf.AveragedModel(model, skip_nonfinite=True)  # n_averaged on the CPU, as torch keeps it
    swa.update_parameters(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    opt.update()
    swa.update_parameters(model)
    assert (int(opt.averager.n_averaged), int(opt.averager.n_skipped)) == (1, 1)
    assert (int(swa.n_averaged), int(swa.n_skipped)) == (1, 1)
    assert "n_skipped" in swa.state_dict()

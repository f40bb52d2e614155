"""The update rule against the float64 reference over real training runs: backend x method x dtype
x use_buffers x model."""

import copy

import pytest
import torch
from conftest import DTYPES, STEPS, cached_run
from reference import Reference, assert_matches_reference

import wavg_fused as wf


@pytest.mark.parametrize("use_buffers", [False, True], ids=["copy_buffers", "use_buffers"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_training_run_matches_float64_reference(kind, dtype, use_buffers, method, backend):
    initial, states = cached_run(kind)
    model = copy.deepcopy(initial).to(dtype)
    avg = wf.Averager(model, method, use_buffers=use_buffers, backend=backend)
    ref = Reference(method, use_buffers)
    for state in states:
        model.load_state_dict(state)  # casts the fp32 trajectory to the model's dtype
        avg.update(model)
        ref.update(model)
    assert int(avg.n_averaged) == STEPS
    assert_matches_reference(avg, ref)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_shadow_of_16bit_model(model_dtype, method, backend):
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial).to(model_dtype)
    avg = wf.Averager(model, method, dtype=torch.float32, use_buffers=True, backend=backend)
    assert avg.module.stem[0].weight.dtype == torch.float32
    assert avg.module.stem[1].num_batches_tracked.dtype == torch.long
    ref = Reference(method, use_buffers=True, shadow_dtype=torch.float32)
    for state in states:
        model.load_state_dict(state)
        avg.update(model)
        ref.update(model)
    assert_matches_reference(avg, ref)


def test_first_update_copies_exactly(method, backend):
    initial, states = cached_run("transformer")
    model = copy.deepcopy(initial)
    avg = wf.Averager(model, method, use_buffers=True, backend=backend)
    model.load_state_dict(states[-1])
    avg.update(model)
    for (name, ours), theirs in zip(avg.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert avg.n_averaged.dtype == torch.long and int(avg.n_averaged) == 1


@pytest.mark.parametrize("use_buffers", [False, True])
def test_integer_buffers_are_copied_never_averaged(use_buffers, method, backend):
    model = torch.nn.BatchNorm1d(3)
    avg = wf.Averager(model, method, use_buffers=use_buffers, backend=backend)
    for steps in (1, 2, 7):
        model.num_batches_tracked.fill_(steps * 1000 + 1)
        model.running_mean.fill_(float(steps))
        avg.update(model)
        assert avg.module.num_batches_tracked.dtype == torch.long
        assert int(avg.module.num_batches_tracked) == steps * 1000 + 1
    if not use_buffers:  # buffers follow the model
        assert torch.equal(avg.module.running_mean, model.running_mean)
    else:  # averaged like parameters: not the latest value after a first copy
        assert not torch.equal(avg.module.running_mean, model.running_mean)


def test_buffers_copied_when_not_averaged(backend):
    model = torch.nn.BatchNorm1d(4)
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    avg.update(model)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_var.fill_(9.0)
    avg.update(model)
    assert torch.allclose(avg.module.weight, torch.full((4,), 2.0))  # 1 + 0.5 * (3 - 1)
    assert torch.equal(avg.module.running_var, model.running_var)


def test_step_weights_follow_the_rule_table():
    n = torch.arange(6)
    assert wf.EMA(0.9).step_weight(n).tolist() == [1.0] + [1.0 - 0.9] * 5
    assert wf.SWA().step_weight(n).tolist() == [1 / (k + 1) for k in range(6)]
    tadema = wf.TADEMA(0.8).step_weight(n)
    assert tadema[0].item() == 1.0
    assert torch.allclose(tadema, 1 - 0.8 * torch.tanh(n.double()))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: wf.EMA(1.5), ValueError),
        (lambda: wf.EMA(-0.1), ValueError),
        (lambda: wf.EMA(float("nan")), ValueError),
        (lambda: wf.TADEMA(2.0), ValueError),
        (lambda: wf.EMA("0.9"), TypeError),
    ],
)
def test_bad_hyperparameters_are_rejected(make, error):
    with pytest.raises(error, match="decay|alpha"):
        make()

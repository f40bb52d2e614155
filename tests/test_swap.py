"""Swapping the average into the live model and back: exact restore, one launch, guards.
backend x dtype case x model."""

import copy
import pickle

import pytest
import torch
from conftest import cached_run

import wavg_fused as wf

# (model dtype, average dtype or None for the model's)
CASES = {
    "fp32": (torch.float32, None),
    "fp64": (torch.float64, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "bf16_in_fp32": (torch.bfloat16, torch.float32),
}


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise(module, expected, what):
    for name, value in module.state_dict().items():
        assert value.dtype == expected[name].dtype, name
        # view as integers: equal bits, including NaN payloads and the sign of zero
        ours, theirs = value.contiguous().view(-1), expected[name].contiguous().view(-1)
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), f"{what}: {name}"


def _averaged(kind, case, backend):
    model_dtype, average_dtype = CASES[case]
    initial, states = cached_run(kind)
    model = copy.deepcopy(initial).to(model_dtype)
    avg = wf.Averager(model, wf.EMA(0.8), dtype=average_dtype, use_buffers=True, backend=backend)
    for state in states[:6]:
        model.load_state_dict(state)
        avg.update(model)
    model.load_state_dict(states[-1])  # the live weights now differ from the average
    return model, avg


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("case", list(CASES))
def test_swapped_block_puts_the_average_in_and_restores_the_model_exactly(kind, case, backend):
    model, avg = _averaged(kind, case, backend)
    live, average = _state(model), _state(avg.module)
    expected_inside = {k: v.to(live[k].dtype) for k, v in average.items()}  # the average, cast to the model
    with avg.swapped(model) as inside:
        assert inside is model and avg.is_swapped
        _assert_bitwise(model, expected_inside, "inside the block")
    assert not avg.is_swapped
    _assert_bitwise(model, live, "after the block")
    _assert_bitwise(avg.module, average, "average after the block")


@pytest.mark.parametrize("case", ["fp32", "bf16_in_fp32"])
def test_model_is_restored_when_the_block_raises(case, backend):
    model, avg = _averaged("cnn", case, backend)
    live, average = _state(model), _state(avg.module)
    with pytest.raises(ZeroDivisionError):
        with avg.swapped(model):
            1 / 0
    _assert_bitwise(model, live, "after an exception")
    _assert_bitwise(avg.module, average, "average after an exception")
    avg.update(model)  # and the averager works on


@pytest.mark.parametrize("case", list(CASES))
def test_copy_to_equals_a_per_tensor_copy(case, backend):
    model, avg = _averaged("transformer", case, backend)
    expected = copy.deepcopy(model)
    for (name, target), source in zip(expected.state_dict().items(), avg.module.state_dict().values()):
        target.copy_(source)
    avg.copy_to(model)
    _assert_bitwise(model, _state(expected), "copy_to")


@pytest.mark.parametrize("case", ["fp32", "bf16_in_fp32"])
def test_swap_twice_is_the_identity(case, backend):
    model, avg = _averaged("cnn", case, backend)
    live, average = _state(model), _state(avg.module)
    avg.swap(model)
    avg.swap(model)
    _assert_bitwise(model, live, "model")
    _assert_bitwise(avg.module, average, "average")


def test_non_dense_model_tensor_is_written_through_its_staging_buffer(backend):
    model = torch.nn.Linear(6, 4)
    avg = wf.Averager(model, wf.SWA(), backend=backend)
    avg.update(model)
    with torch.no_grad():  # a transposed view: the plan stages it, a transfer must write it back
        model.weight = torch.nn.Parameter(torch.randn(6, 4).t())
    avg.update(model)
    live = model.weight.detach().clone()
    average = avg.module.weight.detach().clone()
    with avg.swapped(model):
        assert torch.equal(model.weight, average)
    assert torch.equal(model.weight, live)


def test_one_launch_per_swap_on_the_cpu_backend():
    if "cpu" not in wf.available_backends("cpu"):
        pytest.skip("the compiled cpu backend is not built")
    from torch.profiler import profile

    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(20)])
    avg = wf.Averager(model, wf.EMA(0.9), backend="cpu")
    avg.update(model)
    for action in (lambda: avg.swap(model), lambda: avg.swap(model), lambda: avg.copy_to(model)):
        with profile() as prof:
            action()
        # aten::item: the never-updated check reads the counter; no other op, no per-tensor work
        names = [e.name for e in prof.events() if e.cpu_parent is None and e.name != "aten::item"]
        assert names == ["wavg_fused::update_"], names


def test_never_updated_average_is_refused():
    model = torch.nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9))
    before = model.weight.detach().clone()
    for action in (avg.copy_to, avg.swap):
        with pytest.raises(RuntimeError, match="never updated"):
            action(model)
    with pytest.raises(RuntimeError, match="never updated"):
        with avg.swapped(model):
            pass
    assert torch.equal(model.weight, before) and not avg.is_swapped


def test_update_checkpoint_and_pickle_are_refused_while_swapped():
    model, avg = _averaged("cnn", "fp32", "torch")
    n = int(avg.n_averaged)
    with avg.swapped(model):
        with pytest.raises(RuntimeError, match="swapped into the model"):
            avg.update(model)
        with pytest.raises(RuntimeError, match="swapped into the model"):
            avg.state_dict()
        with pytest.raises(RuntimeError, match="swapped into the model"):
            pickle.dumps(avg)
        with pytest.raises(RuntimeError, match="swapped into the model"):
            avg.copy_to(model)
    assert int(avg.n_averaged) == n
    avg.state_dict()  # fine again


def test_swapping_back_needs_the_same_model():
    model, avg = _averaged("cnn", "fp32", "torch")
    other = copy.deepcopy(model)
    avg.swap(model)
    with pytest.raises(RuntimeError, match="another model"):
        avg.swap(other)
    avg.swap(model)
    assert not avg.is_swapped


def test_unfused_avg_fn_averager_swaps_too():
    model, _ = _averaged("cnn", "fp32", "torch")
    avg = wf.Averager(model, lambda a, m, n: a + (m - a) / (n + 1))
    avg.update(model)
    live = _state(model)
    with avg.swapped(model):
        pass
    _assert_bitwise(model, live, "after the block")

"""Swapping the average into the live model and back: exact restore, one launch, guards.
backend x dtype case x model."""

import copy
import pickle
import warnings

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


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_is_restored_when_the_block_raises(kind, case, backend):
    model, avg = _averaged(kind, case, backend)
    live, average = _state(model), _state(avg.module)
    with pytest.raises(ZeroDivisionError):
        with avg.swapped(model):
            1 / 0
    _assert_bitwise(model, live, "after an exception")
    _assert_bitwise(avg.module, average, "average after an exception")
    avg.update(model)  # and the averager works on


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("case", list(CASES))
def test_copy_to_equals_a_per_tensor_copy(kind, case, backend):
    model, avg = _averaged(kind, case, backend)
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


def _launches(action):
    from torch.profiler import profile

    with profile() as prof:
        action()
    # aten::item: the never-updated check reads the counter; nothing else may run per tensor
    return [e.name for e in prof.events() if e.cpu_parent is None and e.name != "aten::item"]


def test_launches_of_an_average_in_another_dtype_on_the_cpu_backend():
    if "cpu" not in wf.available_backends("cpu"):
        pytest.skip("the compiled cpu backend is not built")
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(20)]).to(torch.bfloat16)
    avg = wf.Averager(model, wf.EMA(0.9), dtype=torch.float32, backend="cpu")
    avg.update(model)
    # in: backup of the live weights, then the average cast into the model; out: the backup back
    assert _launches(lambda: avg.swap(model)).count("wavg_fused::update_") == 2
    assert _launches(lambda: avg.swap(model)) == ["wavg_fused::update_"]
    assert _launches(lambda: avg.copy_to(model)) == ["wavg_fused::update_"]


def test_special_values_are_restored_bit_for_bit(backend):
    # NaN payloads and signs, -0.0, infinities, subnormals: a restore through float conversions
    # would canonicalise them
    model = torch.nn.Linear(16, 4).to(torch.bfloat16)
    avg = wf.Averager(model, wf.EMA(0.5), dtype=torch.float32, backend=backend)
    avg.update(model)
    bits = torch.tensor([0x7FC1, 0xFFC1, 0x7F81, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x8001], dtype=torch.int32).to(torch.int16)
    with torch.no_grad():
        model.weight.view(torch.int16)[0, :8] = bits
        model.weight.view(torch.int16)[3, 8:] = bits
    live = _state(model)
    with avg.swapped(model):
        pass
    _assert_bitwise(model, live, "after the block")
    same = wf.Averager(model, wf.EMA(0.5), backend=backend)  # equal dtypes: the in-place exchange
    same.update(model)
    with torch.no_grad():
        model.weight.add_(1.0)
        model.weight.view(torch.int16)[0, :8] = bits
    live = _state(model)
    same.swap(model)
    same.swap(model)
    _assert_bitwise(model, live, "after swapping twice")


def test_swapped_refuses_to_nest_and_tolerates_a_swap_back_inside():
    model, avg = _averaged("cnn", "fp32", "torch")
    live = _state(model)
    avg.swap(model)
    with pytest.raises(RuntimeError, match="swapped into the model"):
        with avg.swapped(model):
            pass
    assert avg.is_swapped  # the refusal changed nothing
    avg.swap(model)
    with avg.swapped(model):
        avg.swap(model)  # out by hand: leaving the block must not put the average back in
    assert not avg.is_swapped
    _assert_bitwise(model, live, "after the block")


def test_model_wrappers_are_unwrapped():
    model, avg = _averaged("cnn", "fp32", "torch")
    live, average = _state(model), _state(avg.module)
    wrapped = torch.nn.DataParallel(model)
    with avg.swapped(wrapped):
        _assert_bitwise(model, average, "inside the block")
    _assert_bitwise(model, live, "after the block")
    avg.copy_to(wrapped)
    _assert_bitwise(model, average, "copy_to")


def test_an_average_tracking_the_model_before_averaging_starts_can_be_swapped_in():
    model = torch.nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9), update_after=5)
    with pytest.raises(RuntimeError, match="never updated"):
        avg.copy_to(model)
    avg.update(model)  # tracks: a copy of the model, n_averaged stays 0
    assert int(avg.n_averaged) == 0
    with avg.swapped(model):
        assert torch.equal(model.weight, avg.module.weight)


@pytest.mark.parametrize("case", ["fp32", "bf16_in_fp32"])
def test_backward_through_weights_swapped_out_from_under_it_raises(case, backend):
    # the kernels write the model behind autograd's back: the version counters must say so
    model, avg = _averaged("cnn", case, backend)
    model.eval()
    loss = model(torch.randn(2, 3, 8, 8, dtype=CASES[case][0])).square().sum()
    avg.swap(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    avg.swap(model)
    loss = model(torch.randn(2, 3, 8, 8, dtype=CASES[case][0])).square().sum()
    avg.copy_to(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("case", ["fp32", "bf16_in_fp32"])
@pytest.mark.parametrize("replace", ["convert", "new_parameter"])
def test_model_tensors_replaced_inside_the_block_are_restored_with_a_warning(case, replace, backend):
    model, avg = _averaged("cnn", case, backend)
    live, average = _state(model), _state(avg.module)
    old_weight = model.head.weight
    with pytest.warns(RuntimeWarning, match="replaced while the average was swapped in"):
        with avg.swapped(model):
            if replace == "convert":  # rebinds every param.data: the old memory must stay alive
                model.double()
            else:
                model.head.weight = torch.nn.Parameter(torch.zeros_like(model.head.weight))
    expected = {k: v.double() if replace == "convert" and v.is_floating_point() else v for k, v in live.items()}
    _assert_bitwise(model, expected, "after the block")
    _assert_bitwise(avg.module, average, "average after the block")
    if replace == "new_parameter":  # the optimizer's old Parameter gets its values back too
        assert torch.equal(old_weight, live["head.weight"])
    model.to(CASES[case][0])
    avg.update(model)  # the averager works on with the new tensors


def test_model_tensor_removed_inside_the_block_raises_and_keeps_the_average():
    model, avg = _averaged("cnn", "fp32", "torch")
    average = _state(avg.module)
    with pytest.raises(RuntimeError, match="could not be restored"):
        with avg.swapped(model):
            del model.stem[1]._buffers["running_mean"]
    assert not avg.is_swapped
    _assert_bitwise(avg.module, average, "average")


def test_moving_the_averager_while_swapped_is_refused():
    model, avg = _averaged("cnn", "fp32", "torch")
    live = _state(model)
    with avg.swapped(model):
        with pytest.raises(RuntimeError, match="cannot move or convert"):
            avg.double()
    _assert_bitwise(model, live, "after the block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        avg.double()  # fine again


@pytest.mark.parametrize("case", ["fp32", "bf16_in_fp32"])
def test_a_model_deleted_while_swapped_gives_the_average_back(case):
    import gc

    model, avg = _averaged("cnn", case, "torch")
    average = _state(avg.module)
    avg.swap(model)
    other = copy.deepcopy(model)
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="was deleted"):
        avg.swap(other)
    assert not avg.is_swapped
    _assert_bitwise(avg.module, average, "average")
    avg.update(other)

"""The plan: rebuilt when a model tensor changes, structure mismatches rejected atomically."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.plan import COLUMNS, ROLE_AVERAGE, ROLE_COPY, block_table


def _state(avg):
    return {k: v.clone() for k, v in avg.state_dict().items()}


def _assert_untouched(avg, before):
    for name, value in avg.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    "other, match",
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), r"'1.weight'.*shape \(3, 3\).*\(2, 3\)"),
        (nn.Sequential(nn.Linear(4, 3)), r"missing tensor '1.weight'"),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2)), r"extra tensor '2.weight'"),
        (nn.Sequential(OrderedDict(a=nn.Linear(4, 3), b=nn.Linear(3, 2))), r"#0: expected '0.weight', got 'a.weight'"),
    ],
    ids=["shape", "missing", "extra", "names"],
)
def test_structure_mismatch_names_the_tensor_and_changes_nothing(other, match, backend):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend)
    avg.update(model)
    before = _state(avg)
    with pytest.raises(ValueError, match=match):
        avg.update(other)
    _assert_untouched(avg, before)
    avg.update(model)  # still usable with the right model
    assert int(avg.n_averaged) == 2


def test_integer_into_float_is_rejected():
    model = nn.BatchNorm1d(2)
    avg = wf.Averager(model, wf.EMA(0.9))
    other = nn.BatchNorm1d(2)
    other.num_batches_tracked = torch.tensor(0.0)
    with pytest.raises(ValueError, match="num_batches_tracked.*dtype"):
        avg.update(other)


def test_replaced_model_tensor_rebuilds_the_plan(backend, method):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    avg = wf.Averager(model, method, backend=backend)
    avg.update(model)
    first_plan = avg._runs[0][0]
    model[0].weight = nn.Parameter(torch.full((3, 4), 5.0))  # new address
    model[1].bias.data = torch.full((2,), -1.0)  # .data swap keeps the Parameter object
    avg.update(model)
    assert avg._runs[0][0] is not first_plan
    w = method.step_weight(torch.tensor(1)).item()
    start = avg.module[0].weight.detach().clone()
    avg.update(model)
    assert avg._runs[0][0] is not first_plan
    w2 = method.step_weight(torch.tensor(2)).item()
    torch.testing.assert_close(avg.module[0].weight, start + w2 * (5.0 - start))
    assert w > 0


def test_same_model_reuses_the_plan():
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    plan = avg._runs[0][0]
    avg.update(model)
    assert avg._runs[0][0] is plan


def test_a_different_model_object_of_the_same_structure_works():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    avg = wf.Averager(a, wf.SWA())
    avg.update(a)
    avg.update(b)
    torch.testing.assert_close(avg.module.weight, (a.weight + b.weight) / 2)


def test_plan_tables():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    plan = avg._runs[0][0]
    table = plan.tensor_table()
    assert table.shape == (len(plan.names), len(COLUMNS)) and table.dtype == torch.int64
    col = {name: i for i, name in enumerate(COLUMNS)}
    roles = dict(zip(plan.names, table[:, col["role"]].tolist()))
    assert roles["0.weight"] == ROLE_AVERAGE and roles["1.running_mean"] == ROLE_COPY
    assert roles["1.num_batches_tracked"] == ROLE_COPY
    for row, shadow, model_tensor in zip(table.tolist(), plan.shadows, plan.models):
        flat = plan.flats[row[col["flat"]]]
        assert flat.data_ptr() + row[col["shadow_offset"]] * flat.element_size() == shadow.data_ptr()
        assert row[col["model_ptr"]] == model_tensor.data_ptr() and row[col["itemsize"]] == shadow.element_size()
        assert row[col["numel"]] == shadow.numel()
        assert row[col["flags"]] == 1  # both sides 16-byte aligned here
    assert plan.tensor_table() is table  # built once


def test_block_table_covers_every_element_once():
    numels = [0, 1, 7, 4096, 4097, 13, 0]
    table = block_table(numels, 1024)
    covered = [0] * len(numels)
    for index, start in table.tolist():
        assert start % 1024 == 0 and start < numels[index]
        covered[index] += min(1024, numels[index] - start)
    assert covered == numels


def test_block_table_arithmetic_above_2_31_elements():
    huge = 3 * 2**31 + 5
    table = block_table([5, huge], 2**30)
    assert table.dtype == torch.int64
    assert table[-1].tolist() == [1, 3 * 2**31]
    assert table.shape[0] == 1 + 7


def test_staging_for_tensors_kernels_cannot_read_in_place():
    model = nn.Module()
    model.a = nn.Parameter(torch.randn(6, 4)[:, ::2])  # not dense
    model.b = nn.Parameter(torch.randn(3, 5))
    avg = wf.Averager(model, wf.EMA(0.5))
    avg.update(model)
    plan = avg._runs[0][0]
    assert plan.staged_count == 1
    plan.stage()
    assert torch.equal(plan.readable_models[0], model.a.detach())
    assert plan.readable_models[1] is model.b


def test_misaligned_model_views_are_flagged_and_still_exact(backend):
    base = torch.randn(1 + 64 * 3)
    model = nn.Module()
    model.w = nn.Parameter(base[1:].view(64, 3))  # 4 bytes past an aligned address: no vector loads
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    avg.update(model)
    table = avg._runs[0][0].tensor_table()
    assert table[0, COLUMNS.index("flags")].item() == 0
    with torch.no_grad():
        model.w.add_(2.0)
    avg.update(model)
    torch.testing.assert_close(avg.module.w, model.w - 1.0)



@pytest.mark.parametrize("walk", ["compiled", "python"])
def test_a_replaced_submodule_is_averaged_from_then_on(backend, walk, monkeypatch):
    """``model.fc = nn.Linear(...)`` leaves the old module's tensors alive at their addresses: the
    watch must see the parent's entry change, or the update keeps averaging the old weights."""
    from wavg_fused import watch

    if walk == "python":
        monkeypatch.setattr(watch, "_first_moved", None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2)))
    avg = wf.Averager(model, wf.SWA(), backend=backend)
    avg.update(model)
    expected = model[1][0].weight.detach().clone()
    model[1][0] = nn.Linear(4, 2)  # a grandchild, replaced in its parent
    avg.update(model)
    expected = expected + (model[1][0].weight.detach() - expected) / 2
    torch.testing.assert_close(avg.module[1][0].weight, expected)
    model[1] = nn.Sequential(nn.Linear(4, 2))  # a whole branch
    avg.update(model)
    expected = expected + (model[1][0].weight.detach() - expected) / 3
    torch.testing.assert_close(avg.module[1][0].weight, expected)

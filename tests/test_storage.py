"""Contiguous shadow storage: views, layouts, alignment, ties, byte accounting."""

import weakref
from copy import deepcopy

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.storage import SLOT_ALIGN_BYTES, compact_parameters, pack_module


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.empty = nn.Parameter(torch.randn(0, 3))
        self.one = nn.Parameter(torch.randn(1))
        self.prime = nn.Parameter(torch.randn(7, 13))
        self.transposed = nn.Parameter(torch.randn(5, 9).t())  # dense, non-contiguous
        self.conv = nn.Conv2d(3, 6, 3).to(memory_format=torch.channels_last)
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("mask", torch.rand(11) > 0.5)
        base = torch.randn(6, 10)
        self.register_buffer("strided", base[:, ::2])  # not dense: the shadow becomes contiguous


def _views(avg):
    return list(avg.module.parameters()) + list(avg.module.buffers())


def test_every_shadow_is_an_aligned_view_of_a_flat_buffer():
    avg = wf.Averager(Odd(), wf.EMA(0.9))
    flats = avg.storage.flats
    for tensor in _views(avg):
        flat = flats[(tensor.device, tensor.dtype)]
        assert tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert (tensor.data_ptr() - flat.data_ptr()) % SLOT_ALIGN_BYTES == 0


def test_layouts_are_kept():
    model = Odd()
    avg = wf.Averager(model, wf.EMA(0.9))
    assert avg.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not avg.module.conv.weight.is_contiguous()
    assert avg.module.transposed.stride() == model.transposed.stride()
    assert avg.module.strided.is_contiguous()
    for (name, ours), theirs in zip(avg.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_storage_bytes_are_tensor_bytes_plus_padding_only():
    model = Odd()
    avg = wf.Averager(model, wf.EMA(0.9))
    tensor_bytes = sum(t.numel() * t.element_size() for t in _views(avg))
    assert avg.storage.tensor_bytes == tensor_bytes
    groups = len(avg.storage.flats)
    assert tensor_bytes <= avg.storage.nbytes < tensor_bytes + SLOT_ALIGN_BYTES * (len(_views(avg)) + groups)


def test_fp32_shadow_groups_by_dtype():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    avg = wf.Averager(model, wf.SWA(), dtype=torch.float32)
    assert {dtype for _, dtype in avg.storage.flats} == {torch.float32, torch.long}


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.shared = nn.BatchNorm1d(4)
        self.again = self.shared  # the same module twice: its buffers are tied too


def test_tied_tensors_share_one_slot_and_stay_tied(backend):
    model = Tied()
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    assert avg.module.out.weight is avg.module.embed.weight
    assert avg.storage.tensor_bytes == sum(t.numel() * t.element_size() for t in _views(avg))
    avg.update(model)
    with torch.no_grad():
        model.embed.weight.add_(2.0)
    avg.update(model)
    assert avg.module.out.weight is avg.module.embed.weight
    torch.testing.assert_close(avg.module.out.weight, model.embed.weight - 1.0)


def test_zero_and_one_element_tensors_update(backend, method):
    model = Odd()
    avg = wf.Averager(model, method, backend=backend)
    for _ in range(3):
        with torch.no_grad():
            model.one.add_(1.0)
        avg.update(model)
    assert avg.module.empty.shape == (0, 3)
    assert avg.module.one.item() != 0.0


def test_non_contiguous_model_tensors_average_elementwise(backend):
    model = Odd()
    avg = wf.Averager(model, wf.EMA(0.75), use_buffers=True, backend=backend)
    avg.update(model)
    before = {k: v.clone() for k, v in avg.module.state_dict().items()}
    with torch.no_grad():
        model.transposed.mul_(3.0)
        model.strided.add_(4.0)
        model.conv.weight.sub_(1.0)
    avg.update(model)
    for name in ("transposed", "strided", "conv.weight"):
        expected = before[name] + 0.25 * (model.state_dict()[name] - before[name])
        torch.testing.assert_close(avg.module.state_dict()[name], expected, msg=name)


def test_module_to_repacks_into_new_storage():
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.5))
    avg.update(model)
    avg.to(torch.float64)
    assert avg.module.weight.dtype == torch.float64
    assert all(avg.storage.owns(t) for t in _views(avg))
    assert {dtype for _, dtype in avg.storage.flats} == {torch.float64}
    avg.update(model)  # fp64 average of an fp32 model
    assert int(avg.n_averaged) == 2


def test_shadow_replaced_behind_our_back_is_repacked(backend):
    model = nn.Linear(4, 4)
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    avg.update(model)
    avg.module.load_state_dict({k: torch.zeros_like(v) for k, v in avg.module.state_dict().items()}, assign=True)
    assert not avg.storage.owns(avg.module.weight)
    avg.update(model)
    assert avg.storage.owns(avg.module.weight)
    torch.testing.assert_close(avg.module.weight, model.weight * 0.5)


@pytest.mark.parametrize("device_arg", ["cpu", torch.device("cpu"), None])
def test_device_argument_places_shadow_and_counter(device_arg):
    avg = wf.Averager(nn.Linear(2, 2), wf.EMA(0.9), device=device_arg)
    assert avg.n_averaged.device.type == "cpu" and avg.n_averaged.dtype == torch.long
    assert all(t.device.type == "cpu" for t in _views(avg))


def test_invalid_constructor_arguments():
    with pytest.raises(TypeError, match="model"):
        wf.Averager("not a module", wf.EMA(0.9))
    with pytest.raises(TypeError, match="method"):
        wf.Averager(nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="dtype"):
        wf.Averager(nn.Linear(2, 2), wf.EMA(0.9), dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        wf.Averager(nn.Linear(2, 2), wf.EMA(0.9), backend="fastest")


def test_compacted_parameters_keep_identity_values_flags_and_ties():
    lin = nn.Linear(4, 3)
    lin.bias.requires_grad_(False)
    tied = nn.Module()
    tied.a, tied.b, tied.c = lin, nn.Linear(4, 3), nn.Linear(4, 3)
    tied.c.weight = tied.a.weight
    params = list(tied.parameters())  # the tied weight once
    before = [(p, p._cdata, p.detach().clone(), p.requires_grad) for p in params]
    compact_parameters(params)
    for p, cdata, value, requires_grad in before:
        assert p._cdata != cdata  # a new C++ tensor under the same Python object
        assert torch.equal(p, value) and p.requires_grad == requires_grad and type(p) is nn.Parameter
    assert tied.c.weight is tied.a.weight


def test_compaction_leaves_parameters_it_could_not_move_intact():
    kept = {name: nn.Parameter(torch.ones(2)) for name in ("attribute", "gradient", "weakref")}
    kept["attribute"].no_decay = True
    kept["gradient"].grad = torch.zeros(2)
    ref = weakref.ref(kept["weakref"])
    aliased = nn.Parameter(torch.ones(2))
    alias = aliased.detach()  # shares the memory, not the C++ tensor: compacted, still aliased
    cdata = {name: p._cdata for name, p in kept.items()}
    compact_parameters([*kept.values(), aliased])
    for name, p in kept.items():
        assert p._cdata == cdata[name], name
    assert kept["attribute"].no_decay and torch.equal(kept["gradient"].grad, torch.zeros(2)) and ref() is kept["weakref"]
    alias.add_(1)
    assert torch.equal(aliased, torch.full((2,), 2.0))


def test_the_average_module_parameters_are_compacted():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    copy = deepcopy(model)
    cdata = [p._cdata for p in copy.parameters()]
    pack_module(copy)
    assert all(p._cdata != c for p, c in zip(copy.parameters(), cdata))

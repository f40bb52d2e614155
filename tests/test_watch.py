"""The address watch (``wavg_fused.watch``), compiled and in Python: every change that makes a plan
stale is seen, nothing else is, and the compiled walk names the first stale slot, whichever of its
paths (the parallel one over plain tensors in unmutated dicts, or the one that needs Python) sees it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wavg_fused import watch as watch_module
from wavg_fused.slots import TensorSlots
from wavg_fused.watch import AddressWatch

MANY = 1500  # above csrc/address_watch.cpp's kSlotsPerThread: the parallel walk splits the slots


def many_tensors(count: int = MANY) -> nn.Module:
    model = nn.Module()
    model.params = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(count)])
    model.register_buffer("steps", torch.zeros(2))
    return model


def watch_of(model: nn.Module) -> AddressWatch:
    slots = TensorSlots.of(model)
    return AddressWatch(slots.slots + slots.aliases, slots.modules)


@pytest.fixture(params=["compiled", "python"])
def walk(request, monkeypatch):
    if request.param == "compiled":
        if watch_module._first_moved is None:
            pytest.skip("the compiled extension is not built")
    else:
        monkeypatch.setattr(watch_module, "_first_moved", None)
    return request.param


CHANGES = {
    "a parameter replaced": lambda m: setattr(m.params, "7", nn.Parameter(torch.randn(3))),
    "the last parameter's data re-bound": lambda m: setattr(m.params[MANY - 1], "data", torch.randn(3)),
    "a transposed view of the same memory": lambda m: setattr(m.params[5], "data", m.params[5].data.view(3, 1)),
    "a dtype view of the same memory": lambda m: setattr(m.steps, "data", m.steps.data.view(torch.int32)),
    "requires_grad turned off": lambda m: m.params[1200].requires_grad_(False),
    "storage resized in place": lambda m: m.params[3].data.untyped_storage().resize_(64),
    "swap_tensors": lambda m: torch.utils.swap_tensors(m.params[11], nn.Parameter(torch.randn(3))),
    "a buffer replaced": lambda m: setattr(m, "steps", torch.zeros(2)),
    "a submodule replaced": lambda m: setattr(m, "params", nn.ParameterList(list(m.params))),
    "a parameter removed": lambda m: m.params._parameters.pop("42"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_is_seen(walk, change):
    model = many_tensors()
    watch = watch_of(model)
    assert not watch.moved()
    with torch.no_grad():
        CHANGES[change](model)
    assert watch.moved()


FLAG_CHANGES = {
    # the compiled walk reads a plain AutogradMeta's two fields directly while the tensor holds it
    "requires_grad turned back on": lambda m: m.params[1300].requires_grad_(True),
    "a grad_fn from an in-place op": lambda m: m.params[1300].mul_(torch.ones(3, requires_grad=True)),
    "a buffer (no autograd meta) made to require grad": lambda m: m.steps.requires_grad_(True),
}


@pytest.mark.parametrize("change", list(FLAG_CHANGES))
def test_every_requires_grad_change_is_seen(walk, change):
    model = many_tensors()
    model.params[1300].requires_grad_(False)  # frozen before recording: its meta says so
    watch = watch_of(model)
    assert not watch.moved()
    with torch.enable_grad():
        FLAG_CHANGES[change](model)
    assert watch.moved()


def test_an_entry_set_again_or_an_equal_view_is_not_a_change(walk):
    """A dict written with the same object, or a new Parameter over the very same memory and view,
    keeps the plan valid (the kernels read the same bytes): no re-plan every step for code that
    re-registers its parameters, as some wrappers do."""
    model = many_tensors()
    watch = watch_of(model)
    model.params._parameters["3"] = model.params._parameters["3"]
    model.params._parameters["4"] = nn.Parameter(model.params[4].data)
    model.extra = nn.Linear(1, 1)  # a new entry in a watched dict, no watched slot touched
    assert not watch.moved()


def test_the_compiled_walk_names_the_first_stale_slot():
    """Slots in a mutated dict are checked by the walk that needs Python, the others in parallel:
    the index returned is the first stale one whichever finds it."""
    if watch_module._first_moved is None:
        pytest.skip("the compiled extension is not built")
    model = many_tensors()
    slots = TensorSlots.of(model)
    tables, keys = [t for t, _ in slots.slots], [k for _, k in slots.slots]
    record = watch_module._record(tables, keys)
    assert watch_module._first_moved(record) == -1
    with torch.no_grad():
        model.params[1400].data = torch.randn(3)  # parallel walk, late
        assert watch_module._first_moved(record) == 1400
        model.params[1100].data = torch.randn(3)  # parallel walk, another thread's range
        assert watch_module._first_moved(record) == 1100
    model.params._parameters["600"] = nn.Parameter(torch.randn(3))  # mutates the dict: Python walk
    assert watch_module._first_moved(record) == 600
    with torch.no_grad():
        model.params[20].data = torch.randn(3)
    assert watch_module._first_moved(record) == 20


def test_the_record_keeps_what_it_watches_alive():
    """A removed parameter's memory could be reused at once by a new one: the record holds the old
    objects, so a new tensor can never take the recorded address."""
    if watch_module._first_moved is None:
        pytest.skip("the compiled extension is not built")
    model = many_tensors(4)
    watch = watch_of(model)
    old = model.params[0]
    del model.params._parameters["0"]
    model.params._parameters["0"] = nn.Parameter(torch.randn(3))
    assert watch.moved()
    assert old.data_ptr() != model.params[0].data_ptr()


def test_record_refuses_a_slot_that_is_not_in_a_dict():
    if watch_module._first_moved is None:
        pytest.skip("the compiled extension is not built")
    with pytest.raises(RuntimeError, match="slot 0 is not in a dict"):
        watch_module._record([[torch.zeros(1)]], [0])


def test_an_average_flag_is_not_watched_but_its_memory_is(walk):
    """``flagless_slots`` (the engine's own shadows) are watched by address and view only: the plans
    follow the model's ``requires_grad`` onto the average, never the average's own flag."""
    model, shadow = many_tensors(8), many_tensors(8)
    slots, shadow_slots = TensorSlots.of(model), TensorSlots.of(shadow)
    watch = AddressWatch(slots.slots, slots.modules, flagless_slots=shadow_slots.slots)
    shadow.params[2].requires_grad_(False)
    assert not watch.moved()
    model.params[2].requires_grad_(False)
    assert watch.moved()
    watch = AddressWatch(slots.slots, slots.modules, flagless_slots=shadow_slots.slots)
    with torch.no_grad():
        shadow.params[3].data = torch.randn(3)
    assert watch.moved()

"""``avg.update(model)`` inside ``torch.compile(fullgraph=True)``: the custom op and its fake
implementation trace; the compiled step gives the eager result, compiles once, and refuses what
a graph cannot do (rebuild a plan, host-side schedules) with an error saying what to do."""

import copy

import pytest
import torch
from conftest import CPU_BACKENDS
from torch import nn
from torch._dynamo.testing import CompileCounter

import wavg_fused as wf

# Triton on the CPU runs under its interpreter, which Inductor does not wrap; the GPU run covers it.
COMPILED_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step(net: nn.Module, averager: wf.Averager, grads: list[torch.Tensor]) -> None:
    """A training step: foreach SGD, then the average's update."""
    with torch.no_grad():
        torch._foreach_add_(list(net.parameters()), grads, alpha=-0.1)
    averager.update(net)


def _assert_same(a: wf.Averager, b: wf.Averager) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("guard", [False, True], ids=["plain", "skip_nonfinite"])
def test_compiled_update_equals_eager(backend, method, guard):
    model = _model()
    kwargs = dict(backend=backend, use_buffers=True, skip_nonfinite=guard)
    compiled_avg, eager_avg = wf.Averager(model, method, **kwargs), wf.Averager(model, method, **kwargs)
    compiled_avg.update(model)  # eager: builds the plans
    eager_avg.update(model)
    update = torch.compile(lambda: compiled_avg.update(model), fullgraph=True)
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model[1].running_mean.add_(0.5)
            if guard and step == 3:
                model[0].weight[0, 0] = float("nan")
            if guard and step == 4:
                model[0].weight[0, 0] = 0.25
        update()
        eager_avg.update(model)
    _assert_same(compiled_avg, eager_avg)
    assert int(compiled_avg.n_averaged) == (6 if guard else 7)
    assert int(compiled_avg.n_skipped) == (1 if guard else 0)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_training_step_compiles_fullgraph_once(backend):
    """A step that applies the gradients (foreach SGD) and updates the average: one graph, no
    recompile across steps (the call count lives in a device tensor inside graphs)."""
    model = _model()
    twin = copy.deepcopy(model)
    avg, reference = wf.Averager(model, wf.EMA(0.9), backend=backend), wf.Averager(twin, wf.EMA(0.9), backend=backend)
    avg.update(model)
    reference.update(twin)

    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(5):
        x = torch.randn(16, 8)
        for net in (model, twin):
            net.zero_grad()
            net(x).square().mean().backward()
        compiled(model, avg, [p.grad for p in model.parameters()])
        step(twin, reference, [p.grad for p in twin.parameters()])
    assert counter.frame_count == 1
    _assert_same(avg, reference)
    # the calls made in graphs count where a checkpoint (and the schedule) reads them
    restored = wf.Averager(model, wf.EMA(0.9), backend=backend)
    restored.load_state_dict(avg.state_dict())
    assert restored._calls == 6


def test_inductor_training_step_matches_eager_within_rounding():
    model = _model()
    twin = copy.deepcopy(model)
    avg, reference = wf.Averager(model, wf.SWA()), wf.Averager(twin, wf.SWA())
    avg.update(model)
    reference.update(twin)

    def step(net, averager, grads):
        with torch.no_grad():
            torch._foreach_add_(list(net.parameters()), grads, alpha=-0.1)
        averager.update(net)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in model.parameters()]
        compiled(model, avg, grads)
        step(twin, reference, [g.clone() for g in grads])
    # Inductor may fuse the SGD step differently (an ulp); the averaging itself is the same op
    for (name, x), y in zip(avg.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_from_the_first_call_equals_eager_and_compiles_once(backend, method):
    """No eager update first: the plans are built at construction."""
    model = _model()
    twin = copy.deepcopy(model)
    avg = wf.Averager(model, method, backend=backend, use_buffers=True)
    reference = wf.Averager(twin, method, backend=backend, use_buffers=True)

    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in model.parameters()]
        compiled(model, avg, grads)
        step(twin, reference, [g.clone() for g in grads])
    assert counter.frame_count == 1
    assert int(avg.n_averaged) == 4
    _assert_same(avg, reference)


def test_compiled_update_of_another_model_object_says_what_to_do():
    model = _model()
    avg = wf.Averager(model, wf.EMA(0.9))
    other = copy.deepcopy(model)
    with pytest.raises(Exception, match="call avg.update\\(model\\) once outside the compiled function"):
        torch.compile(lambda: avg.update(other), fullgraph=True)()


def test_a_replaced_model_tensor_is_caught_at_run_time():
    model = _model()
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    update = torch.compile(lambda: avg.update(model), fullgraph=True)
    update()
    before = {k: v.clone() for k, v in avg.state_dict().items()}
    model[0].weight = nn.Parameter(torch.zeros_like(model[0].weight))  # same shape: Dynamo's guards pass
    with pytest.raises(RuntimeError, match="was replaced or moved since the plan was built"):
        update()
    assert all(torch.equal(v, before[k]) for k, v in avg.state_dict().items())
    avg.update(model)  # an eager update rebuilds the plan; the compiled one works again
    update()
    assert int(avg.n_averaged) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"update_every": 2}, "update_after, update_every and write_back_every are decided on the host"),
    ({"write_back_every": 1}, "update_after, update_every and write_back_every are decided on the host"),
])
def test_host_side_schedules_are_refused_in_a_graph(kwargs, message):
    model = _model()
    avg = wf.Averager(model, wf.EMA(0.9), **kwargs)
    avg.update(model)
    avg.update(model)
    with pytest.raises(Exception, match=message):
        torch.compile(lambda: avg.update(model), fullgraph=True)()


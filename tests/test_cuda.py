"""The CUDA paths (skipped without a GPU): every CUDA backend against the torch backend, one
kernel launch per update, CUDA graph capture and replay, CPU averages of CUDA models."""

import copy

import pytest
import torch
from conftest import DTYPES, cached_run
from torch import nn

import wavg_fused as wf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_BACKENDS = wf.available_backends("cuda") if torch.cuda.is_available() else []
FUSED = [name for name in CUDA_BACKENDS if name != "torch"]


def _cuda_run(kind, dtype, method, backend, *, shadow_dtype=None, steps=20, **kwargs):
    initial, states = cached_run(kind)
    model = copy.deepcopy(initial).to("cuda", dtype)
    avg = wf.Averager(model, method, backend=backend, dtype=shadow_dtype, **kwargs)
    for state in states[:steps]:
        model.load_state_dict(state)
        avg.update(model)
    return avg


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("use_buffers", [False, True])
def test_fused_cuda_equals_torch_backend(backend, dtype, use_buffers, method):
    fused = _cuda_run("cnn", dtype, method, backend, use_buffers=use_buffers)
    plain = _cuda_run("cnn", dtype, method, "torch", use_buffers=use_buffers)
    assert int(fused.n_averaged) == int(plain.n_averaged)
    for (name, a), b in zip(fused.module.state_dict().items(), plain.module.state_dict().values()):
        ulp = torch.finfo(a.dtype).eps if a.is_floating_point() else 0
        scale = b.double().abs().max().item() if b.numel() else 0
        torch.testing.assert_close(a.double(), b.double(), rtol=2 * ulp, atol=2 * ulp * scale, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_fp32_shadow_of_bf16_model_and_stochastic_rounding(backend, method):
    for kwargs in ({"shadow_dtype": torch.float32}, {"shadow_dtype": torch.bfloat16, "stochastic_rounding": True}):
        fused = _cuda_run("transformer", torch.bfloat16, method, backend, use_buffers=True, **kwargs)
        plain = _cuda_run("transformer", torch.bfloat16, method, "torch", use_buffers=True, **kwargs)
        for (name, a), b in zip(fused.module.state_dict().items(), plain.module.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(a.dtype).eps, atol=0, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_one_kernel_launch_per_update(backend):
    model = nn.ModuleList([nn.Linear(64, 64) for _ in range(300)]).cuda()
    avg = wf.Averager(model, wf.EMA(0.99), backend=backend)
    avg.update(model)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        avg.update(model)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


def _capture_update(graphed: wf.Averager, eager: wf.Averager, model: nn.Module) -> torch.cuda.CUDAGraph:
    """One update of ``graphed`` on a side stream (the warm-up capture requires), the same update
    eagerly for ``eager``, then ``graphed``'s update captured (recorded, not run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed.update(model)
    torch.cuda.current_stream().wait_stream(stream)
    eager.update(model)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.update(model)
    return graph


@pytest.mark.parametrize("backend", FUSED)
def test_graph_replay_equals_eager_updates(backend, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.BatchNorm1d(65), nn.Linear(65, 3)).cuda()
    eager = wf.Averager(model, method, backend=backend)
    graphed = wf.Averager(model, method, backend=backend)
    eager.update(model)
    graphed.update(model)  # plans built outside the capture
    graph = _capture_update(graphed, eager, model)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        graph.replay()
        eager.update(model)
    torch.cuda.synchronize()
    assert int(graphed.n_averaged) == int(eager.n_averaged) == 7  # capture records, does not run
    for (name, a), b in zip(graphed.module.state_dict().items(), eager.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_cpu_average_of_cuda_model_uses_staging(method):
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).cuda()
    avg = wf.Averager(model, method, device="cpu")
    assert avg.n_averaged.device.type == "cpu"
    for _ in range(3):
        avg.update(model)
    torch.testing.assert_close(avg.module[0].weight, model[0].weight.cpu())


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_graph_replay_with_the_nonfinite_guard(backend, method):
    """A captured guarded update decides on the device at every replay: a NaN replay is skipped
    (n_skipped bumped), the finite ones average, exactly as eager updates do."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.BatchNorm1d(65), nn.Linear(65, 3)).cuda()
    eager = wf.Averager(model, method, backend=backend, skip_nonfinite=True)
    graphed = wf.Averager(model, method, backend=backend, skip_nonfinite=True)
    for avg in (eager, graphed):
        avg.update(model)
    graph = _capture_update(graphed, eager, model)
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
            model[0].weight[0, 0] = float("nan") if step in (2, 3) else 0.5
        graph.replay()
        eager.update(model)
    torch.cuda.synchronize()
    assert (int(graphed.n_averaged), int(graphed.n_skipped)) == (int(eager.n_averaged), int(eager.n_skipped)) == (6, 2)
    for (name, a), b in zip(graphed.module.state_dict().items(), eager.module.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_update_on_a_side_stream(backend):
    """The contract: update() enqueues on the current stream. A training step on a side stream is
    averaged correctly when the update runs on that stream, or on another that waits for it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)).cuda()
    on_side, waiting = wf.Averager(model, wf.EMA(0.5), backend=backend), wf.Averager(model, wf.EMA(0.5), backend=backend)
    reference: dict[str, torch.Tensor] = {}
    side = torch.cuda.Stream()
    for step in range(4):
        # the side stream's step must wait for the default stream's update of the last iteration
        # (`waiting` reads the weights there), or it could change them under that read
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(2_000_000)  # a long step: an unordered update would read stale weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            on_side.update(model)
        torch.cuda.current_stream().wait_stream(side)
        waiting.update(model)
        for name, p in model.named_parameters():  # w_0 = 1 (a copy), then EMA(0.5)
            value = p.detach()
            reference[name] = value.clone() if step == 0 else reference[name] + 0.5 * (value - reference[name])
    torch.cuda.synchronize()
    for name, value in reference.items():
        torch.testing.assert_close(dict(on_side.module.named_parameters())[name], value, msg=name)
        torch.testing.assert_close(dict(waiting.module.named_parameters())[name], value, msg=name)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_compiled_update_on_cuda(backend, method):
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)).cuda()
    compiled_avg = wf.Averager(model, method, backend=backend, use_buffers=True)
    eager_avg = wf.Averager(model, method, backend=backend, use_buffers=True)
    compiled_avg.update(model)
    eager_avg.update(model)
    update = torch.compile(lambda: compiled_avg.update(model), fullgraph=True)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update()
        eager_avg.update(model)
    for (name, a), b in zip(compiled_avg.state_dict().items(), eager_avg.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", [wf.EMAWarmup(0.999, power=0.75), wf.PowerEMA(gamma=6.94)], ids=["warmup", "power"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_schedules_on_cuda_equal_torch_backend(backend, method, dtype):
    fused = _cuda_run("cnn", dtype, method, backend, use_buffers=True)
    plain = _cuda_run("cnn", dtype, method, "torch", use_buffers=True)
    for (name, a), b in zip(fused.module.state_dict().items(), plain.module.state_dict().values()):
        ulp = torch.finfo(a.dtype).eps if a.is_floating_point() else 0
        torch.testing.assert_close(a.double(), b.double(), rtol=2 * ulp, atol=2 * ulp, msg=name)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shadow_dtype", [None, torch.float32], ids=["exchange", "backup"])
def test_copy_to_swap_and_swapped_on_cuda(backend, shadow_dtype):
    """swapped() puts the average in and gives the model back bit for bit; copy_to keeps it in;
    swap twice is the identity. bf16 model: an fp32 average goes in through a backup."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 70), nn.BatchNorm1d(70), nn.Linear(70, 5)).cuda().bfloat16()
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend, dtype=shadow_dtype, use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v.to(own[k].dtype) for k, v in avg.module.state_dict().items()}
    with avg.swapped(model):
        for name, value in model.state_dict().items():
            assert torch.equal(value, average[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, own[name]), name
    if shadow_dtype is None:
        avg.swap(model)
        avg.swap(model)
        for name, value in model.state_dict().items():
            assert torch.equal(value, own[name]), name
    avg.copy_to(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, average[name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_model_on_the_second_gpu_while_the_first_is_current(backend):
    """Kernels must run on the plan's device, not the current one (Triton launches on the current)."""
    torch.cuda.set_device(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.BatchNorm1d(30)).to("cuda:1")
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        avg.update(model)
        for name, p in model.named_parameters():
            reference[name] = p.detach().clone() if int(avg.n_averaged) == 1 else reference[name] + 0.5 * (p.detach() - reference[name])
    for name, p in avg.module.named_parameters():
        assert p.device == torch.device("cuda:1")
        torch.testing.assert_close(p, reference[name], msg=name)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_pinned_host_model_is_read_before_the_next_step(backend):
    """A model in pinned host memory averaged on the GPU: update() has read the weights when it
    returns, so an optimizer step right after cannot leak into this update."""
    weights = [torch.randn(1 << 20).pin_memory() for _ in range(4)]
    model = nn.ParameterList([nn.Parameter(w) for w in weights])
    avg = wf.Averager(model, wf.EMA(0.5), device="cuda", backend=backend)
    for step in range(3):
        before = [p.detach().clone() for p in model]
        avg.update(model)
        with torch.no_grad():
            for p in model:
                p.add_(1000.0)  # the "optimizer step" right after update() returned
        if step == 0:
            expected = [b.cuda() for b in before]
        else:
            expected = [e + 0.5 * (b.cuda() - e) for e, b in zip(expected, before)]
    torch.cuda.synchronize()
    for got, want in zip(avg.module, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", FUSED)
def test_plan_memory_is_marked_for_the_side_stream(backend, monkeypatch):
    """Updates on a side stream record that stream on every tensor of the plan, so memory
    freed with the plan is not reused while the stream's launch is queued."""
    recorded = []
    real = torch.Tensor.record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: (recorded.append((t.data_ptr(), s.stream_id)), real(t, s)))
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)).cuda()
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend, skip_nonfinite=True)
    avg.update(model)  # plan built and used on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        avg.update(model)
        avg.update(model)
    torch.cuda.current_stream().wait_stream(side)
    plan = avg._runs[0][0]
    on_side = {ptr for ptr, stream in recorded if stream == side.stream_id}
    missing = [t.shape for t in plan.device_memory() if t.is_cuda and t.data_ptr() not in on_side]
    assert not missing, missing

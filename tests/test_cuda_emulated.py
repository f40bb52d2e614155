"""The ``cuda-emulated`` test backend: the CUDA kernels' per-block code (csrc/cuda/update_blocks.h)
run on CPU tensors over the ``cuda`` backend's tables. The whole CPU-parametrised suite runs it
(``CPU_BACKENDS``); these tests check what is particular to it: it is never chosen by ``auto``, it
is one op call per update, and its block paths (vector and tail, every dtype pair, stochastic
rounding, the last-block bookkeeping) give the ``cpu`` kernel's bits."""

import pytest
import torch
from conftest import CPU_BACKENDS, cpu_kernel_fma
from torch import nn

import wavg_fused as wf
from wavg_fused import ops
from wavg_fused.backends import registry
from wavg_fused.plan import COLUMNS, block_table

pytestmark = pytest.mark.skipif("cuda-emulated" not in CPU_BACKENDS, reason="the compiled extension is not built")

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BLOCK = 4096  # csrc/cuda/update_blocks.h kBlockElems


def test_auto_never_picks_it_but_a_name_or_the_environment_does(monkeypatch):
    assert "cuda-emulated" not in registry.PREFERENCE["cpu"]
    assert "cuda-emulated" not in wf.available_backends("cpu")
    assert wf.available_backends("cpu", include_test_tools=True)[-1] == "cuda-emulated"
    assert registry.select_backend("auto", "cpu").name != "cuda-emulated"
    assert registry.select_backend("cuda-emulated", "cpu").name == "cuda-emulated"
    monkeypatch.setenv(registry.ENV_VAR, "cuda-emulated")
    model = nn.Linear(2, 2)
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    assert [backend.name for _, backend in avg._runs] == ["cuda-emulated"]
    with pytest.raises(RuntimeError, match="cuda-emulated.*runs on cpu tensors"):
        registry.select_backend("cuda-emulated", "cuda")
    assert "  cuda-emulated cpu: available (test tool)" in wf.backend_report()


def _top_level_ops(action):
    from torch.profiler import profile

    with profile() as prof:
        action()
    return [e.name for e in prof.events() if e.cpu_parent is None and e.name != "aten::item"]


def test_one_emulated_call_per_update_and_per_transfer():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)], nn.BatchNorm1d(8))
    avg = wf.Averager(model, wf.EMA(0.9), backend="cuda-emulated", skip_nonfinite=True)
    avg.update(model)
    # the guard's check pass, then the update: the two launches of the cuda backend
    assert _top_level_ops(lambda: avg.update(model)) == ["wavg_fused::update_emulated_"] * 2
    plain = wf.Averager(model, wf.EMA(0.9), backend="cuda-emulated")
    plain.update(model)
    assert _top_level_ops(lambda: plain.update(model)) == ["wavg_fused::update_emulated_"]
    assert _top_level_ops(lambda: plain.copy_to(model)) == ["wavg_fused::update_emulated_"]


def _model(dtypes=FLOATS):
    """Per float dtype: three blocks' worth (two full vector blocks, then vector plus tail), a
    tail-only tensor, and a misaligned view (no vector path); plus copied buffers."""
    torch.manual_seed(0)
    model = nn.Module()
    for i, dtype in enumerate(dtypes):
        model.register_parameter(f"big{i}", nn.Parameter(torch.randn(2 * BLOCK + 37, dtype=dtype)))
        model.register_parameter(f"small{i}", nn.Parameter(torch.randn(5, dtype=dtype)))
        base = torch.randn(BLOCK + 100, dtype=dtype)
        model.register_parameter(f"odd{i}", nn.Parameter(base[1:]))  # one element past an aligned address
        model.register_buffer(f"copied{i}", torch.randn(300, dtype=dtype))
    model.register_buffer("count", torch.arange(77, dtype=torch.int64))
    model.register_buffer("mask", torch.arange(33) % 3 == 0)
    return model


def _walk(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.mul_(1.5)
            elif b.dtype == torch.int64:
                b.add_(1)


def _assert_same_bits(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if name == "_extra_state":
            continue
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), name


@pytest.mark.skipif(not cpu_kernel_fma(), reason="the cpu kernel does not fuse multiply-adds here")
@pytest.mark.parametrize("dtype", [None, *FLOATS], ids=["same", "fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("method", [wf.EMA(0.9), wf.EMA(0.1), wf.SWA(), wf.TADEMA(0.9), wf.PowerEMA(7.0)],
                         ids=["ema", "ema_above_half", "swa", "tadema", "power"])
@pytest.mark.parametrize("use_buffers", [False, True], ids=["copy_buffers", "average_buffers"])
def test_every_dtype_pair_and_path_equals_the_cpu_kernel_bit_for_bit(dtype, method, use_buffers):
    """Every (model, shadow) float dtype pair, averaged and copied, through the vector, tail and
    misaligned paths, several blocks per tensor; the stochastic variant on bf16 shadows."""
    model = _model()
    for stochastic in (False, True):
        kw = dict(dtype=dtype, use_buffers=use_buffers, stochastic_rounding=stochastic, rounding_seed=2**33 + 5)
        ours, theirs = (wf.Averager(model, method, backend=b, **kw) for b in ("cuda-emulated", "cpu"))
        for _ in range(3):
            _walk(model)
            ours.update(model)
            theirs.update(model)
        _assert_same_bits(ours.module, theirs.module)
        assert int(ours.n_averaged) == 3


def _table(rows):
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(COLUMNS))


@pytest.mark.skipif(not cpu_kernel_fma(), reason="the cpu kernel does not fuse multiply-adds here")
@pytest.mark.parametrize("model_dtype", FLOATS, ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("offset", [0, 1, 3, 8], ids=lambda o: f"offset{o}")
def test_stochastic_rounding_groups_at_any_storage_offset(model_dtype, offset):
    """Stochastic rounding draws one Philox block per 4 storage elements; a shadow starting inside
    a group (hand-made tables: the Averager aligns its shadows) and ending inside one still gets
    the cpu kernel's bits, in the vector path (aligned flag) and the tail path."""
    numel = BLOCK + 4 * 3 + 1
    model = torch.randn(numel + 8, dtype=model_dtype)[:numel]
    for aligned in (0, 1) if offset % 8 == 0 else (0,):
        flats = {}
        for name in ("emulated", "cpu"):
            flat = torch.zeros(numel + 16, dtype=torch.bfloat16)
            flat[offset:offset + numel] = torch.randn(numel, generator=torch.Generator().manual_seed(1))
            flats[name] = flat
        row = [model.data_ptr(), 0, offset, numel, {torch.float32: 0, torch.float64: 1, torch.float16: 2,
                                                     torch.bfloat16: 3}[model_dtype], 3, 1, aligned, 2]
        table = _table([row])
        blocks = block_table([numel], BLOCK)
        for name, op in (("emulated", ops.update_emulated_), ("cpu", ops.update_)):
            n = torch.tensor(7)
            op([flats[name]], table, blocks, n, torch.zeros(2, dtype=torch.int32), wf.EMA(0.99).code, [0.99], True, 12345)
            assert int(n) == 8
        assert torch.equal(flats["emulated"].view(torch.int16), flats["cpu"].view(torch.int16)), aligned


def test_last_block_bookkeeping_over_many_parallel_blocks():
    """Hundreds of blocks finish in any order on the CPU threads: n_averaged is bumped once, a
    guarded skip bumps n_skipped once and clears the flag, and the finished-block count is back at
    zero after each launch (as the CUDA graph replays need)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(300 * BLOCK + 1))
    avg = wf.Averager(model, wf.SWA(), backend="cuda-emulated", skip_nonfinite=True)
    for step in range(1, 4):
        avg.update(model)
        plan = avg._runs[0][0]
        assert int(avg.n_averaged) == step and plan.workspace.tolist() == [0, 0]
    with torch.no_grad():
        model.w[123 * BLOCK + 7] = float("nan")
    before = avg.module.w.detach().clone()
    avg.update(model)
    assert (int(avg.n_averaged), int(avg.n_skipped)) == (3, 1)
    assert plan.workspace.tolist() == [0, 0] and torch.equal(avg.module.w, before)


def test_bad_tables_are_refused_not_dereferenced():
    flat = torch.zeros(16)
    model = torch.zeros(16)
    row = [model.data_ptr(), 0, 8, 16, 0, 0, 1, 1, 4]  # 8 + 16 elements in a 16-element buffer
    with pytest.raises(RuntimeError, match="outside its storage buffer"):
        ops.update_emulated_([flat], _table([row]), block_table([16], BLOCK), torch.tensor(0),
                             torch.zeros(2, dtype=torch.int32), 0, [0.9], True)
    row[2] = 0
    with pytest.raises(RuntimeError, match="block 0 names no element"):
        ops.update_emulated_([flat], _table([row]), torch.tensor([[1, 0]]), torch.tensor(0),
                             torch.zeros(2, dtype=torch.int32), 0, [0.9], True)
    with pytest.raises(RuntimeError, match="table must be a contiguous CPU int64 tensor"):
        ops.update_emulated_([flat], _table([row]).int(), block_table([16], BLOCK), torch.tensor(0),
                             torch.zeros(2, dtype=torch.int32), 0, [0.9], True)

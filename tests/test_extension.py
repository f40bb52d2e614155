"""The compiled op: schema, fake implementation and registration (torch.library.opcheck)."""

import os

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.backends import registry

built = "cpu" in wf.available_backends("cpu")
needs_ext = pytest.mark.skipif(not built, reason="the compiled extension is not built")


def test_extension_was_built_where_ci_expects_it():
    if not os.environ.get("WAVG_FUSED_EXPECT_EXT"):
        pytest.skip("WAVG_FUSED_EXPECT_EXT is not set")
    assert built, registry.backend_report()
    if torch.version.cuda is not None:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("wavg_fused::update_", "CUDA"), registry.backend_report()


def _op_args(method=wf.EMA(0.9), dtype=torch.float32, model_dtype=None):
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)).to(model_dtype or dtype)
    avg = wf.Averager(model, method, dtype=dtype, backend="cpu")
    avg.update(model)
    plan, backend = avg._runs[0]
    args = (
        plan.flats,
        plan.tensor_table(),
        plan.block_table(backend.block_elems),
        avg.n_averaged,
        plan.workspace,
        method.code,
        list(method.params),
        True,
        -1,
    )
    return avg, args


@needs_ext
@pytest.mark.parametrize("dtype, model_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_opcheck(dtype, model_dtype):
    _, args = _op_args(dtype=dtype, model_dtype=model_dtype)
    torch.library.opcheck(torch.ops.wavg_fused.update_.default, args)


@needs_ext
def test_table_pointing_outside_the_storage_is_refused():
    _, args = _op_args()
    table = args[1].clone()
    table[0, 3] = 10**9  # numel
    with pytest.raises(RuntimeError, match="tensor 0 lies outside its storage buffer"):
        torch.ops.wavg_fused.update_.default(args[0], table, *args[2:])


_ISA_CHECK = """
import torch, wavg_fused as wf
from torch import nn
torch.manual_seed(0)
model = nn.ModuleList([nn.Linear(37, 61), nn.BatchNorm1d(61), nn.Linear(61, 3)])
for dtype, model_dtype, seed in [(torch.float32, torch.float32, -1), (torch.float64, torch.float64, -1),
                                 (torch.bfloat16, torch.bfloat16, -1), (torch.float16, torch.float16, -1),
                                 (torch.float32, torch.bfloat16, -1), (torch.bfloat16, torch.float32, 5)]:
    m = model.to(model_dtype)
    kw = dict(dtype=dtype, use_buffers=True, stochastic_rounding=seed >= 0, rounding_seed=max(seed, 0))
    fused, plain = wf.Averager(m, wf.TADEMA(0.9), backend="cpu", **kw), wf.Averager(m, wf.TADEMA(0.9), backend="torch", **kw)
    for _ in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        fused.update(m); plain.update(m)
    for (name, a), b in zip(fused.module.state_dict().items(), plain.module.state_dict().values()):
        # within rounding: the default build has no FMA, torch's lerp does (a few ulps of the scale)
        ulp = torch.finfo(a.dtype).eps if a.is_floating_point() else 0
        scale = b.double().abs().max().item() if b.numel() else 0
        assert torch.allclose(a.double(), b.double(), rtol=2 * ulp, atol=2 * ulp * scale), (dtype, model_dtype, name)
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_instruction_set_matches_the_torch_backend(isa):
    import subprocess
    import sys

    if isa != "default":
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if f" {isa if isa == 'avx2' else 'avx512bw'} " not in flags:
            pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, WAVG_FUSED_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@needs_ext
@pytest.mark.parametrize("action", [1, 2], ids=["copy_to_model", "swap"])
@pytest.mark.parametrize("dtype, model_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_opcheck_transfers(action, dtype, model_dtype):
    # actions 1 and 2 write the model at the table's addresses, which are not arguments (see the
    # schema's comment); `flats` are declared mutable for both. Swap needs equal dtypes.
    if action == 2 and model_dtype is not None:
        pytest.skip("swap exchanges equal dtypes only")
    avg, args = _op_args(dtype=dtype, model_dtype=model_dtype)
    spare = avg._runs[0][0].spare_count  # transfers neither read nor bump the counter
    args = (*args[:3], spare, args[4], 0, [], False, -1, action)
    torch.library.opcheck(torch.ops.wavg_fused.update_.default, args)


@needs_ext
def test_swap_and_bump_are_refused_together():
    _, args = _op_args()
    with pytest.raises(RuntimeError, match="only mode 0"):
        torch.ops.wavg_fused.update_.default(*args[:7], True, -1, 2)
    with pytest.raises(RuntimeError, match="unknown mode"):
        torch.ops.wavg_fused.update_.default(*args[:7], False, -1, 7)
    _, mixed = _op_args(dtype=torch.float32, model_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="swap needs equal model and shadow dtypes"):
        torch.ops.wavg_fused.update_.default(*mixed[:7], False, -1, 2)


@needs_ext
@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan"])
def test_opcheck_nonfinite_check_and_guarded_update(poisoned):
    avg, args = _op_args()
    plan = avg._runs[0][0]
    if poisoned:
        with torch.no_grad():
            plan.models[0][0, 0] = float("nan")
    check = (*args[:3], plan.spare_count, args[4], 0, [], False, -1, 3)
    torch.library.opcheck(torch.ops.wavg_fused.update_.default, check)  # runs on copies of the workspace
    torch.ops.wavg_fused.update_.default(*check)
    assert plan.workspace.tolist() == [0, int(poisoned)]
    guarded = (*args[:9], 0, True, torch.zeros((), dtype=torch.long))
    torch.library.opcheck(torch.ops.wavg_fused.update_.default, guarded)

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
        plan.readable_models,
        plan.tensor_table(),
        plan.block_table(backend.block_elems),
        avg.n_averaged,
        plan.workspace,
        method.code,
        *method.params,
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
def test_model_of_another_shape_is_refused():
    avg, args = _op_args()
    models = list(args[1])
    models[0] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"models\[0\] does not match the plan \(3 elements"):
        torch.ops.wavg_fused.update_.default(args[0], models, *args[2:])

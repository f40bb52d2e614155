"""Property test: random lists of tensors, every backend, against the float64 reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Reference, assert_matches_reference
from torch import nn

import wavg_fused as wf
from conftest import CPU_BACKENDS

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
tensor_specs = st.tuples(shapes, st.sampled_from(FLOATS + [torch.int64]), st.booleans(), st.booleans())
methods = st.one_of(
    st.floats(0.0, 1.0).map(wf.EMA),
    st.just(wf.SWA()),
    st.floats(0.0, 1.0).map(wf.TADEMA),
)


class Bag(nn.Module):
    def __init__(self, specs):
        super().__init__()
        for i, (shape, dtype, is_param, transpose) in enumerate(specs):
            tensor = torch.randn(shape, dtype=torch.float64).to(dtype) if dtype.is_floating_point else torch.randint(-9, 9, shape)
            if transpose and tensor.dim() >= 2:
                tensor = tensor.transpose(0, 1)
            if is_param and dtype.is_floating_point:
                self.register_parameter(f"p{i}", nn.Parameter(tensor))
            else:
                self.register_buffer(f"b{i}", tensor)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(tensor_specs, min_size=0, max_size=8),
    method=methods,
    use_buffers=st.booleans(),
    backend=st.sampled_from(CPU_BACKENDS),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_random_tensor_lists_match_reference(specs, method, use_buffers, backend, steps, seed):
    torch.manual_seed(seed)
    model = Bag(specs)
    avg = wf.Averager(model, method, use_buffers=use_buffers, backend=backend)
    ref = Reference(method, use_buffers)
    for _ in range(steps):
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, dtype=torch.float64).to(t.dtype))
                else:
                    t.add_(1)
        avg.update(model)
        ref.update(model)
    assert_matches_reference(avg, ref)

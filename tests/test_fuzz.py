"""Fuzzing (hardening item 3): random models through every CPU backend, against the float64 reference.

``test_fuzz_*`` draw whole scenarios with hypothesis (derandomized, no example database, so CI
runs the same examples every time) and run them through ``Averager``:

* models: 0-8 tensors spread over a 3-level module tree (``root``, ``root.a``, ``root.a.b``,
  ``root.c``); parameters, persistent and non-persistent buffers; integer parameters
  (``requires_grad=False``);
* shapes: 0-d to 4-d with sizes 0-7 (so 0-size tensors are common), 1-d up to 300 elements
  (vector loops plus tails), and for the compiled backends now and then 1-d tensors above the
  CPU kernel's 32K-element grain (the parallel split crossing tensor boundaries);
* dtypes: fp32, fp64, fp16, bf16 (weighted up) and int64, int32, int16, int8, uint8, bool,
  complex64 (copied, never averaged; complex64 goes through the byte-wise "other dtype" copy);
* layouts: contiguous, fully transposed, any permutation of the dims, sliced (every other
  element, from offset 1: non-contiguous and misaligned), expanded (stride-0 broadcast dims),
  channels_last (4-d), and views at any element offset into one storage that other tensors of the
  model view too (contiguous but misaligned, possibly overlapping);
* ties: the same Parameter or buffer object registered again under another module/name;
* values: N(0, 1) * 2**e, e in {0, -4, 4, -20} (2**-20 is subnormal in fp16);
* methods: EMA, SWA, TADEMA, EMAWarmup, PowerEMA with boundary values (decay 0, 0.5, 1) and
  arbitrary floats; ``use_buffers`` True/False; averaged ``dtype`` None (most often), fp32 (an
  fp32 average of the 16-bit tensors), fp64, bf16 or fp16;
* 1-5 updates; before each one every tensor's values change in place (through the tensor it is
  a view of), and up to two tensors are re-bound to fresh memory (``param.data = ...``, or a
  buffer replaced in every module that holds it) with a new layout and, for floats, possibly a new
  dtype, so the plan is rebuilt mid-run.

Checked after every scenario: ``n_averaged``; shadow dtypes and channels_last layout; each
update leaves the model bit for bit as it was; copied (non-averaged, integer, bool, complex)
tensors equal the model exactly; averaged tensors are within ``error_bound`` (below) of the
float64 reference; and the ``cpu`` and ``torch`` backends agree (``assert_backends_agree``).

The error bound, per element, derived for the rule ``s <- s + w (m - s)`` as the kernels
evaluate it (torch.lerp's two branches, in opmath = fp32 for 16-bit storage, fp64 for fp64, then
rounded once to the storage dtype). With u(t) = eps(t) / 2 the unit roundoff and M the largest
``|value|`` this element of the model has held so far (the average is a convex combination of
model values, so it is bounded by M too), one update adds at most
    |w - fl(w)| |m - s| + rounding of (m - s), of w (m - s), of the sum  <=  7 u_op M
    + converting m to opmath (an fp64 model with an fp32 average)          <=    u_op M
    + rounding the result to the storage dtype                             <=    u_st M + subnormal spacing
and an earlier error is carried with the factor |1 - w| <= 1, so after k inexact updates
    |ours - exact| <= k * ((8 u_op + u_st) M + spacing_st) + k * 8 u_64 M   (the reference's own error)
Per update that is, relative to M: fp32 storage 9 u32 = 5.4e-7; fp64 17 u64 = 1.9e-15; fp16
storage 8 u32 + u16 = 4.9e-4; bf16 storage 8 u32 + u_bf16 = 3.9e-3. A copy (w = 1, the first
update, non-averaged tensors) is exact when the storage dtype holds the model's values exactly,
and counts as one inexact update otherwise.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import platform
from dataclasses import dataclass

import pytest
import torch
from conftest import CPU_BACKENDS, EXACT_BACKENDS, cpu_kernel_fma
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_weight
from torch import nn

import wavg_fused as wf

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OTHERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64)
INT_RANGES = {
    torch.int64: (-(10**6), 10**6),
    torch.int32: (-(10**6), 10**6),
    torch.int16: (-1000, 1000),
    torch.int8: (-128, 128),
    torch.uint8: (0, 256),
}
SCALES = (0, -4, 4, -20)
MODULES = 4  # root, root.a, root.a.b, root.c
SHARED_ELEMS = 4096  # each dtype's shared storage: offsets up to 64 plus a tensor of up to 7**4 elements
NON_TRITON = [b for b in CPU_BACKENDS if b != "triton"]
FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Layout:
    kind: str  # contiguous, transposed, permuted, sliced, expanded, channels_last, shared
    perm: tuple[int, ...] = ()  # permuted: the dims in memory order, outermost first
    mask: tuple[bool, ...] = ()  # expanded: which dims are broadcast (stride 0)
    offset: int = 0  # shared: element offset into the dtype's shared storage


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: Layout
    kind: str  # param, buffer, nonpersistent
    owner: int  # index into the module tree
    scale: int  # values ~ N(0, 1) * 2**scale


@dataclass(frozen=True)
class Rebind:
    index: int  # which spec
    layout: Layout
    dtype: torch.dtype  # the same as before, or another float for a float tensor


@dataclass(frozen=True)
class Scenario:
    specs: tuple[Spec, ...]
    ties: tuple[tuple[int, int], ...]  # (spec, module): register that tensor again there
    steps: tuple[tuple[Rebind, ...], ...]  # one entry per update: the re-bindings before it
    method: wf.Method
    use_buffers: bool
    dtype: torch.dtype | None
    seed: int


def layouts(ndim: int) -> st.SearchStrategy[Layout]:
    options = [
        st.just(Layout("contiguous")),
        st.just(Layout("sliced")),
        st.integers(0, 64).map(lambda offset: Layout("shared", offset=offset)),
    ]
    if ndim >= 1:
        masks = st.lists(st.booleans(), min_size=ndim, max_size=ndim)
        options.append(masks.map(lambda m: Layout("expanded", mask=tuple(m))))
    if ndim >= 2:
        options.append(st.just(Layout("transposed")))
        options.append(st.permutations(range(ndim)).map(lambda p: Layout("permuted", perm=tuple(p))))
    if ndim == 4:
        options.append(st.just(Layout("channels_last")))
    return st.one_of(options)


sizes = st.sampled_from([1, 2, 3, 0, 5, 7])
shapes = st.one_of(
    st.lists(sizes, max_size=4).map(tuple),
    st.integers(0, 300).map(lambda n: (n,)),
    st.tuples(sizes, sizes, sizes, sizes),  # 4-d: channels_last and permutations
)
BIG_SHAPES = ((40_000,), (70_001,))  # above the CPU kernel's 32K-element grain: 2 threads split the range


unit = st.one_of(st.sampled_from([0.9, 0.0, 0.5, 1.0, 0.999]), st.floats(0.0, 1.0))


@st.composite
def methods(draw) -> wf.Method:
    kind = draw(st.sampled_from(["ema", "swa", "tadema", "warmup", "power"]))
    if kind == "ema":
        return wf.EMA(draw(unit))
    if kind == "swa":
        return wf.SWA()
    if kind == "tadema":
        return wf.TADEMA(draw(unit))
    if kind == "warmup":
        decay = draw(unit)
        return wf.EMAWarmup(decay, draw(st.floats(0.1, 10.0)), draw(st.floats(0.1, 2.0)), min(draw(unit), decay))
    return wf.PowerEMA(gamma=draw(st.floats(0.0, 50.0)))


@st.composite
def scenarios(draw, max_tensors: int = 8, max_steps: int = 5, big: bool = False) -> Scenario:
    specs = []
    # with ``big``, about one scenario in five makes one of its tensors big
    big_index = draw(st.integers(0, 4 * max_tensors)) if big else -1
    for i in range(draw(st.integers(0, max_tensors))):
        shape = draw(st.sampled_from(BIG_SHAPES)) if i == big_index else draw(shapes)
        dtype = draw(st.sampled_from(FLOATS * 3 + OTHERS))
        layout = draw(layouts(len(shape)))
        if layout.kind == "shared" and math.prod(shape) > SHARED_ELEMS - 64:
            layout = Layout("contiguous")
        specs.append(
            Spec(
                shape,
                dtype,
                layout,
                draw(st.sampled_from(["param", "buffer", "nonpersistent"])),
                draw(st.integers(0, MODULES - 1)),
                draw(st.sampled_from(SCALES)),
            )
        )
    ties = ()
    if specs:
        ties = tuple(draw(st.lists(st.tuples(st.integers(0, len(specs) - 1), st.integers(0, MODULES - 1)), max_size=2)))
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        rebinds = []
        if specs:
            for index in draw(st.lists(st.integers(0, len(specs) - 1), max_size=2)):
                spec = specs[index]
                layout = draw(layouts(len(spec.shape)))
                if layout.kind == "shared" and math.prod(spec.shape) > SHARED_ELEMS - 64:
                    layout = Layout("contiguous")
                dtype = draw(st.sampled_from(FLOATS)) if spec.dtype.is_floating_point else spec.dtype
                rebinds.append(Rebind(index, layout, dtype))
        steps.append(tuple(rebinds))
    return Scenario(
        tuple(specs),
        ties,
        tuple(steps),
        draw(methods()),
        draw(st.booleans()),
        draw(st.sampled_from([None, torch.float32, None, torch.float64, torch.bfloat16, torch.float16])),
        draw(st.integers(0, 2**31 - 1)),
    )


# ----------------------------------------------------------------------------------- building models
class World:
    """A scenario's model, the tensors its parameters and buffers are views of (``bases``: what
    changes in place between updates), and where each tensor is registered."""

    def __init__(self, scenario: Scenario) -> None:
        self.gen = torch.Generator().manual_seed(scenario.seed)
        self.root = nn.Module()
        self.root.a = nn.Module()
        self.root.a.b = nn.Module()
        self.root.c = nn.Module()
        self.modules = [self.root, self.root.a, self.root.a.b, self.root.c]
        self.bases: list[tuple[torch.Tensor, int]] = []  # (tensor, scale exponent)
        self.shared: dict[torch.dtype, torch.Tensor] = {}
        self.objects: list[torch.Tensor] = []  # the registered tensor (Parameter or buffer) per spec
        self.slots: list[list[tuple[nn.Module, str]]] = []  # every (module, name) holding it
        self.specs = scenario.specs
        for i, spec in enumerate(scenario.specs):
            tensor = self.make(spec.shape, spec.dtype, spec.layout, spec.scale)
            module, name = self.modules[spec.owner], f"t{i}"
            if spec.kind == "param":
                tensor = nn.Parameter(tensor, requires_grad=spec.dtype.is_floating_point or spec.dtype.is_complex)
                module.register_parameter(name, tensor)
            else:
                module.register_buffer(name, tensor, persistent=spec.kind == "buffer")
            self.objects.append(tensor)
            self.slots.append([(module, name)])
        for j, (index, owner) in enumerate(scenario.ties):
            module, name, tensor = self.modules[owner], f"tie{j}", self.objects[index]
            if self.specs[index].kind == "param":
                module.register_parameter(name, tensor)
            else:
                module.register_buffer(name, tensor, persistent=self.specs[index].kind == "buffer")
            self.slots[index].append((module, name))

    def values(self, shape, dtype: torch.dtype, scale: int) -> torch.Tensor:
        g = self.gen
        if dtype.is_floating_point:
            return (torch.randn(shape, dtype=torch.float64, generator=g) * 2.0**scale).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        if dtype.is_complex:
            return torch.randn(shape, dtype=dtype, generator=g)
        low, high = INT_RANGES[dtype]
        return torch.randint(low, high, shape, generator=g, dtype=dtype)

    def make(self, shape: tuple[int, ...], dtype: torch.dtype, layout: Layout, scale: int) -> torch.Tensor:
        """A tensor of ``shape`` laid out as ``layout`` says, registered with what mutates it."""
        ndim = len(shape)
        if layout.kind == "shared":
            if dtype not in self.shared:
                self.shared[dtype] = self.values((SHARED_ELEMS,), dtype, 0)
                self.bases.append((self.shared[dtype], 0))
            strides = [1] * ndim
            for d in range(ndim - 2, -1, -1):
                strides[d] = strides[d + 1] * max(shape[d + 1], 1)
            return self.shared[dtype].as_strided(shape, strides, layout.offset)
        if layout.kind == "transposed" and ndim >= 2:
            base = self.values(shape[::-1], dtype, scale)
            tensor = base.permute(*range(ndim - 1, -1, -1))
        elif layout.kind == "permuted" and ndim >= 2:
            perm = layout.perm
            base = self.values(tuple(shape[p] for p in perm), dtype, scale)
            inverse = [perm.index(d) for d in range(ndim)]
            tensor = base.permute(*inverse)
        elif layout.kind == "sliced":
            base = self.values(tuple(2 * s + 1 for s in shape), dtype, scale)
            tensor = base[tuple(slice(1, None, 2) for _ in shape)]
        elif layout.kind == "expanded" and ndim >= 1:
            base = self.values(tuple(1 if m else s for s, m in zip(shape, layout.mask)), dtype, scale)
            tensor = base.expand(shape)
        elif layout.kind == "channels_last" and ndim == 4:
            base = self.values(shape, dtype, scale).contiguous(memory_format=torch.channels_last)
            tensor = base
        else:
            base = tensor = self.values(shape, dtype, scale)
        assert tensor.shape == shape, (layout, tensor.shape, shape)
        self.bases.append((base, scale))
        return tensor

    def mutate(self) -> None:
        """New values everywhere, in place (a random-walk step for floats)."""
        with torch.no_grad():
            for base, scale in self.bases:
                if base.dtype.is_floating_point:
                    step = torch.randn(base.shape, dtype=torch.float64, generator=self.gen) * 2.0 ** (scale - 1)
                    base.copy_((base.double() + step).to(base.dtype))
                else:
                    base.copy_(self.values(base.shape, base.dtype, scale))

    def rebind(self, rebind: Rebind) -> None:
        """Give one tensor fresh memory (its address changes): ``param.data = ...`` keeps the
        Parameter (and so its ties); a buffer is replaced in every module that holds it."""
        spec = self.specs[rebind.index]
        tensor = self.make(spec.shape, rebind.dtype, rebind.layout, spec.scale)
        if spec.kind == "param":
            self.objects[rebind.index].data = tensor
            return
        for module, name in self.slots[rebind.index]:
            module._buffers[name] = tensor
        self.objects[rebind.index] = tensor


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


# ------------------------------------------------------------------------------------- the reference
def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def holds_exactly(model_dtype: torch.dtype, storage_dtype: torch.dtype) -> bool:
    """Whether every ``model_dtype`` value is a ``storage_dtype`` value."""
    if model_dtype == storage_dtype:
        return True
    wider = {torch.float32: {torch.float16, torch.bfloat16}, torch.float64: {torch.float16, torch.bfloat16, torch.float32}}
    return model_dtype in wider.get(storage_dtype, set())


class FuzzReference:
    """The float64 average per tensor name, with what ``error_bound`` needs: the largest |value|
    each element has held (M) and how many inexact updates went into it since it was exact (k)."""

    def __init__(self, model: nn.Module, method: wf.Method, use_buffers: bool, dtype: torch.dtype | None) -> None:
        self.method, self.use_buffers, self.n = method, use_buffers, 0
        self.params = {name for name, _ in model.named_parameters()}
        self.storage = {
            name: (dtype if dtype is not None and t.is_floating_point() else t.dtype) for name, t in named_tensors(model)
        }
        self.channels_last = {name for name, t in named_tensors(model) if channels_last(t)}
        self.exact: dict[str, torch.Tensor] = {}
        self.largest: dict[str, torch.Tensor] = {}
        self.inexact: dict[str, int] = {}

    def update(self, model: nn.Module) -> None:
        w = reference_weight(self.method, self.n)
        for name, tensor in named_tensors(model):
            value = tensor.detach().clone()
            if not value.is_floating_point():
                self.exact[name] = value
                continue
            value64 = value.double()
            previous = self.largest.get(name)
            self.largest[name] = value64.abs() if previous is None else torch.maximum(previous, value64.abs())
            averaged = name in self.params or self.use_buffers
            if not averaged or self.n == 0:  # a copy (w_0 = 1 copies too)
                self.exact[name] = value64
                self.inexact[name] = 0 if holds_exactly(value.dtype, self.storage[name]) else 1
            else:
                self.exact[name] = self.exact[name] + w * (value64 - self.exact[name])
                self.inexact[name] += 1
        self.n += 1

    def error_bound(self, name: str) -> torch.Tensor | None:
        """Per element (see the module docstring); None: must be exact."""
        k = self.inexact[name]
        if k == 0:
            return None
        storage = self.storage[name]
        u_op, u_st, u_64 = unit_roundoff(opmath(storage)), unit_roundoff(storage), unit_roundoff(torch.float64)
        spacing = torch.finfo(storage).smallest_normal * torch.finfo(storage).eps
        return k * ((8 * u_op + u_st + 8 * u_64) * self.largest[name] + spacing)


def assert_matches(avg: wf.Averager, ref: FuzzReference, label: str) -> None:
    assert int(avg.n_averaged) == ref.n, f"{label}: n_averaged {int(avg.n_averaged)}, expected {ref.n}"
    shadows = dict(named_tensors(avg.module))
    assert set(shadows) == set(ref.exact), f"{label}: names {sorted(shadows)} vs {sorted(ref.exact)}"
    for name, exact in ref.exact.items():
        ours = shadows[name].detach()
        assert ours.dtype == ref.storage[name], f"{label}: {name} is {ours.dtype}, expected {ref.storage[name]}"
        assert ours.shape == exact.shape, f"{label}: {name} has shape {tuple(ours.shape)}, expected {tuple(exact.shape)}"
        if name in ref.channels_last:
            assert channels_last(ours), f"{label}: {name} lost channels_last (strides {ours.stride()})"
        bound = ref.error_bound(name) if ours.is_floating_point() else None
        if bound is None:
            expected = exact.to(ours.dtype) if ours.is_floating_point() else exact
            if not torch.equal(ours, expected):
                raise AssertionError(
                    f"{label}: {name} ({ours.dtype}) should equal the model's value exactly: {ours} vs {expected}"
                )
            continue
        error = (ours.double() - exact).abs()
        excess = error - bound
        if excess.numel() and excess.max().item() > 0:
            where = excess.flatten().argmax().item()
            raise AssertionError(
                f"{label}: {name} ({ours.dtype}, {ref.inexact[name]} inexact updates) element {where}: ours "
                f"{ours.flatten()[where].item()!r}, float64 reference {exact.flatten()[where].item()!r}, error "
                f"{error.flatten()[where].item():.3e} > bound {bound.flatten()[where].item():.3e}"
            )


def bitwise_promised(method: wf.Method) -> bool:
    """README: for EMA and SWA the ``cpu`` and ``torch`` backends both equal torch's
    ``_foreach_lerp_`` bit for bit (fp32, bf16, fp16): same weight (1 - decay, 1 / (n + 1) in
    float64, rounded once to opmath) and the same lerp. The other methods compute w_n with other
    libm calls on each side (torch.tanh / pow against C's tanh and exp(y log x)): the weights may
    differ in the last float64 bit, so their results agree within rounding only."""
    return same_fma_as_torch() and isinstance(method, (wf.SWA, wf.EMA))


@functools.lru_cache(maxsize=1)
def same_fma_as_torch() -> bool:
    """Whether the ``cpu`` kernel and torch's CPU lerp both use fused multiply-adds (the AVX2 and
    AVX-512 builds, torch's AVX2/AVX512 capabilities) or both do not (the plain x86-64 build,
    torch's DEFAULT): only then is bit-for-bit agreement possible. They differ when
    ``WAVG_FUSED_CPU_ISA=default`` or ``ATEN_CPU_CAPABILITY=default`` forces only one side."""
    torch_fma = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    if platform.machine().lower() not in ("x86_64", "amd64") and not os.environ.get("WAVG_FUSED_CPU_ISA"):
        return True  # one build elsewhere: the README's promise as stated
    return cpu_kernel_fma() == torch_fma


def assert_backends_agree(first: wf.Averager, second: wf.Averager, ref: FuzzReference, exact: bool) -> None:
    """Bit for bit where promised. Otherwise the two differ only in how they round (a weight
    differing in its last float64 bit, a fused multiply-add or not), so each update can add at
    most both sides' final roundings (2 u_st M) and their opmath roundings (6 u_op M), carried
    with the factor |1 - w| <= 1: k inexact updates, k ((2 u_st + 6 u_op) M + subnormal spacing)."""
    a, b = dict(named_tensors(first.module)), dict(named_tensors(second.module))
    for name in a:
        x, y = a[name].detach(), b[name].detach()
        if torch.equal(x, y):
            continue
        assert x.is_floating_point() and not exact, (
            f"{first.backend} and {second.backend} differ on {name} ({x.dtype}); promised bit for bit: "
            f"{int((x != y).sum())} elements, max |diff| {(x.double() - y.double()).abs().max().item():.3e}"
        )
        storage = ref.storage[name]
        per_update = 2 * unit_roundoff(storage) + 6 * unit_roundoff(opmath(storage))
        spacing = torch.finfo(storage).smallest_normal * torch.finfo(storage).eps
        bound = ref.inexact[name] * (per_update * ref.largest[name] + spacing)
        diff = (x.double() - y.double()).abs()
        assert (diff <= bound).all(), (
            f"{first.backend} and {second.backend} differ on {name} ({x.dtype}) by up to {diff.max().item():.3e}, "
            f"more than rounding allows ({ref.inexact[name]} inexact updates)"
        )


def run(scenario: Scenario, backends: list[str]) -> tuple[dict[str, wf.Averager], FuzzReference]:
    world = World(scenario)
    model = world.root
    averagers = {
        b: wf.Averager(model, scenario.method, use_buffers=scenario.use_buffers, dtype=scenario.dtype, backend=b)
        for b in backends
    }
    ref = FuzzReference(model, scenario.method, scenario.use_buffers, scenario.dtype)
    for rebinds in scenario.steps:
        world.mutate()
        for rebind in rebinds:
            world.rebind(rebind)
        before = {name: t.detach().clone() for name, t in named_tensors(model)}
        for backend, avg in averagers.items():
            avg.update(model)
            for name, t in named_tensors(model):
                assert torch.equal(t, before[name]), f"{backend}: update wrote the model's {name}"
        ref.update(model)
    return averagers, ref


# ----------------------------------------------------------------------------------------- the tests
@pytest.mark.skipif(not NON_TRITON, reason="no non-Triton backend")
@settings(max_examples=600, **FUZZ_SETTINGS)
@given(scenario=scenarios(big=True))
def test_fuzz_cpu_and_torch_match_reference_and_each_other(scenario):
    averagers, ref = run(scenario, NON_TRITON)
    for backend, avg in averagers.items():
        assert_matches(avg, ref, backend)
    if {"cpu", "torch"} <= averagers.keys():
        assert_backends_agree(averagers["cpu"], averagers["torch"], ref, exact=bitwise_promised(scenario.method))
    if {"cpu", "cuda-emulated"} <= averagers.keys():
        assert_backends_agree(averagers["cuda-emulated"], averagers["cpu"], ref, exact=cpu_kernel_fma())


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@settings(max_examples=300, **FUZZ_SETTINGS)
@given(scenario=scenarios())
def test_fuzz_triton_matches_reference(scenario):
    """The interpreter's numpy arithmetic does not fuse multiply-adds: within rounding of ``cpu``."""
    averagers, ref = run(scenario, ["triton"] + [b for b in ("cpu",) if b in CPU_BACKENDS])
    assert_matches(averagers["triton"], ref, "triton")
    if "cpu" in averagers:
        assert_backends_agree(averagers["triton"], averagers["cpu"], ref, exact=False)


# ------------------------------------------------------------------------------------- long runs
LONG_STEPS = 10_000
EMA_DECAY = 0.999


@functools.lru_cache(maxsize=1)
def long_trajectory() -> tuple[nn.Module, torch.Tensor]:
    """A small model (616 fp32 parameters in 6 tensors, magnitudes 0.1 to 10 by tensor) and its
    parameter values at each of LONG_STEPS steps, flattened: a slow random walk plus noise, as
    weights move in training, rounded to fp32 (``[LONG_STEPS, 616]``)."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    scales = torch.cat([torch.full((p.numel(),), s) for p, s in zip(model.parameters(), (1.0, 0.1, 10.0, 1.0, 0.3, 3.0))])
    size = scales.numel()
    start = torch.randn(size, dtype=torch.float64, generator=gen)
    walk = torch.cumsum(0.01 * torch.randn(LONG_STEPS, size, dtype=torch.float64, generator=gen), dim=0)
    noise = 0.1 * torch.randn(LONG_STEPS, size, dtype=torch.float64, generator=gen)
    values = ((start + walk + noise) * scales).float()
    return model, values


def long_bound(method: wf.Method, updates: int) -> float:
    """The worst-case drift of an fp32 average after ``updates`` updates, in units of u * M
    (u = 2**-24, M = the element's largest |value|); see ``test_long_run_fp32_drift``."""
    if isinstance(method, wf.EMA):
        return 6 + 1 / (1 - method.decay)
    return 6 + (updates + 1) / 2


@pytest.mark.parametrize("method", [wf.EMA(EMA_DECAY), wf.SWA()], ids=["ema", "swa"])
def test_long_run_fp32_drift(method):
    """10**4 updates of an fp32 average of a model whose values change every step: the drift
    against a float64 reference stays within the worst-case rounding bound, on ``cpu`` and
    ``torch`` (and the two stay bit for bit equal, as promised for EMA and SWA).

    Bound. Each update computes s' = s + w (m - s) in fp32 (torch.lerp's formula; with the other
    branch for w >= 0.5 the same count holds), so with u = 2**-24 and M the element's largest
    |value| over the run (the average is a convex combination of values, so |s| <= M too) it adds
        delta <= 3 u w |m - s| (rounding w, m - s and the product) + u |s'| (the sum)
              <= 6 u w M + u M,
    and an earlier error e is carried as (1 - w) e (w in [0, 1]). Hence:
      EMA, w = 1 - decay:  |e| <= sum_j (1 - w)**j delta <= (6 + 1 / w) u M
                           = 1006 u M = 6.0e-5 M for decay 0.999, for any number of updates;
      SWA, w_n = 1 / (n + 1): (n + 1) e_{n+1} = n e_n + (n + 1) delta_n, so after N updates
                           |e_N| <= (1 / N) sum_n (6 u M + (n + 1) u M) <= (6 + (N + 1) / 2) u M
                           = 5006.5 u M = 3.0e-4 M for N = 10**4 (grows linearly in N).
    Rounding errors are not that adversarial: they behave like a random walk, so the typical
    drift is about sqrt(1 / (2 w)) u M (EMA: ~22 u M) and sqrt(N / 3) u M (SWA: ~60 u M).
    Measured (torch 2.14.1, x86-64 AVX-512, both backends bit for bit equal), the max over the 616
    elements and every 1000th step: EMA 23.7 u M (2.4% of the bound), SWA 49.7 u M (1.0%).
    """
    backends = [b for b in ("cpu", "torch") if b in CPU_BACKENDS]
    initial, values = long_trajectory()
    model = copy.deepcopy(initial)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    rows = [list(row.split(sizes)) for row in values]
    rows = [[piece.view_as(p) for piece, p in zip(row, params)] for row in rows]
    averagers = {b: wf.Averager(model, method, backend=b) for b in backends}
    exact = torch.zeros(values.shape[1], dtype=torch.float64)
    largest = values.abs().amax(dim=0).double()
    unit = unit_roundoff(torch.float32)
    worst = 0.0
    with torch.no_grad():
        for step in range(LONG_STEPS):
            torch._foreach_copy_(params, rows[step])
            for avg in averagers.values():
                avg.update(model)
            w = reference_weight(method, step)
            exact += w * (values[step].double() - exact)
            if (step + 1) % 1000 == 0:
                for backend, avg in averagers.items():
                    ours = torch.cat([p.detach().flatten() for p in avg.module.parameters()]).double()
                    drift = ((ours - exact).abs() / (unit * largest)).max().item()
                    worst = max(worst, drift)
                    bound = long_bound(method, step + 1)
                    assert drift <= bound, (
                        f"{backend}, {method}: drift {drift:.1f} u*M after {step + 1} updates > {bound:.1f}"
                    )
    for avg in averagers.values():
        assert int(avg.n_averaged) == LONG_STEPS
    if len(averagers) == 2 and same_fma_as_torch():
        for a, b in zip(averagers["cpu"].module.parameters(), averagers["torch"].module.parameters()):
            assert torch.equal(a, b), "cpu and torch differ after the long run"
    print(f"{method}: max drift {worst:.2f} u*M (bound {long_bound(method, LONG_STEPS):.1f})")


# ------------------------------------------------------------------- what the fuzzing found (fixed)
@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda-emulated") if b in CPU_BACKENDS and b in EXACT_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_equals_torch_lerp_when_weight_above_half(dtype, backend):
    """README: the fused backends equal torch's ``_foreach_lerp_`` bit for bit for fp32, bf16,
    fp16 (EMA, SWA), also with ``EMA(0.1)`` (w = 0.9, lerp's second branch), where the kernels
    once rounded 1 - w from float64 (torch rounds w first, then subtracts)."""
    from torch.optim import swa_utils

    torch.manual_seed(0)
    model = nn.Linear(16, 16).to(dtype)
    ours = wf.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.1), backend=backend)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.1))
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert torch.equal(ours.module.weight, theirs.module.weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("walk", ["compiled", "python"])
def test_rebinding_to_a_view_of_the_same_memory_is_noticed(backend, walk, monkeypatch):
    """The fused backends read model memory at the plan's addresses: a tensor re-bound to another
    view of the same memory keeps its address, so the watch compares dtype, shape and strides too."""
    from wavg_fused import watch

    if walk == "python":
        monkeypatch.setattr(watch, "_first_moved", None)
    model = nn.Module()
    model.p = nn.Parameter(torch.arange(16.0).reshape(4, 4))
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    avg.update(model)
    first = model.p.detach().clone()
    model.p.data = model.p.data.t()  # same address and shape, transposed strides
    avg.update(model)
    torch.testing.assert_close(avg.module.p.detach(), 0.5 * (first + model.p.detach()), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rebinding_to_a_reshaped_view_of_the_same_memory_raises(backend):
    model = nn.Module()
    model.p = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    avg = wf.Averager(model, wf.EMA(0.5), backend=backend)
    avg.update(model)
    model.p.data = model.p.data.view(3, 2)
    with pytest.raises(ValueError, match="shape"):
        avg.update(model)


# ------------------------------------------------------------------------------ the non-finite guard
def _poison(tensor: torch.Tensor, index: int, value: float) -> float:
    """Write ``value`` at flat position ``index`` of ``tensor`` through its storage (any strides,
    expanded ones too); return what was there."""
    position = torch.unravel_index(torch.tensor(index), tensor.shape)
    offset = tensor.storage_offset() + sum(int(i) * s for i, s in zip(position, tensor.stride()))
    element = torch.as_strided(tensor.detach(), (), (), offset)
    old = element.item()
    with torch.no_grad():
        element.fill_(value)
    return old


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(scenario=scenarios(max_steps=2), data=st.data())
def test_fuzz_nonfinite_guard_skips_everything(scenario, data):
    """One Inf or NaN anywhere among the averaged values of a random model: every backend leaves
    every shadow byte as it was and counts the skip; with the value restored, it averages again."""
    world = World(scenario)
    model = world.root
    backends = NON_TRITON + (["triton"] if "triton" in CPU_BACKENDS and data.draw(st.integers(0, 4)) == 0 else [])
    averagers = {
        b: wf.Averager(model, scenario.method, use_buffers=scenario.use_buffers, dtype=scenario.dtype, backend=b,
                       skip_nonfinite=True)
        for b in backends
    }
    for avg in averagers.values():
        avg.update(model)
    some = next(iter(averagers.values()))
    tensors = dict(named_tensors(model))
    averaged = [name for name, role in some._roles_by_name().items() if role == 1 and tensors[name].numel()]
    if not averaged:
        return
    name = data.draw(st.sampled_from(sorted(averaged)))
    index = data.draw(st.integers(0, tensors[name].numel() - 1))
    old = _poison(tensors[name], index, data.draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    for backend, avg in averagers.items():
        before = {k: v.detach().clone() for k, v in avg.module.state_dict().items()}
        avg.update(model)
        for key, value in avg.module.state_dict().items():
            # into fresh dense memory: .contiguous() keeps a size-1 tensor's odd stride
            bits, old_bits = (torch.empty(t.shape, dtype=t.dtype).copy_(t).view(-1).view(torch.uint8) for t in (value, before[key]))
            assert bits.equal(old_bits), (backend, key)
        assert (int(avg.n_averaged), int(avg.n_skipped)) == (1, 1), backend
    _poison(tensors[name], index, old)
    for backend, avg in averagers.items():
        avg.update(model)
        assert (int(avg.n_averaged), int(avg.n_skipped)) == (2, 1), backend

"""AveragerGroup: several averages of one model in one pass, each member equal to the same
Averager updated alone, bit for bit, on every backend; the group kernel's op; checkpoints;
the options that cannot share a pass."""

import copy

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.backends import fused
from reference import Reference, assert_matches_reference

GROUP_BACKENDS = [b for b in wf.available_backends("cpu", include_test_tools=True)]
FUSED = {"cpu", "cuda-emulated", "cuda", "triton"}  # backends with a group kernel: one launch for every member


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 61), nn.BatchNorm1d(61), nn.Linear(61, 2500)).to(dtype)


def _members(shadow_dtype=None):
    # every per-member option at once: two decays, a cast, a warm-up, a schedule, buffers averaged by
    # one member only, an excluded layer, stochastic rounding
    return {
        "fast": wf.EMA(0.9),
        "slow": {"method": wf.EMA(0.999), "dtype": shadow_dtype, "update_after": 3},
        "swa": {"method": wf.SWA(), "use_buffers": True, "update_every": 2, "exclude": ["0"]},
        "power": {"method": wf.PowerEMA(gamma=6.94), "stochastic_rounding": True, "rounding_seed": 11},
    }


def _alone(model, members, **shared):
    out = {}
    for name, spec in members.items():
        method, own = (spec, {}) if isinstance(spec, wf.Method) else (spec["method"], {k: v for k, v in spec.items() if k != "method"})
        out[name] = wf.Averager(model, method, **shared, **own)
    return out


def _train_step(model, dtype, step):
    torch.manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randn(4, 37, dtype=dtype))  # moves the BatchNorm statistics (and its int64 counter)


def _assert_equal_states(group_member, alone, where):
    for (key, ours), (_, theirs) in zip(group_member.state_dict().items(), alone.state_dict().items()):
        assert torch.equal(ours, theirs), f"{where}: {key} differs"


class _Count:
    def __init__(self, monkeypatch):
        self.single = self.group = 0
        for cls in (fused.CpuBackend, fused.CudaEmulatedBackend, fused.CudaBackend):
            single, group = cls._launch, cls._launch_group
            monkeypatch.setattr(cls, "_launch", staticmethod(self._wrap(single, "single")))
            monkeypatch.setattr(cls, "_launch_group", staticmethod(self._wrap(group, "group")))
        try:
            from wavg_fused.triton import kernel
        except ImportError:  # no Triton: no triton backend to count
            return
        monkeypatch.setattr(kernel, "launch", self._wrap(kernel.launch, "single"))
        monkeypatch.setattr(kernel, "launch_group", self._wrap(kernel.launch_group, "group"))

    def _wrap(self, fn, which):
        def counted(*args, **kwargs):
            setattr(self, which, getattr(self, which) + 1)
            return fn(*args, **kwargs)
        return counted


@pytest.mark.parametrize("backend", GROUP_BACKENDS)
@pytest.mark.parametrize("dtype, shadow_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32"])
def test_each_member_equals_the_same_averager_updated_alone(backend, dtype, shadow_dtype, monkeypatch):
    model = _model(dtype)
    members = _members(shadow_dtype)
    group = wf.AveragerGroup(model, members, backend=backend)
    alone = _alone(model, members, backend=backend)
    count = _Count(monkeypatch)
    for step in range(7):
        _train_step(model, dtype, step)
        group.update(model)
        if step == 0 and backend in FUSED:
            assert (count.single, count.group) == (0, 1), "the group's update is one launch for every member"
        for averager in alone.values():
            averager.update(model)
    for name in members:
        _assert_equal_states(group[name], alone[name], f"{backend} member {name!r}")
    assert [int(group[n].n_averaged) for n in members] == [7, 4, 3, 7]


@pytest.mark.parametrize("backend", GROUP_BACKENDS)
@pytest.mark.parametrize("method", [wf.EMA(0.9), wf.SWA(), wf.TADEMA(0.9), wf.EMAWarmup(power=0.75), wf.PowerEMA(gamma=3.0)],
                         ids=["ema", "swa", "tadema", "ema-warmup", "power"])
def test_members_match_a_float64_reference(backend, method):
    model = _model()
    group = wf.AveragerGroup(model, {"a": method, "b": {"method": wf.EMA(0.5), "use_buffers": True}}, backend=backend)
    refs = {"a": Reference(method, use_buffers=False), "b": Reference(wf.EMA(0.5), use_buffers=True)}
    for step in range(6):
        _train_step(model, torch.float32, step)
        group.update(model)
        for ref in refs.values():
            ref.update(model)
    for name, ref in refs.items():
        assert_matches_reference(group[name], ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_group_equals_members_alone(backend):
    if backend not in wf.available_backends("cuda"):
        pytest.skip(f"{backend} is not available")
    model = _model(torch.bfloat16).cuda()
    members = _members(torch.float32)
    group = wf.AveragerGroup(model, members, backend=backend)
    alone = _alone(model, members, backend=backend)
    for step in range(5):
        _train_step(model, torch.bfloat16, step)  # the input is made on the CPU: move the model's call
        group.update(model)
        for averager in alone.values():
            averager.update(model)
    for name in members:
        _assert_equal_states(group[name], alone[name], f"{backend} member {name!r}")


def test_members_are_full_averagers_and_swap_on_their_own():
    model = _model()
    group = wf.AveragerGroup(model, {"fast": wf.EMA(0.5), "slow": wf.EMA(0.99)}, backend="cpu")
    _train_step(model, torch.float32, 0)
    group.update(model)
    _train_step(model, torch.float32, 1)
    group.update(model)
    live = copy.deepcopy(model.state_dict())
    assert isinstance(group["fast"], wf.Averager) and list(group) == ["fast", "slow"] and len(group) == 2
    averaged = group["slow"].module[0].weight.detach().clone()
    with group["slow"].swapped(model):
        assert torch.equal(model[0].weight, averaged)
        with pytest.raises(RuntimeError, match="swapped"):
            group.update(model)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    out = group["fast"](torch.ones(2, 37))  # its own forward
    assert out.shape == (2, 2500)
    group["fast"].update(model)  # a member alone still updates only itself
    assert (int(group["fast"].n_averaged), int(group["slow"].n_averaged)) == (3, 2)


def test_state_dict_holds_each_member_under_its_name_and_round_trips():
    model = _model()
    group = wf.AveragerGroup(model, {"fast": wf.EMA(0.5), "swa": wf.SWA()}, backend="cpu")
    for step in range(3):
        _train_step(model, torch.float32, step)
        group.update(model)
    state = group.state_dict()
    assert "fast.module.0.weight" in state and "swa.n_averaged" in state and "fast._extra_state" in state
    fresh = wf.AveragerGroup(_model(), {"fast": wf.EMA(0.5), "swa": wf.SWA()}, backend="cpu")
    fresh.load_state_dict(state)
    for name in ("fast", "swa"):
        _assert_equal_states(fresh[name], group[name], name)
    _train_step(model, torch.float32, 9)
    group.update(model)
    fresh.update(model)  # the loaded group continues exactly where the saved one was
    for name in ("fast", "swa"):
        _assert_equal_states(fresh[name], group[name], name)


def test_a_bad_entry_in_any_member_loads_nothing():
    model = _model()
    group = wf.AveragerGroup(model, {"fast": wf.EMA(0.5), "swa": wf.SWA()}, backend="cpu")
    _train_step(model, torch.float32, 0)
    group.update(model)
    before = {k: v.clone() for k, v in group.state_dict().items() if isinstance(v, torch.Tensor)}
    state = {k: (v + 1 if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in group.state_dict().items()}
    state["swa.module.2.weight"] = torch.zeros(3, 3)  # the last member's entry is bad
    with pytest.raises(RuntimeError, match="member 'swa'.*'module.2.weight' has shape"):
        group.load_state_dict(state)
    with pytest.raises(RuntimeError, match="unexpected keys \\['other.n_averaged'\\]"):
        group.load_state_dict({**group.state_dict(), "other.n_averaged": torch.tensor(1)})
    after = {k: v for k, v in group.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed a member"


def test_a_model_of_another_structure_changes_no_member():
    model = _model()
    group = wf.AveragerGroup(model, {"fast": wf.EMA(0.5), "slow": wf.EMA(0.9)}, backend="cpu")
    group.update(model)
    before = copy.deepcopy(group.state_dict())
    other = nn.Sequential(nn.Linear(37, 61), nn.BatchNorm1d(61), nn.Linear(61, 7))
    with pytest.raises(ValueError, match="tensor '2.weight'"):
        group.update(other)
    assert all(torch.equal(v, group.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="instead of the model being trained"):
        group.update(group["fast"].module)


@pytest.mark.parametrize("kwargs, match", [
    (dict(skip_nonfinite=True), "'skip_nonfinite' cannot be set here: the non-finite guard"),
    (dict(write_back_every=5), "'write_back_every' cannot be set here"),
    (dict(averaged_module=nn.Linear(1, 1)), "'averaged_module' cannot be set here"),
    (dict(members={"a": {"method": wf.EMA(), "backend": "cpu"}}), "member 'a': 'backend' cannot be set here: every member runs"),
    (dict(members={"a": {"method": wf.EMA(), "decay": 0.9}}), "member 'a': 'decay' is not an Averager option"),
    (dict(members={"a": lambda s, m, n: m}), "member 'a' must be a wavg_fused Method.*callable avg_fn"),
    (dict(members={"update": wf.EMA()}), "member names must be identifiers that are not AveragerGroup attributes"),
    (dict(members={"a.b": wf.EMA()}), "member names must be identifiers"),
    (dict(members={}), "non-empty mapping"),
    (dict(members={f"m{i}": wf.EMA() for i in range(9)}), "at most 8 members"),
])
def test_options_that_cannot_share_a_pass_are_named(kwargs, match):
    kwargs = {"members": {"a": wf.EMA(0.9)}, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        wf.AveragerGroup(_model(), **kwargs)


def test_no_pass_when_every_member_skips_this_call():
    model = _model()
    group = wf.AveragerGroup(model, {"a": {"method": wf.EMA(0.5), "update_every": 2},
                                     "b": {"method": wf.SWA(), "update_every": 2}}, backend="cpu")
    group.update(model)
    assert (int(group["a"].n_averaged), group["a"]._calls) == (0, 1)
    group.update(model)
    assert (int(group["a"].n_averaged), int(group["b"].n_averaged), group["b"]._calls) == (1, 1, 2)


def test_moving_one_member_re_plans_the_group_and_stays_exact():
    model = _model()
    members = {"a": wf.EMA(0.5), "b": wf.EMA(0.9)}
    group = wf.AveragerGroup(model, members, backend="cpu")
    alone = _alone(model, members, backend="cpu")
    for step in range(4):
        if step == 2:
            group["b"].to(torch.float64)
            alone["b"].to(torch.float64)
        _train_step(model, torch.float32, step)
        group.update(model)
        for averager in alone.values():
            averager.update(model)
    for name in members:
        _assert_equal_states(group[name], alone[name], name)


built = "cpu" in wf.available_backends("cpu")


@pytest.mark.skipif(not built, reason="the compiled extension is not built")
@pytest.mark.parametrize("op", ["update_group_", "update_group_emulated_"])
def test_opcheck_group(op):
    model = _model(torch.bfloat16)
    group = wf.AveragerGroup(model, {"a": wf.EMA(0.9), "b": {"method": wf.SWA(), "dtype": torch.float32}}, backend="cpu")
    every_runs = group._engine.all_runs(model)
    plan = group._engine._group_plan(every_runs, [wf.engine.MemberStep(m.method, m.n_averaged) for _, m in group.items()])
    counters = [group["a"].n_averaged, group["b"].n_averaged]
    args = (plan.flats, plan.table, plan.block_table(4096), counters, plan.workspace, [0, 1], [0.9, 0, 0, 0, 0, 0, 0, 0],
            [3, 3], [-1, -1])
    torch.library.opcheck(getattr(torch.ops.wavg_fused, op).default, args)
    with pytest.raises(RuntimeError, match="needs 2 rows per tensor"):
        getattr(torch.ops.wavg_fused, op).default(plan.flats, plan.table[:-1], *args[2:])
    with pytest.raises(RuntimeError, match="one entry per member"):
        getattr(torch.ops.wavg_fused, op).default(*args[:5], [0, 1], [0.9], [3, 3], [-1, -1])


def test_a_copied_or_pickled_group_updates_on_its_own():
    import io

    model = _model()
    group = wf.AveragerGroup(model, {"a": wf.EMA(0.5), "b": wf.SWA()}, backend="cpu")
    group.update(model)
    copied = copy.deepcopy(group)
    buffer = io.BytesIO()
    torch.save(group, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert copied["a"]._engine is copied["b"]._engine and copied["a"]._engine is not group["a"]._engine
    _train_step(model, torch.float32, 1)
    copied.update(model)
    loaded.update(model)
    assert (int(copied["a"].n_averaged), int(group["a"].n_averaged)) == (2, 1)  # the original did not move
    for name in ("a", "b"):
        _assert_equal_states(loaded[name], copied[name], name)
    group.to(torch.float64)
    group.update(model)
    assert group["a"].module[0].weight.dtype == torch.float64 and int(group["b"].n_averaged) == 2

"""wavg_fused.AveragedModel against torch.optim.swa_utils.AveragedModel, run side by side.

Torch is the reference: bit-for-bit where the same math runs (lerp with the same weight), within
an ulp or two where torch uses another formula, and the documented differences checked as such.
"""

import copy
import pickle

import pytest
import torch
from conftest import EXACT_BACKENDS, cached_run
from torch import nn
from torch.optim import swa_utils

import wavg_fused as wf

STEPS = 8
# EXACT_BACKENDS (conftest): bit for bit with torch's CPU lerp; the Triton interpreter (numpy)
# multiplies and adds separately: an ulp per update, a few over a run.


def _ulps(backend: str) -> int:
    return 0 if backend in EXACT_BACKENDS else 4


def _side_by_side(make_ours, make_theirs, kind="cnn", steps=STEPS, dtype=None):
    """Both averagers (a factory may return None) fed the same training run."""
    initial, states = cached_run(kind)
    model = copy.deepcopy(initial).to(dtype) if dtype else copy.deepcopy(initial)
    ours, theirs = make_ours(model), make_theirs(model)
    for state in states[:steps]:
        model.load_state_dict(state)
        for averager in (ours, theirs):
            if averager is not None:
                averager.update_parameters(model)
    return model, ours, theirs


def assert_same(ours, theirs, *, floats_only=False, atol_ulps=0):
    """Equal keys in torch's order, ``n_averaged`` and values: bit for bit when ``atol_ulps`` is 0,
    else within that many ulps of the tensor's largest magnitude; says where they differ."""
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    assert mine["n_averaged"].dtype == torch.long and int(mine["n_averaged"]) == int(ref["n_averaged"])
    for name, expected in ref.items():
        actual = mine[name]
        if floats_only and not expected.is_floating_point():
            continue
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        if atol_ulps == 0 or not expected.is_floating_point():
            if not torch.equal(actual, expected):
                diff = (actual.double() - expected.double()).abs()
                where = diff.flatten().argmax().item()
                raise AssertionError(
                    f"{name}: {int((diff > 0).sum())} of {diff.numel()} elements differ, max "
                    f"{diff.max().item():.3e} at flat index {where}: ours "
                    f"{actual.flatten()[where].item()!r}, torch {expected.flatten()[where].item()!r}"
                )
        else:
            ulp = torch.finfo(expected.dtype).eps * expected.double().abs().max().item()
            error = (actual.double() - expected.double()).abs().max().item()
            assert error <= atol_ulps * ulp, f"{name}: {error:.3e} is more than {atol_ulps} ulps ({ulp:.3e}) from torch"


# (ours, theirs) multi_avg_fn pairs whose math is the same lerp
LERP_PAIRS = {
    "ema-ours": (lambda: wf.get_ema_multi_avg_fn(0.9), lambda: swa_utils.get_ema_multi_avg_fn(0.9)),
    "ema-torch-fn": (lambda: swa_utils.get_ema_multi_avg_fn(0.9), lambda: swa_utils.get_ema_multi_avg_fn(0.9)),
    "ema-low-decay": (lambda: swa_utils.get_ema_multi_avg_fn(0.3), lambda: swa_utils.get_ema_multi_avg_fn(0.3)),
    "swa-ours": (wf.get_swa_multi_avg_fn, swa_utils.get_swa_multi_avg_fn),
    "swa-torch-fn": (swa_utils.get_swa_multi_avg_fn, swa_utils.get_swa_multi_avg_fn),
}


@pytest.mark.parametrize("case", list(LERP_PAIRS))
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_fused_equals_torch_lerp_bitwise(backend, case, kind):
    mine, ref = LERP_PAIRS[case]
    _, ours, theirs = _side_by_side(
        lambda m: wf.AveragedModel(m, multi_avg_fn=mine(), backend=backend),
        lambda m: swa_utils.AveragedModel(m, multi_avg_fn=ref()),
        kind,
    )
    assert isinstance(ours.method, (wf.EMA, wf.SWA)), "expected the fused path"
    assert_same(ours, theirs, atol_ulps=_ulps(backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["ema-torch-fn", "swa-torch-fn"])
def test_fused_equals_torch_lerp_bitwise_16bit(backend, case, dtype):
    mine, ref = LERP_PAIRS[case]
    _, ours, theirs = _side_by_side(
        lambda m: wf.AveragedModel(m, multi_avg_fn=mine(), backend=backend),
        lambda m: swa_utils.AveragedModel(m, multi_avg_fn=ref()),
        dtype=dtype,
    )
    assert_same(ours, theirs, atol_ulps=_ulps(backend))


def test_default_is_fused_swa_within_an_ulp_of_torch_cpu(backend):
    # torch's default on the CPU is a + (b - a) / (n + 1) per tensor; on the GPU it is the lerp
    _, ours, theirs = _side_by_side(lambda m: wf.AveragedModel(m, backend=backend), swa_utils.AveragedModel)
    assert ours.method == wf.SWA()
    assert_same(ours, theirs, atol_ulps=2)
    _, ours, lerp = _side_by_side(
        lambda m: wf.AveragedModel(m, backend=backend),
        lambda m: swa_utils.AveragedModel(m, multi_avg_fn=swa_utils.get_swa_multi_avg_fn()),
    )
    assert_same(ours, lerp, atol_ulps=_ulps(backend))


def test_float64_swa_keeps_the_weight_in_float64():
    # torch rounds 1 / (n + 1) to float32 (a float32 tensor); ours keeps it exact in float64
    _, ours, theirs = _side_by_side(
        lambda m: wf.AveragedModel(m),
        lambda m: swa_utils.AveragedModel(m, multi_avg_fn=swa_utils.get_swa_multi_avg_fn()),
        dtype=torch.float64,
    )
    # reference: torch's CPU default, a + (b - a) / (n + 1) in float64
    _, _, exact = _side_by_side(lambda m: None, swa_utils.AveragedModel, dtype=torch.float64)
    ours_err = (ours.module.head.weight - exact.module.head.weight).abs().max().item()
    torch_err = (theirs.module.head.weight - exact.module.head.weight).abs().max().item()
    assert ours_err < 1e-14 < torch_err < 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize(
    "avg_fn",
    [swa_utils.get_ema_avg_fn(0.9), swa_utils.get_swa_avg_fn(), lambda a, b, n: torch.maximum(a, b) - 0.01 * n],
    ids=["torch-ema-avg-fn", "torch-swa-avg-fn", "custom"],
)
@pytest.mark.parametrize("use_buffers", [False, True])
def test_unfused_avg_fn_is_exactly_torch(avg_fn, use_buffers):
    _, ours, theirs = _side_by_side(
        lambda m: wf.AveragedModel(m, avg_fn=avg_fn, use_buffers=use_buffers),
        lambda m: swa_utils.AveragedModel(m, avg_fn=avg_fn, use_buffers=use_buffers),
    )
    assert ours.method is avg_fn and ours.avg_fn is avg_fn and ours.multi_avg_fn is None
    assert_same(ours, theirs, floats_only=use_buffers)  # integer buffers: see the next tests


class _Recorder:
    """A user multi_avg_fn that records how it is called, then does a lerp of its own."""

    def __init__(self):
        self.calls = []

    @torch.no_grad()
    def __call__(self, averaged, current, num_averaged):
        self.calls.append((averaged[0].dtype, len(averaged), int(num_averaged), num_averaged.device.type))
        torch._foreach_mul_(averaged, 0.75)
        torch._foreach_add_(averaged, current, alpha=0.25)


def test_user_multi_avg_fn_gets_torchs_groups_and_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4).to(torch.float64), nn.Linear(4, 3).to(torch.bfloat16))
    ours_fn, theirs_fn = _Recorder(), _Recorder()
    ours = wf.AveragedModel(model, multi_avg_fn=ours_fn)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=theirs_fn)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        theirs.update_parameters(model)
    # torch's group order comes from a C++ hash map: compare the calls, not their order
    assert sorted(ours_fn.calls, key=str) == sorted(theirs_fn.calls, key=str)
    assert len(ours_fn.calls) == 9  # 3 dtypes x 3 averaging updates (the first one copies)
    assert_same(ours, theirs)


def test_batchnorm_integer_buffers_with_use_buffers():
    # torch's EMA truncates decay * a + (1 - decay) * b into num_batches_tracked (it stalls);
    # ours copies the counter. Float tensors agree bit for bit.
    model, ours, theirs = _side_by_side(
        lambda m: wf.AveragedModel(m, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True),
        lambda m: swa_utils.AveragedModel(m, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True),
    )
    assert_same(ours, theirs, floats_only=True)
    assert int(ours.module.stem[1].num_batches_tracked) == int(model.stem[1].num_batches_tracked) == STEPS
    assert int(theirs.module.stem[1].num_batches_tracked) == 1


def test_swa_with_use_buffers_works_where_torch_raises(backend):
    # torch's foreach SWA (its get_swa_multi_avg_fn, and its default on the GPU) raises on the
    # integer num_batches_tracked; its CPU default truncates a + (b - a) / (n + 1) into it
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_swa_multi_avg_fn(), use_buffers=True)
    theirs.update_parameters(model)
    with pytest.raises(RuntimeError, match="Integer division with addcdiv"):
        theirs.update_parameters(model)

    ours = wf.AveragedModel(model, use_buffers=True, backend=backend)
    means = []
    for state in states[:STEPS]:
        model.load_state_dict(state)
        ours.update_parameters(model)
        means.append(model.stem[1].running_mean.double())
    torch.testing.assert_close(ours.module.stem[1].running_mean.double(), torch.stack(means).mean(0), rtol=1e-6, atol=1e-7)
    assert int(ours.module.stem[1].num_batches_tracked) == STEPS
    # torch's AveragedModel with our SWA function does not raise either, and agrees with ours
    theirs = swa_utils.AveragedModel(initial, multi_avg_fn=wf.get_swa_multi_avg_fn(), use_buffers=True)
    for state in states[:STEPS]:
        model.load_state_dict(state)
        theirs.update_parameters(model)
    assert_same(ours, theirs, atol_ulps=_ulps(backend))


def test_our_multi_avg_fns_inside_torchs_averaged_model():
    for mine, ref in [(wf.get_ema_multi_avg_fn(0.9), swa_utils.get_ema_multi_avg_fn(0.9)),
                      (wf.get_swa_multi_avg_fn(), swa_utils.get_swa_multi_avg_fn())]:
        _, with_ours, with_theirs = _side_by_side(
            lambda m: swa_utils.AveragedModel(m, multi_avg_fn=mine),
            lambda m: swa_utils.AveragedModel(m, multi_avg_fn=ref),
        )
        assert_same(with_ours, with_theirs)
    with_int = [torch.tensor([5, 7])]
    wf.get_ema_multi_avg_fn(0.9)(with_int, [torch.tensor([6, 9])], torch.tensor(3))
    assert with_int[0].tolist() == [6, 9]  # integers are copied
    with pytest.raises(ValueError, match="decay"):
        wf.get_ema_multi_avg_fn(1.5)


def test_fused_method_recognises_only_what_it_can_fuse_exactly():
    assert wf.swa_utils.fused_method(multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.7)) == wf.EMA(0.7)
    assert wf.swa_utils.fused_method(multi_avg_fn=swa_utils.get_swa_multi_avg_fn()) == wf.SWA()
    assert wf.swa_utils.fused_method(multi_avg_fn=wf.get_ema_multi_avg_fn(0.5)) == wf.EMA(0.5)
    assert wf.swa_utils.fused_method(avg_fn=wf.get_ema_avg_fn(0.5)) == wf.EMA(0.5)  # the blog's, tagged
    assert wf.swa_utils.fused_method() == wf.SWA()
    for fn in (swa_utils.get_ema_avg_fn(0.9), swa_utils.get_swa_avg_fn(), lambda a, b, n: a):
        assert wf.swa_utils.fused_method(avg_fn=fn) is None
    assert wf.swa_utils.fused_method(multi_avg_fn=_Recorder()) is None
    # the plain Averager takes tagged functions as their fused rule too
    assert wf.Averager(nn.Linear(2, 2), wf.get_ema_multi_avg_fn(0.25)).method == wf.EMA(0.25)


def test_constructor_and_attributes_match_torch():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fn = swa_utils.get_ema_multi_avg_fn(0.9)
    ours, theirs = wf.AveragedModel(model, multi_avg_fn=fn), swa_utils.AveragedModel(model, multi_avg_fn=fn)
    assert isinstance(ours, wf.Averager) and isinstance(ours, nn.Module)
    for name in ("avg_fn", "multi_avg_fn", "use_buffers"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.n_averaged.device == theirs.n_averaged.device == torch.device("cpu")
    assert ours.n_averaged.dtype == torch.long and int(ours.n_averaged) == 0
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with pytest.raises(AssertionError, match="Only one of avg_fn and multi_avg_fn"):
        wf.AveragedModel(model, avg_fn=swa_utils.get_ema_avg_fn(), multi_avg_fn=fn)
    ours.update_parameters(model)
    assert int(ours.n_averaged) == 1 and torch.equal(ours.module[0].weight, model[0].weight)
    x = torch.randn(5, 3)
    ours.eval(), theirs.eval()
    theirs.update_parameters(model)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_assigning_an_averaging_function_later_changes_the_rule():
    model = nn.Linear(3, 3)
    avg = wf.AveragedModel(model)
    avg.multi_avg_fn = swa_utils.get_ema_multi_avg_fn(0.5)
    assert avg.method == wf.EMA(0.5)
    avg.multi_avg_fn = None
    avg.avg_fn = swa_utils.get_ema_avg_fn(0.5)
    assert avg.method is avg.avg_fn
    avg.avg_fn = None
    assert avg.method == wf.SWA()


def test_buffers_copied_every_update_and_non_persistent_ones_not_saved(backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].register_buffer("scale", torch.ones(4), persistent=False)
    ours = wf.AveragedModel(model, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9), backend=backend)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    for step in range(3):
        model.train()
        model(torch.randn(8, 3))
        with torch.no_grad():
            model[1].scale.fill_(step + 2.0)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        for buffer in ("running_mean", "running_var", "num_batches_tracked", "scale"):
            assert torch.equal(getattr(ours.module[1], buffer), getattr(model[1], buffer)), buffer
    assert "module.1.scale" not in ours.state_dict()
    assert_same(ours, theirs, atol_ulps=_ulps(backend))


def test_pickle_and_deepcopy_resume_identically():
    model, ours, _ = _side_by_side(lambda m: wf.AveragedModel(m, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9)), lambda m: None)
    with pytest.raises((AttributeError, pickle.PicklingError, TypeError)):
        pickle.dumps(swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9)))
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert isinstance(clone, wf.AveragedModel) and clone.method == wf.EMA(0.9)
        reference = copy.deepcopy(ours)
        clone.update_parameters(model)
        reference.update_parameters(model)
        assert_same(clone, reference)
        assert int(clone.n_averaged) == STEPS + 1


def test_training_loop_with_swalr_and_update_bn():
    """torch's documented SWA recipe: SWALR after swa_start, update_bn at the end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    fn = swa_utils.get_ema_multi_avg_fn(0.8)
    ours, theirs = wf.AveragedModel(model, multi_avg_fn=fn), swa_utils.AveragedModel(model, multi_avg_fn=fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = swa_utils.SWALR(optimizer, swa_lr=0.05, anneal_epochs=2)
    loader = [(torch.randn(16, 6), torch.randint(0, 2, (16,))) for _ in range(3)]
    for epoch in range(6):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if epoch >= 2:
            ours.update_parameters(model)
            theirs.update_parameters(model)
            scheduler.step()
    swa_utils.update_bn(loader, ours)
    swa_utils.update_bn(loader, theirs)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not torch.equal(ours.module[1].running_mean, model[1].running_mean)  # update_bn recomputed them
    assert_same(ours, theirs)


class _Renamed(nn.Module):
    """The same tensors as nn.Sequential(Linear(4, 5), Linear(5, 2)) under other names."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.second(self.first(x))


def test_names_that_differ_pair_by_position_as_in_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    other = _Renamed()
    fn = swa_utils.get_ema_multi_avg_fn(0.9)
    ours, theirs = wf.AveragedModel(model, multi_avg_fn=fn), swa_utils.AveragedModel(model, multi_avg_fn=fn)
    for source in (model, other, other):
        ours.update_parameters(source)
        theirs.update_parameters(source)
    assert_same(ours, theirs)
    assert not torch.equal(ours.module[0].weight, model[0].weight)  # it really averaged `other`
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="expected '0.weight', got 'weight'"):
        ours.update_parameters(nn.Linear(4, 5))
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError):  # wf.Averager itself pairs by name only
        wf.Averager(model).update(other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_and_mixed_device_models_match_torch():
    fn = swa_utils.get_ema_multi_avg_fn(0.9)
    mixed = nn.Sequential(nn.Linear(4, 5).cuda(), nn.Linear(5, 2))  # forward is not needed
    for model, device in ((mixed, None), (nn.Linear(4, 5).cuda(), None), (nn.Linear(4, 5), "cuda")):
        ours = wf.AveragedModel(model, device=device, multi_avg_fn=fn)
        theirs = swa_utils.AveragedModel(model, device=device, multi_avg_fn=fn)
        assert ours.n_averaged.device == theirs.n_averaged.device
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            ours.update_parameters(model)
            theirs.update_parameters(model)
        for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
            assert a.device == b.device, name
            torch.testing.assert_close(a, b, rtol=2.5e-7, atol=1e-9, msg=name)  # not yet run: <= 2 ulps
        assert int(ours.n_averaged) == 3

"""Checkpoints across torch's AveragedModel and ours, the method in Averager's state dict,
file sizes of the flat-storage views, and averaged copies built from a factory."""

import copy
import io
import json
import warnings

import pytest
import torch
from conftest import EXACT_BACKENDS, cached_run
from torch import nn
from torch.optim import swa_utils

import wavg_fused as wf


def _run(averager, model, states):
    for state in states:
        model.load_state_dict(state)
        averager.update_parameters(model) if hasattr(averager, "update_parameters") else averager.update(model)


# EXACT_BACKENDS (conftest): see test_swa_utils.py; the Triton interpreter is within a few ulps


def _assert_equal_states(a, b, skip=("_extra_state",), backend="cpu"):
    assert [k for k in a if k not in skip] == [k for k in b if k not in skip]
    for name in b:
        if name in skip:
            continue
        if backend in EXACT_BACKENDS or not b[name].is_floating_point():
            assert torch.equal(a[name], b[name]), f"{name} differs"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=5e-7, atol=1e-8, msg=name)


def _saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _reload(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("ours_kind", ["AveragedModel", "Averager"])
def test_torch_checkpoint_loads_into_ours_strictly(backend, ours_kind):
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    _run(theirs, model, states[:5])
    if ours_kind == "AveragedModel":
        ours = wf.AveragedModel(initial, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9), backend=backend)
    else:
        ours = wf.Averager(initial, wf.EMA(0.9), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no extra state in torch's dict: the method stays, silently
        ours.load_state_dict(_reload(theirs.state_dict()))
    assert int(ours.n_averaged) == 5 and ours.n_averaged.dtype == torch.long
    assert ours.method == wf.EMA(0.9)
    _assert_equal_states(ours.state_dict(), theirs.state_dict())
    _run(ours, model, states[5:8])
    _run(theirs, model, states[5:8])
    _assert_equal_states(ours.state_dict(), theirs.state_dict(), backend=backend)  # the fused EMA is torch's lerp


def test_our_checkpoint_loads_into_torch_strictly(backend):
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial)
    ours = wf.AveragedModel(model, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9), backend=backend)
    _run(ours, model, states[:5])
    theirs = swa_utils.AveragedModel(initial, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(_reload(ours.state_dict()))  # strict
    assert int(theirs.n_averaged) == 5
    _assert_equal_states(theirs.state_dict(), ours.state_dict(), skip=())
    _run(ours, model, states[5:8])
    _run(theirs, model, states[5:8])
    _assert_equal_states(ours.state_dict(), theirs.state_dict(), skip=(), backend=backend)


def test_averager_state_dict_adds_only_the_method_entry():
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial)
    avg = wf.Averager(model, wf.EMA(0.9))
    _run(avg, model, states[:3])
    theirs = swa_utils.AveragedModel(initial)
    keys = list(theirs.state_dict())
    assert list(avg.state_dict()) == keys[:1] + ["_extra_state"] + keys[1:]
    extra = avg.state_dict()["_extra_state"]
    assert extra.dtype == torch.uint8 and json.loads(bytes(extra.tolist()))["method"]["params"] == {"decay": 0.9}
    with pytest.raises(RuntimeError, match="Unexpected key.*_extra_state"):
        theirs.load_state_dict(avg.state_dict())
    result = theirs.load_state_dict(avg.state_dict(), strict=False)
    assert result.unexpected_keys == ["_extra_state"] and not result.missing_keys
    _assert_equal_states(theirs.state_dict(), avg.state_dict())


RESUMABLE = {
    "ema": wf.EMA(0.97),
    "swa": wf.SWA(),
    "tadema": wf.TADEMA(0.8),
    "ema-warmup": wf.EMAWarmup(decay=0.99, inv_gamma=2.0, power=0.75, min_decay=0.1),
    "power-ema-sigma": wf.PowerEMA(sigma_rel=0.1),
    "power-ema-gamma": wf.PowerEMA(gamma=3.0),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_method_and_hyperparameters_restored_on_resume(backend, name):
    method = RESUMABLE[name]
    initial, states = cached_run("transformer")
    model = copy.deepcopy(initial)
    avg = wf.Averager(model, method, backend=backend)
    _run(avg, model, states[:4])
    resumed = wf.Averager(initial, wf.EMA(0.5), backend=backend)
    with pytest.warns(UserWarning, match="replaces EMA\\(decay=0.5\\)"):
        resumed.load_state_dict(_reload(avg.state_dict()))
    assert resumed.method == method and type(resumed.method) is type(method)
    _run(avg, model, states[4:7])
    _run(resumed, model, states[4:7])
    _assert_equal_states(resumed.state_dict(), avg.state_dict(), skip=())


def test_same_method_and_avg_fn_checkpoints_load_silently():
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.TADEMA(0.9))
    avg.update(model)
    custom = wf.Averager(model, lambda a, b, n: (a + b) / 2)  # a function cannot be saved
    custom.update(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wf.Averager(model, wf.TADEMA(0.9)).load_state_dict(avg.state_dict())
        keeps = wf.Averager(model, wf.EMA(0.3))
        keeps.load_state_dict(custom.state_dict())
    assert keeps.method == wf.EMA(0.3) and int(keeps.n_averaged) == 1


def _with_extra(state_dict, value):
    state_dict = dict(state_dict)
    state_dict["_extra_state"] = value
    return state_dict


def test_unknown_method_class_warns_keeps_the_method_and_loads_the_weights():
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    entry = {"format": 1, "method": {"name": "mystery", "class": "elsewhere.Mystery", "params": {}}}
    saved = _with_extra(avg.state_dict(), torch.tensor(list(json.dumps(entry).encode()), dtype=torch.uint8))
    fresh = wf.Averager(nn.Linear(3, 3), wf.SWA())
    with pytest.warns(UserWarning, match="keeping SWA\\(\\).*mystery"):
        fresh.load_state_dict(saved)
    assert fresh.method == wf.SWA() and torch.equal(fresh.module.weight, model.weight)


@pytest.mark.parametrize(
    "bad",
    [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.zeros(4), {"method": "ema"},
     torch.tensor(list(b'{"format": 1, "method": {"name": "ema"}}'), dtype=torch.uint8)],
    ids=["not-json", "float-tensor", "dict", "no-params"],
)
def test_corrupt_method_entry_fails_before_anything_changes(bad):
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    before = {k: v.clone() for k, v in avg.state_dict().items()}
    saved = _with_extra({k: torch.zeros_like(v) for k, v in avg.state_dict().items()}, bad)
    with pytest.raises(RuntimeError, match="_extra_state.*nothing was loaded"):
        avg.load_state_dict(saved)
    assert avg.method == wf.EMA(0.9)
    _assert_equal_states(avg.state_dict(), before, skip=())


def test_checkpoint_without_method_entry_loads_strictly_and_keeps_the_method():
    model = nn.Linear(3, 3)
    avg = wf.Averager(model, wf.EMA(0.9))
    avg.update(model)
    old = {k: v for k, v in avg.state_dict().items() if k != "_extra_state"}
    fresh = wf.Averager(nn.Linear(3, 3), wf.EMA(0.8))
    result = fresh.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.method == wf.EMA(0.8) and torch.equal(fresh.module.weight, model.weight)


# ---------------------------------------------------------------- file sizes of the flat views
def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Linear(256, 64))


def test_safetensors_writes_the_tensors_not_the_flat_buffer(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _bn_mlp()
    model[1].register_buffer("cache", torch.zeros(50_000), persistent=False)  # 200 kB, not saved
    avg = wf.AveragedModel(model, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9))
    avg.update_parameters(model)
    tensors = avg.module.state_dict()
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    safetensors_torch.save_file(tensors, tmp_path / "ema.safetensors")
    size = (tmp_path / "ema.safetensors").stat().st_size
    assert tensor_bytes < size < tensor_bytes + 2048, (size, tensor_bytes, avg.storage.nbytes)
    plain = _bn_mlp()
    plain.load_state_dict(safetensors_torch.load_file(tmp_path / "ema.safetensors"))
    _assert_equal_states(plain.state_dict(), avg.module.state_dict(), skip=())
    full = wf.Averager(model, wf.EMA(0.9))  # its state dict is all tensors, the method entry too
    safetensors_torch.save_file(full.state_dict(), tmp_path / "full.safetensors")
    reloaded = wf.Averager(model, wf.SWA())
    with pytest.warns(UserWarning, match="replaces"):
        reloaded.load_state_dict(safetensors_torch.load_file(tmp_path / "full.safetensors"))
    assert reloaded.method == wf.EMA(0.9)


def test_torch_save_sizes_of_full_and_partial_state_dicts():
    """torch.save writes whole storages. The full state dict costs what the plain model's does
    (plus <= 15 bytes of padding per tensor); one tensor alone drags its whole flat buffer along
    unless cloned (documented in docs/checkpoints.md and docs/semantics.md)."""
    model = _bn_mlp()
    avg = wf.AveragedModel(model)
    avg.update_parameters(model)
    plain = _saved_size(model.state_dict())
    assert _saved_size(avg.module.state_dict()) <= plain + 16 * len(model.state_dict())
    assert _saved_size(avg.state_dict()) <= plain + 16 * len(model.state_dict()) + 1024  # + n_averaged
    weight = avg.module[2].weight  # 64 kB of a 330 kB float32 flat buffer
    weight_bytes = weight.numel() * weight.element_size()
    fp32_flat = avg.storage.flats[(torch.device("cpu"), torch.float32)].nbytes
    assert _saved_size(weight) > fp32_flat > 4 * weight_bytes
    assert _saved_size(weight.detach().clone()) < weight_bytes + 4096
    head = {k: v.clone() for k, v in avg.module.state_dict().items() if k.startswith("2.")}
    assert _saved_size(head) < 2 * weight_bytes


def test_non_persistent_buffers_are_copied_not_saved_but_ride_along_in_torch_save():
    model = _bn_mlp()
    model[1].register_buffer("cache", torch.zeros(50_000), persistent=False)
    avg = wf.AveragedModel(model)
    with torch.no_grad():
        model[1].cache.fill_(3.0)
    avg.update_parameters(model)
    assert torch.equal(avg.module[1].cache, model[1].cache)
    assert not any("cache" in k for k in avg.state_dict())
    # torch.save writes the float32 flat buffer, and the cache lives in it (documented)
    assert _saved_size(avg.state_dict()) > _saved_size(model.state_dict()) + 0.95 * 50_000 * 4


# ---------------------------------------------------------------- averaged copies from a factory
class _NoDeepcopy(nn.Linear):
    def __deepcopy__(self, memo):
        raise TypeError("this module cannot be deep-copied")


def _old_weight_norm_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(6, 4)), nn.Linear(4, 3))


def _perturb_and_update(avg, model, steps, reference=None):
    """``steps`` random steps; ``reference`` (name -> tensor) follows torch's lerp EMA(0.9)."""
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
        if reference is not None:
            for name, p in model.named_parameters():
                reference[name] = p.detach().clone() if step == 0 else torch.lerp(reference[name], p.detach(), 0.1)


def test_averaged_module_for_a_model_deepcopy_cannot_copy(backend):
    torch.manual_seed(0)
    model = _old_weight_norm_model()
    model(torch.randn(2, 6))  # after a forward its `weight` is a non-leaf tensor: deepcopy fails
    with pytest.raises(RuntimeError, match="deepcopy"):
        wf.Averager(model, wf.EMA(0.9))
    avg = wf.Averager(model, wf.EMA(0.9), backend=backend, averaged_module=_old_weight_norm_model())
    for name, value in model.named_parameters():  # values copied in at construction
        assert torch.equal(avg.module.get_parameter(name), value), name
    reference = {}
    _perturb_and_update(avg, model, 4, reference)
    _assert_equal_states({k: avg.module.get_parameter(k) for k in reference}, reference, skip=(), backend=backend)
    x = torch.randn(3, 6)
    v = reference["0.weight_v"]
    hidden = nn.functional.linear(x, reference["0.weight_g"] * v / v.norm(dim=1, keepdim=True), reference["0.bias"])
    expected = nn.functional.linear(hidden, reference["1.weight"], reference["1.bias"])
    torch.testing.assert_close(avg(x), expected)


def test_a_model_deepcopy_cannot_copy_is_told_about_averaged_module():
    model = _old_weight_norm_model()  # the real, deprecated torch.nn.utils.weight_norm
    with pytest.raises(RuntimeError, match=r"averaged_module=") as caught:
        wf.Averager(model, wf.EMA(0.9))
    assert "'0'" in str(caught.value) and "torch.nn.utils.parametrizations.weight_norm" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError) and "deepcopy" in str(caught.value.__cause__)
    with pytest.raises(TypeError, match=r"averaged_module=") as caught:  # the type a caller may catch stays
        wf.Averager(_NoDeepcopy(4, 3), wf.EMA(0.9))
    assert "cannot be deep-copied" in str(caught.value.__cause__)


def test_averaged_module_with_parametrizations_equals_the_deepcopy_path():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.ReLU(), nn.Linear(4, 2))
    copied = wf.Averager(model, wf.EMA(0.9))
    built = wf.AveragedModel(
        model, multi_avg_fn=wf.get_ema_multi_avg_fn(0.9),
        averaged_module=nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.ReLU(), nn.Linear(4, 2)),
    )
    assert any("parametrizations" in name for name, _ in built.module.named_parameters())
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        copied.update(model)
        built.update_parameters(model)
    _assert_equal_states(built.module.state_dict(), copied.module.state_dict(), skip=())
    x = torch.randn(2, 5)
    torch.testing.assert_close(built(x), copied(x), rtol=0, atol=0)


def test_averaged_module_whose_deepcopy_raises():
    model = _NoDeepcopy(4, 3)
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        swa_utils.AveragedModel(model)
    ours = wf.AveragedModel(model, averaged_module=_NoDeepcopy(4, 3))
    first = model.weight.detach().clone()
    ours.update_parameters(model)
    with torch.no_grad():
        model.weight.mul_(3.0)
    ours.update_parameters(model)
    torch.testing.assert_close(ours.module.weight, torch.lerp(first, 3 * first, 0.5), rtol=0, atol=0)
    assert int(ours.n_averaged) == 2


def test_averaged_module_is_checked_before_anything_changes():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    wrong = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    weight = wrong[1].weight
    snapshot = weight.detach().clone()
    with pytest.raises(ValueError, match="'1.weight'.*shape"):
        wf.Averager(model, averaged_module=wrong)
    assert wrong[1].weight is weight and torch.equal(weight, snapshot)
    with pytest.raises(ValueError, match="averaged_module does not match.*expected 'weight', got '0.weight'"):
        wf.Averager(model, averaged_module=nn.Linear(4, 3))
    with pytest.raises(ValueError, match="separate module"):
        wf.Averager(model, averaged_module=model)
    shallow = copy.copy(model)
    shallow._modules = dict(model._modules)
    with pytest.raises(ValueError, match="shares"):
        wf.Averager(model, averaged_module=shallow)

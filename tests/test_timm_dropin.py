"""wavg_fused.integrations.timm against the installed timm, over real training loops: the same
averages (bit for bit where the formula is the same), decays and checkpoints, and each documented
difference shown to be one."""

import copy
import glob

import pytest
import torch

timm_utils = pytest.importorskip("timm.utils")
from timm.models import load_checkpoint, resume_checkpoint  # noqa: E402

from conftest import CPU_BACKENDS, EXACT_BACKENDS  # noqa: E402
from models import SmallCNN, TinyTransformer, train  # noqa: E402
from wavg_fused.integrations import timm as ours  # noqa: E402

WARMUP = dict(use_warmup=True, update_after_step=4, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.3)
SETTINGS = {"plain": {}, "warmup": WARMUP, "no-buffers": dict(exclude_buffers=True, **WARMUP)}


def _run_both(mine, theirs, model, steps, with_step=True, first=1):
    def after(step):
        mine.update(model, step=step + first - 1 if with_step else None)
        theirs.update(model, step=step + first - 1 if with_step else None)

    train(model, steps, after)


def _assert_same(mine, theirs, exact=True):
    mine_sd, theirs_sd = mine.state_dict(), theirs.state_dict()
    assert list(mine_sd) == list(theirs_sd)
    for key, value in theirs_sd.items():
        if exact:
            assert torch.equal(mine_sd[key], value), key
        else:
            torch.testing.assert_close(mine_sd[key], value, rtol=2e-6, atol=1e-7, msg=key)


# every setting on the two fast backends; the kernels' emulations (slow) once, with the warm-up
CASES = [(b, s, w) for b in CPU_BACKENDS for s in SETTINGS for w in (True, False)
         if b in ("cpu", "torch") or (s, w) == ("warmup", True)]


@pytest.mark.parametrize("backend,setting,with_step", CASES)
def test_v3_averages_as_timm_does(backend, setting, with_step):
    model = SmallCNN()
    mine = ours.ModelEmaV3(model, decay=0.9, backend=backend, **SETTINGS[setting])
    theirs = timm_utils.ModelEmaV3(model, decay=0.9, **SETTINGS[setting])
    _run_both(mine, theirs, model, 25, with_step)
    # same lerp and same float32 weight: torch's own rounding on the exact backends
    _assert_same(mine, theirs, exact=backend in EXACT_BACKENDS)


def test_get_decay_is_timms():
    for settings in ({}, WARMUP, dict(WARMUP, min_decay=0.95), dict(use_warmup=True)):
        mine = ours.ModelEmaV3(torch.nn.Linear(2, 2), decay=0.99, **settings)
        theirs = timm_utils.ModelEmaV3(torch.nn.Linear(2, 2), decay=0.99, **settings)
        assert [mine.get_decay(s) for s in [None, *range(0, 300, 7)]] == [theirs.get_decay(s) for s in [None, *range(0, 300, 7)]]


def test_bf16_model_fp32_average_is_within_rounding_of_timms():
    model = SmallCNN().to(torch.bfloat16)
    mine = ours.ModelEmaV3(model, decay=0.9, dtype=torch.float32, backend="cpu", **WARMUP)
    theirs = timm_utils.ModelEmaV3(model, decay=0.9, dtype=torch.float32, **WARMUP)
    _run_both(mine, theirs, model, 20)
    assert mine.module.head.weight.dtype == torch.float32
    _assert_same(mine, theirs, exact=False)  # timm multiplies and adds for mixed dtypes, we lerp


def _flat(ema):
    return torch.cat([p.double().flatten() for p in ema.module.parameters()])


def test_bf16_average_with_stochastic_rounding_tracks_the_exact_average_as_timms_does():
    # decay 0.995: most steps are below half a bf16 ulp, so round-to-nearest drifts off the average
    model = SmallCNN().to(torch.bfloat16)
    mine, theirs = ours.ModelEmaV3(model, decay=0.995, backend="cpu"), timm_utils.ModelEmaV3(model, decay=0.995)
    nearest = ours.ModelEmaV3(model, decay=0.995, stochastic_rounding=False, backend="cpu")
    exact = ours.ModelEmaV3(model, decay=0.995, dtype=torch.float64)
    train(model, 60, lambda step: [ema.update(model) for ema in (mine, theirs, nearest, exact)])
    error = {name: (_flat(ema) - _flat(exact)).abs().mean() for name, ema in
             [("mine", mine), ("theirs", theirs), ("nearest", nearest)]}
    assert mine.module.head.weight.dtype == torch.bfloat16
    assert error["mine"] < 0.5 * error["nearest"] and error["theirs"] < 0.5 * error["nearest"], error
    assert 0.67 < error["mine"] / error["theirs"] < 1.5, error  # the same rounding, other random bits
    assert not torch.equal(_flat(mine), _flat(theirs))


def test_tied_weights_are_averaged_once():
    # timm's state-dict walk visits a tied tensor under both names and lerps it twice per update
    # (its parameters() walk, exclude_buffers=True, visits it once); ours averages it once
    model = TinyTransformer()
    mine = ours.ModelEmaV3(model, decay=0.9, backend="cpu")
    theirs = timm_utils.ModelEmaV3(model, decay=0.9)
    once = timm_utils.ModelEmaV3(model, decay=0.9, exclude_buffers=True)  # the model has no buffers

    def after(step):
        mine.update(model), theirs.update(model), once.update(model)

    train(model, 10, after)
    _assert_same(mine, once)
    assert not torch.equal(mine.module.embed.weight, theirs.module.embed.weight)
    torch.testing.assert_close(mine.module.norm.weight, theirs.module.norm.weight, rtol=0, atol=0)


def test_state_dicts_load_into_timms_class_and_back():
    model = SmallCNN()
    mine = ours.ModelEmaV3(model, decay=0.9, backend="cpu", **WARMUP)
    theirs = timm_utils.ModelEmaV3(model, decay=0.9, **WARMUP)
    _run_both(mine, theirs, model, 8)
    fresh_theirs = timm_utils.ModelEmaV3(SmallCNN(), decay=0.9, **WARMUP)
    fresh_theirs.load_state_dict(mine.state_dict())  # strict
    fresh_mine = ours.ModelEmaV3(SmallCNN(), decay=0.9, backend="cpu", **WARMUP)
    fresh_mine.load_state_dict(theirs.state_dict())
    _run_both(fresh_mine, fresh_theirs, model, 8, first=9)
    _assert_same(fresh_mine, fresh_theirs)


def test_timm_checkpoint_saver_resume_and_load_checkpoint_use_ema(tmp_path):
    model = SmallCNN()
    mine = ours.ModelEmaV3(model, decay=0.9, backend="cpu", **WARMUP)
    theirs = timm_utils.ModelEmaV3(model, decay=0.9, **WARMUP)
    _run_both(mine, theirs, model, 8)
    saver = timm_utils.CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), model_ema=mine,
                                       checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = sorted(glob.glob(str(tmp_path / "*.pth.tar")))[0]
    assert list(torch.load(path, weights_only=True)["state_dict_ema"]) == list(model.state_dict())
    # timm's train.py: rebuild, resume the model, then load the EMA weights into model_ema.module
    resumed = SmallCNN()
    resume_checkpoint(resumed, path)
    mine_again = ours.ModelEmaV3(resumed, decay=0.9, backend="cpu", **WARMUP)
    theirs_again = timm_utils.ModelEmaV3(resumed, decay=0.9, **WARMUP)
    load_checkpoint(mine_again.module, path, use_ema=True)
    load_checkpoint(theirs_again.module, path, use_ema=True)
    _assert_same(mine_again, theirs)
    _run_both(mine_again, theirs_again, resumed, 8, first=9)
    _assert_same(mine_again, theirs_again)


def test_set_forward_and_device_move():
    model = SmallCNN()
    mine = ours.ModelEmaV3(model, decay=0.5, backend="cpu")
    theirs = timm_utils.ModelEmaV3(model, decay=0.5)
    _run_both(mine, theirs, model, 3)
    mine.set(model), theirs.set(model)
    _assert_same(mine, theirs)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(mine(x), theirs(x)) and not mine.module.training
    mine.double()  # through the averager: the moved copy is packed into flat storage again
    theirs.double()
    _run_both(mine, theirs, model, 3)
    assert mine.module.head.weight.dtype == torch.float64
    _assert_same(mine, theirs)


def test_v2_is_timms_v2_within_rounding_and_keeps_counting_batches():
    model = SmallCNN()
    mine, theirs = ours.ModelEmaV2(model, decay=0.9, backend="cpu"), timm_utils.ModelEmaV2(model, decay=0.9)

    def after(step):
        mine.update(model), theirs.update(model)

    train(model, 12, after)
    for key, value in theirs.state_dict().items():
        if key.endswith("num_batches_tracked"):
            # timm's V2 blends the integer counter and truncates: it stalls; ours copies it
            assert int(mine.state_dict()[key]) == 12 and int(value) < 12
        else:
            torch.testing.assert_close(mine.state_dict()[key], value, rtol=2e-6, atol=1e-7, msg=key)
    mine.set(model)
    assert torch.equal(mine.module.head.weight, model.head.weight)


def test_non_persistent_buffers_are_averaged_where_timm_never_updates_them():
    model = SmallCNN()
    model.register_buffer("scale", torch.ones(3), persistent=False)  # not in the state dict timm walks
    mine, theirs = ours.ModelEmaV3(model, decay=0.5, backend="cpu"), timm_utils.ModelEmaV3(model, decay=0.5)
    for _ in range(3):
        model.scale.add_(1.0)
        mine.update(model), theirs.update(model)
    assert torch.equal(theirs.module.scale, torch.ones(3))
    assert torch.equal(mine.module.scale, torch.full((3,), 3.125))  # 1 -> 1.5 -> 2.25 -> 3.125

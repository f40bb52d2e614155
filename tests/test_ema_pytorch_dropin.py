"""wavg_fused.integrations.ema_pytorch against the installed ema-pytorch, over real training
loops: the same averages, step counters, copied and ignored tensors, write-backs and state dicts,
and each documented difference shown to be one."""

import copy
import subprocess
import sys

import pytest
import torch

ema_pytorch = pytest.importorskip("ema_pytorch")

from conftest import CPU_BACKENDS, EXACT_BACKENDS  # noqa: E402
from models import SmallCNN, TinyTransformer, train  # noqa: E402
from wavg_fused.integrations.ema_pytorch import EMA  # noqa: E402

SCHEDULE = dict(beta=0.9, update_after_step=5, update_every=3)
SETTINGS = {
    "schedule": SCHEDULE,
    "warmup": dict(SCHEDULE, inv_gamma=2.0, power=0.75, min_value=0.3),
    "names": dict(SCHEDULE, param_or_buffer_names_no_ema={"stem.0.bias", "stage.1.running_mean", "not.a.name"},
                  ignore_names={"head.bias"}, ignore_startswith_names={"stage.0"}),
    "foreach-no-online": dict(SCHEDULE, use_foreach=True, include_online_model=False),
    "every-call": dict(beta=0.95, update_after_step=0, update_every=1),
}


def _is_counter(key):
    return key.endswith("num_batches_tracked")


def _assert_same(mine, theirs, exact=True):
    mine_sd, theirs_sd = mine.state_dict(), theirs.state_dict()
    assert list(mine_sd) == list(theirs_sd)
    for key, value in theirs_sd.items():
        if key.startswith("ema_model.") and _is_counter(key):
            continue  # the documented difference: ema-pytorch never writes integer buffers after the copy
        if exact:
            assert torch.equal(mine_sd[key], value), key
        else:
            torch.testing.assert_close(mine_sd[key], value, rtol=2e-6, atol=1e-7, msg=key)


def _lockstep(mine, theirs, model, steps):
    def after(step):
        mine.update(), theirs.update()
        assert (int(mine.step), bool(mine.initted)) == (int(theirs.step), bool(theirs.initted)) == (step, True)

    train(model, steps, after)


# every setting on the two fast backends; the kernels' emulations (slow) once, with the names
CASES = [(b, s) for b in CPU_BACKENDS for s in SETTINGS if b in ("cpu", "torch") or s == "names"]


@pytest.mark.parametrize("backend,setting", CASES)
def test_ema_averages_as_ema_pytorch_does(backend, setting):
    model = SmallCNN()
    mine, theirs = EMA(model, backend=backend, **SETTINGS[setting]), ema_pytorch.EMA(model, **SETTINGS[setting])
    _lockstep(mine, theirs, model, 26)
    _assert_same(mine, theirs, exact=backend in EXACT_BACKENDS)


def test_copied_ignored_and_integer_tensors():
    model = SmallCNN()
    initial = copy.deepcopy(model)
    settings = SETTINGS["names"]
    mine, theirs = EMA(model, backend="cpu", **settings), ema_pytorch.EMA(model, **settings)
    _lockstep(mine, theirs, model, 25)  # the 25th call averages (step 24, update_every=3)
    ema = mine.ema_model
    # no-EMA names hold the model (copied); ignored ones stopped at the last copy before averaging
    assert torch.equal(ema.stem[0].bias, model.stem[0].bias)
    assert torch.equal(ema.stage[1].running_mean, model.stage[1].running_mean)
    assert not torch.equal(ema.head.bias, model.head.bias) and not torch.equal(ema.head.bias, initial.head.bias)
    assert torch.equal(ema.head.bias, theirs.ema_model.head.bias)
    assert torch.equal(ema.stage[0].weight, theirs.ema_model.stage[0].weight)
    # averaged ones are neither
    assert not torch.equal(ema.head.weight, model.head.weight)
    # integer buffers follow the model here; ema-pytorch keeps its deepcopy's value
    assert int(ema.stem[1].num_batches_tracked) == 25 and int(theirs.ema_model.stem[1].num_batches_tracked) == 0


def test_get_current_decay_is_ema_pytorchs_float32_value():
    settings = dict(beta=0.9999, update_after_step=3, inv_gamma=1.5, power=2 / 3, min_value=0.1)
    mine, theirs = EMA(torch.nn.Linear(2, 2), **settings), ema_pytorch.EMA(torch.nn.Linear(2, 2), **settings)
    for step in [*range(0, 50), 1000, 31_623, 10**6]:
        mine.step.fill_(step), theirs.step.fill_(step)
        assert mine.get_current_decay() == theirs.get_current_decay(), step


def test_bf16_model_and_fp32_ema_model():
    model = SmallCNN().to(torch.bfloat16)
    for settings in ({}, dict(ema_model=copy.deepcopy(model).float(), coerce_dtype=True)):
        mine = EMA(model, backend="cpu", **copy.deepcopy(dict(SCHEDULE, **settings)))
        theirs = ema_pytorch.EMA(model, **dict(SCHEDULE, **settings))
        _lockstep(mine, theirs, model, 14)
        _assert_same(mine, theirs, exact="ema_model" not in settings)  # fp32 from bf16: both lerp in fp32
        assert mine.ema_model.head.weight.dtype == theirs.ema_model.head.weight.dtype


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_update_model_with_ema_every(beta):
    settings = dict(SCHEDULE, update_model_with_ema_every=4, update_model_with_ema_beta=beta)
    models = [SmallCNN(), None]
    models[1] = copy.deepcopy(models[0])
    mine, theirs = EMA(models[0], backend="cpu", **settings), ema_pytorch.EMA(models[1], **settings)
    train(models[0], 20, lambda step: mine.update())  # the same data: the runs stay in lockstep
    train(models[1], 20, lambda step: theirs.update())
    _assert_same(mine, theirs)  # online_model.* (the written-back models) included
    assert not torch.equal(models[0].head.weight, SmallCNN().head.weight)


def test_state_dicts_load_into_ema_pytorchs_class_and_back():
    model = SmallCNN()
    mine, theirs = EMA(model, backend="cpu", **SCHEDULE), ema_pytorch.EMA(model, **SCHEDULE)
    _lockstep(mine, theirs, model, 10)
    fresh_theirs = ema_pytorch.EMA(copy.deepcopy(model), **SCHEDULE)
    fresh_theirs.load_state_dict(mine.state_dict())  # strict
    fresh_mine = EMA(copy.deepcopy(model), backend="cpu", **SCHEDULE)
    fresh_mine.load_state_dict(theirs.state_dict())
    assert int(fresh_mine.step) == int(fresh_theirs.step) == 10
    fresh_mine.online_model, fresh_theirs.online_model = model, model  # keep training the same model

    def after(step):
        fresh_mine.update(), fresh_theirs.update()
        assert int(fresh_mine.step) == int(fresh_theirs.step) == 10 + step

    train(model, 10, after)
    _assert_same(fresh_mine, fresh_theirs)


def test_optimizer_hook_forward_methods_lazy_init_and_copies():
    model = TinyTransformer()
    settings = dict(SCHEDULE, forward_method_names=("forward",), lazy_init_ema=True)
    mine, theirs = EMA(model, backend="cpu", **settings), ema_pytorch.EMA(model, **settings)
    assert mine.ema_model is None and list(mine.state_dict()) == list(theirs.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = [ema.add_to_optimizer_post_step_hook(optimizer) for ema in (mine, theirs)]
    tokens = torch.randint(0, 37, (2, 5))
    for _ in range(12):
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert int(mine.step) == int(theirs.step) == 12
    _assert_same(mine, theirs)
    assert torch.equal(mine(tokens), theirs(tokens)) and torch.equal(mine.forward_eval(tokens), theirs.forward_eval(tokens))
    mine.copy_params_from_ema_to_model()
    assert torch.equal(model.norm.weight, mine.ema_model.norm.weight)
    with torch.no_grad():
        model.norm.weight.add_(1)
    mine.copy_params_from_model_to_ema()
    assert torch.equal(model.norm.weight, mine.ema_model.norm.weight)
    for handle in handles:
        handle.remove()


def test_step_written_from_outside_is_read_back():
    model = SmallCNN()
    mine, theirs = EMA(model, backend="cpu", **SCHEDULE), ema_pytorch.EMA(model, **SCHEDULE)
    _lockstep(mine, theirs, model, 4)
    mine.step.fill_(40), theirs.step.fill_(40)  # e.g. a resumed run setting its counter
    train(model, 5, lambda step: (mine.update(), theirs.update()))
    assert int(mine.step) == int(theirs.step) == 45
    _assert_same(mine, theirs)


def test_importing_wavg_fused_imports_no_peer():
    code = "import sys, wavg_fused, wavg_fused.integrations; print([m for m in ('timm', 'ema_pytorch') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_the_benchmark_times_both_peers_when_installed():
    pytest.importorskip("timm")
    from wavg_fused.bench.peers import make_peers

    assert {"timm ModelEmaV3", "ema-pytorch"} <= {peer.name for peer in make_peers("cpu")}

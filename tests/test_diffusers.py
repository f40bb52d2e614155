"""The diffusers drop-in (``wavg_fused.integrations.diffusers.EMAModel``) against the installed
diffusers' own ``EMAModel`` (tested with diffusers 0.42.1), over real training loops: same
decays step by step, same averages (float64: within float64 rounding, so a decay one step off
fails; float32: on average no further from an exact float64 EMA than twice diffusers' own error), the same
copies of frozen tensors, and checkpoints that load either way."""

import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import ModelMixin  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.training_utils import EMAModel as Peer  # noqa: E402

from conftest import CPU_BACKENDS  # noqa: E402
from wavg_fused.integrations.diffusers import EMAModel  # noqa: E402

# Each reaches its cap (decay) or keeps its floor (min_decay) within STEPS, so both clamps are exercised
CONFIGS = {
    "warmup": dict(decay=0.98, update_after_step=7, use_ema_warmup=True, inv_gamma=1.0, power=1.0),
    "plain": dict(decay=0.93, update_after_step=7),
    "floor": dict(decay=0.95, min_decay=0.6, update_after_step=3, use_ema_warmup=True, inv_gamma=0.5, power=2 / 3),
    "min_above_decay": dict(decay=0.8, min_decay=0.9, update_after_step=2),
    "quick": dict(decay=0.7, update_after_step=3),  # the shifted counter's form, capped by step 24
}
STEPS = 160
QUICK_STEPS = 40
# Every configuration on the cpu backend, the engine's other backends on the form only this
# drop-in uses (EMAWarmup one count late); the interpreted ones take ~0.2 s an update here.
CASES = [(config, "cpu") for config in CONFIGS if config != "quick"] + [
    ("quick", backend) for backend in CPU_BACKENDS if backend != "cpu"
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tensors of a few hundred elements: on a busy 2-core machine OpenMP's hand-offs made each
    # op of the training loop take ~10 ms; one thread keeps the loops fast and changes no value
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 2))
        self.to(dtype)
        self.layers[3].bias.requires_grad_(False)  # frozen: copied, not averaged

    def forward(self, x):
        return self.layers(x)


def _train(model, steps, emas, on_step=None, seed=0):
    """Adam on a regression task; every ``ema`` steps after each optimizer step. The frozen
    bias is moved by hand, so a copy and an average of it differ."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, steps + 1):
        x = torch.randn(32, 6, generator=generator).to(dtype)
        loss = (model(x) - x[:, :2].sin()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.layers[3].bias.add_(0.01)
        for ema in emas:
            ema.step(model.parameters())
        if on_step is not None:
            on_step(step)


def _max_error(shadows, reference):
    return max(float((s.double() - r).abs().max()) for s, r in zip(shadows, reference))


def _mean_error(shadows, reference):
    """Mean over all elements: the maximum of an fp32 average is its last rounding, in both."""
    return float(torch.cat([(s.double() - r).abs().flatten() for s, r in zip(shadows, reference)]).mean())


def _pair(kwargs, dtype=torch.float64, backend="auto"):
    """A seeded ``Net`` and diffusers' and our EMAs of it, built with the same arguments."""
    torch.manual_seed(0)
    model = Net(dtype)
    return model, Peer(model.parameters(), **kwargs), EMAModel(model.parameters(), backend=backend, **kwargs)


def _assert_same_float64(ours, peer, step=None):
    # a decay one step off moves the average by ~1e-3; float64 rounding by ~1e-16
    assert _max_error(ours.shadow_params, [s.double() for s in peer.shadow_params]) < 1e-12, step


class Reference:
    """The EMA diffusers means, in float64: ``s += (1 - decay) * (p - s)`` with diffusers' decay."""

    def __init__(self, params):
        self.shadows = [p.detach().double().clone() for p in params]

    def step(self, params, decay):
        for s, p in zip(self.shadows, params):
            s.add_((1 - decay) * (p.detach().double() - s) if p.requires_grad else p.detach().double() - s)


@pytest.mark.parametrize("config, backend", CASES)
def test_float64_matches_diffusers_step_by_step(config, backend):
    kwargs, steps = CONFIGS[config], QUICK_STEPS if config == "quick" else STEPS
    model, peer, ours = _pair(kwargs, backend=backend)
    copying = kwargs["update_after_step"] + 1
    trained = {}

    def check(step):
        assert ours.optimization_step == peer.optimization_step == step
        assert ours.cur_decay_value == peer.cur_decay_value  # the host's decay: the same float64 formula
        if step <= copying:  # decay 0: the average is the model
            assert all(torch.equal(s, p) for s, p in zip(ours.shadow_params, model.parameters()))
        _assert_same_float64(ours, peer, step)
        trained[step] = ours.cur_decay_value

    _train(model, steps, [peer, ours], check)
    floor, cap = kwargs.get("min_decay", 0.0), kwargs["decay"]
    assert trained[copying] == 0.0 and trained[copying + 1] > 0.0
    assert trained[steps] == max(floor, cap)  # the cap (or the floor above it) was reached
    if config == "floor":
        assert trained[copying + 1] == floor
    frozen = 5  # layers[3].bias: after the weights and biases of two Linears and the LayerNorm's weight
    assert torch.equal(ours.shadow_params[frozen], model.layers[3].bias)


@pytest.mark.parametrize("config", ["warmup", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-model-fp32-average"])
def test_float32_average_within_diffusers_rounding(config, dtype):
    model, peer, ours = _pair(CONFIGS[config], dtype)
    if dtype != torch.float32:  # diffusers' way to an fp32 average of a bf16 model
        peer.to(dtype=torch.float32)
        ours.to(dtype=torch.float32)
    reference = Reference(model.parameters())
    _train(model, STEPS, [peer, ours], lambda step: reference.step(model.parameters(), peer.cur_decay_value))
    assert all(s.dtype == torch.float32 for s in ours.shadow_params)
    peer_error = _mean_error(peer.shadow_params, reference.shadows)
    ours_error = _mean_error(ours.shadow_params, reference.shadows)
    # measured: 0.96 to 1.05 times diffusers' error (~1e-8; a decay one step off makes it ~1e-4)
    assert 0 < ours_error <= 2 * peer_error, (ours_error, peer_error)
    torch.testing.assert_close(ours.shadow_params, peer.shadow_params, rtol=1e-5, atol=1e-6)


def test_requires_grad_toggled_mid_run_follows_diffusers():
    model, peer, ours = _pair(CONFIGS["warmup"])

    def toggle(step):
        if step == 60:  # freeze the first layer (copied from now on), unfreeze the LayerNorm bias
            model.layers[0].requires_grad_(False)
            model.layers[3].bias.requires_grad_(True)
        _assert_same_float64(ours, peer, step)

    _train(model, 120, [peer, ours], toggle)
    assert torch.equal(ours.shadow_params[0], model.layers[0].weight)  # copied since step 61
    assert not torch.equal(ours.shadow_params[5], model.layers[3].bias)  # averaged since step 61


def test_get_decay_equals_diffusers():
    for kwargs in [*CONFIGS.values(), dict(), dict(use_ema_warmup=True), dict(decay=0.0), dict(min_decay=0.5, decay=0.5)]:
        peer, ours = Peer([torch.zeros(1)], **kwargs), EMAModel([torch.zeros(1)], **kwargs)
        for step in [*range(0, 50), 1000, 31_623, 10**6]:
            assert ours.get_decay(step) == peer.get_decay(step), (kwargs, step)


def test_state_dicts_load_either_way_and_training_continues():
    kwargs = CONFIGS["plain"]
    model, peer, ours = _pair(kwargs)
    _train(model, 30, [peer, ours])
    state = ours.state_dict()
    assert state.keys() == peer.state_dict().keys()
    for key, value in peer.state_dict().items():
        if key != "shadow_params":
            assert state[key] == value and type(state[key]) is type(value), key
    # crossed over: each loads the other's state into one built with other hyperparameters
    peer_2 = Peer(model.parameters(), decay=0.5, use_ema_warmup=True)
    ours_2 = EMAModel(model.parameters(), decay=0.5, use_ema_warmup=True)
    peer_2.load_state_dict(ours.state_dict())
    ours_2.load_state_dict(peer.state_dict())
    assert ours_2.optimization_step == 30 and ours_2.decay == kwargs["decay"] and not ours_2.use_ema_warmup
    _train(model, 40, [peer, ours, peer_2, ours_2], seed=1)
    for other in (ours, peer_2, ours_2):
        assert other.cur_decay_value == peer.cur_decay_value
        _assert_same_float64(other, peer)


@pytest.mark.parametrize("entry", [
    {"decay": 1.5}, {"min_decay": 0}, {"optimization_step": 3.0}, {"update_after_step": None},
    {"use_ema_warmup": 1}, {"inv_gamma": "1"}, {"power": None}, {"shadow_params": ()}, {"shadow_params": [1.0]},
], ids=lambda entry: f"{next(iter(entry))}={next(iter(entry.values()))!r}")
def test_invalid_state_dict_raises_as_diffusers_and_changes_nothing(entry):
    model = Net()
    peer, ours = Peer(model.parameters()), EMAModel(model.parameters())
    before = ours.state_dict()
    before = {k: [t.clone() for t in v] if k == "shadow_params" else v for k, v in before.items()}
    with pytest.raises(ValueError) as theirs:
        peer.load_state_dict({**peer.state_dict(), **entry})
    with pytest.raises(ValueError, match=str(theirs.value)):
        ours.load_state_dict({**ours.state_dict(), **entry})
    after = ours.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(after.pop("shadow_params"), before.pop("shadow_params")))
    assert after == before


class TinyModel(ModelMixin, ConfigMixin):
    """The smallest diffusers model: a config and two layers."""

    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.inner = nn.Linear(4, width)
        self.outer = nn.Linear(width, 2)

    def forward(self, x):
        return self.outer(self.inner(x).relu())


def _tiny_training(model, steps, emas, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        for ema in emas:
            ema.step(model.parameters())


def test_save_pretrained_and_from_pretrained_interoperate(tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    kwargs = dict(decay=0.9, use_ema_warmup=True, update_after_step=2, model_cls=TinyModel, model_config=model.config)
    peer, ours = Peer(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    _tiny_training(model, 12, [peer, ours], seed=0)
    ours.save_pretrained(tmp_path / "ours")
    peer.save_pretrained(tmp_path / "peer")
    peer_from_ours = Peer.from_pretrained(tmp_path / "ours", TinyModel)
    ours_from_peer = EMAModel.from_pretrained(tmp_path / "peer", TinyModel)
    for loaded in (peer_from_ours, ours_from_peer):
        assert loaded.optimization_step == 12 and loaded.update_after_step == 2 and loaded.use_ema_warmup
        torch.testing.assert_close(loaded.shadow_params, peer.shadow_params, rtol=1e-6, atol=1e-7)
    _tiny_training(model, 10, [peer, ours, peer_from_ours, ours_from_peer], seed=1)  # on the live model
    for other in (ours, peer_from_ours, ours_from_peer):
        assert other.cur_decay_value == peer.cur_decay_value
        torch.testing.assert_close(other.shadow_params, peer.shadow_params, rtol=1e-5, atol=1e-6)


def test_save_pretrained_needs_model_cls_and_config():
    ours = EMAModel(TinyModel().parameters())
    with pytest.raises(ValueError, match="model_cls"):
        ours.save_pretrained("unused")


def test_store_copy_to_restore_round_trip():
    torch.manual_seed(0)
    model = Net()
    ours = EMAModel(model.parameters(), decay=0.9)
    _train(model, 20, [ours])
    trained = [p.detach().clone() for p in model.parameters()]
    ours.store(model.parameters())
    ours.copy_to(model.parameters())
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ours.shadow_params))
    assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    ours.restore(model.parameters())
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    assert ours.temp_stored_params is None
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ours.restore(model.parameters())


def test_shadow_params_are_views_of_the_average():
    model = Net()
    ours = EMAModel(model.parameters())
    shadows = ours.shadow_params
    assert len({s.untyped_storage().data_ptr() for s in shadows}) == 1  # one flat buffer behind them all
    with torch.no_grad():
        shadows[0].fill_(3.0)  # written in place: the average itself changes
    ours.copy_to(model.parameters())
    assert bool((model.layers[0].weight == 3.0).all())


def test_to_casts_only_floating_shadows_as_diffusers():
    model = Net()
    counter = torch.zeros(3, dtype=torch.long)  # an integer tensor among the parameters: copied
    peer, ours = Peer([*model.parameters(), counter]), EMAModel([*model.parameters(), counter])
    peer.to(dtype=torch.float64)
    ours.to(dtype=torch.float64)
    assert [s.dtype for s in ours.shadow_params] == [s.dtype for s in peer.shadow_params]
    assert ours.shadow_params[-1].dtype == torch.long
    counter.add_(5)
    peer.step([*model.parameters(), counter])
    ours.step([*model.parameters(), counter])
    assert torch.equal(ours.shadow_params[-1], counter) and torch.equal(peer.shadow_params[-1], counter)


def test_setting_hyperparameters_mid_run_follows_diffusers():
    model, peer, ours = _pair(CONFIGS["warmup"])

    def change(step):
        changes = {20: ("decay", 0.9), 30: ("optimization_step", 500), 40: ("use_ema_warmup", False),
                   50: ("update_after_step", 900), 55: ("update_after_step", 10), 60: ("min_decay", 0.95)}
        if step in changes:
            for ema in (peer, ours):
                setattr(ema, *changes[step])
        assert ours.cur_decay_value == peer.cur_decay_value
        _assert_same_float64(ours, peer, step)

    _train(model, 80, [peer, ours], change)
    assert ours.cur_decay_value == 0.95


def test_mismatched_parameters_raise():
    model = Net()
    ours = EMAModel(model.parameters())
    with pytest.raises(ValueError, match="got 7 parameters"):
        ours.step(list(model.parameters())[:-1])
    with pytest.raises(ValueError, match="more than once"):
        EMAModel([model.layers[0].weight] * 2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        EMAModel(model.parameters(), update_after_steps=3)


def test_deprecated_module_argument_warns_and_warms_up_as_diffusers():
    model = Net()
    with pytest.warns(FutureWarning):
        ours = EMAModel(model)
    assert ours.use_ema_warmup and Peer(model).use_ema_warmup


def test_import_does_not_import_diffusers():
    code = "import sys, wavg_fused, wavg_fused.integrations.diffusers; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

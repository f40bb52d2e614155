"""wavg_fused.PostHocEMA: synthesis (against the snapshots, a directly tracked profile and
ema-pytorch), arguments, atomic snapshots and resuming a run."""

import copy
import hashlib
import warnings

import pytest
import torch

import wavg_fused as wf
from wavg_fused import posthoc_snapshots

pytest.importorskip("safetensors")

SIGMA_RELS = (0.05, 0.28)
EVERY = 10  # snapshot every 10 updates
FP32_ULP = 2.0**-23


def trajectory(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A small model's weights along a random walk with drift (noise 0.1, drift 0.01 a step)."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    states = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1 + 0.01)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def drive(model, averagers, states) -> None:
    """Put each state in ``model`` and call ``update`` of each averager (the post-hoc ones hold it)."""
    for state in states:
        model.load_state_dict(state)
        for averager in averagers:
            averager.update(model) if isinstance(averager, wf.Averager) else averager.update()


def make(folder, model=None, **options):
    options = {"sigma_rels": SIGMA_RELS, "checkpoint_every_num_steps": EVERY, "checkpoint_dtype": torch.float32,
               "backend": "cpu", **options}
    return wf.PostHocEMA(torch.nn.Linear(8, 4) if model is None else model, checkpoint_folder=folder, **options)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


def folder_bytes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_same_snapshots(folder, expected) -> None:
    """The same files holding equal tensors and metadata (safetensors orders its metadata at
    random, so the bytes differ)."""
    found, wanted = posthoc_snapshots.list_snapshots(folder), posthoc_snapshots.list_snapshots(expected)
    assert [(s.path.name, s.t, s.gamma) for s in found] == [(s.path.name, s.t, s.gamma) for s in wanted]
    for mine, theirs in zip(found, wanted):
        a, b = posthoc_snapshots.read_tensors(mine), posthoc_snapshots.read_tensors(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mine.path.name


# ---------------------------------------------------------------------------------------- synthesis
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("step", [10, 100, 200])
def test_synthesising_a_tracked_profile_reproduces_its_snapshot(tmp_path, backend, step):
    """The least-squares weights are the snapshot's unit vector up to ~1e-13 (measured), so the
    float64 sum differs from the snapshot by far less than half an fp32 ulp and rounds back to
    it (measured: equal); one fp32 ulp is allowed in case another lstsq rounds otherwise."""
    model = torch.nn.Linear(8, 4)
    ema = make(tmp_path, model, backend=backend)
    drive(model, [ema], trajectory(200))
    for index, gamma in enumerate(ema.gammas):
        snapshot = posthoc_snapshots.read_tensors(next(
            s for s in posthoc_snapshots.list_snapshots(tmp_path) if s.step == step and s.index == index))
        synthesized = ema.synthesize_ema_state_dict(gamma=gamma, step=step)
        for name, value in snapshot.items():
            torch.testing.assert_close(synthesized[name], value, rtol=FP32_ULP, atol=0)
    # the module form holds the same values, at the latest snapshot by default
    module = ema.synthesize_ema_model(sigma_rel=SIGMA_RELS[1])
    torch.testing.assert_close(module.weight, ema.ema_models[1].module.weight, rtol=FP32_ULP, atol=0)
    assert module is not ema.ema_models[1].module and module.weight.data_ptr() != ema.ema_models[1].module.weight.data_ptr()


@pytest.mark.parametrize("every, checkpoint_dtype, bound", [
    (10, torch.float32, 1e-4),   # measured 1e-5 .. 2e-5
    (20, torch.float32, 5e-4),   # measured 7e-5 .. 1.6e-4
    (10, torch.float16, 3e-3),   # measured 5e-4 .. 1.2e-3: the snapshots' fp16 rounding
])
@pytest.mark.parametrize("sigma_rel", [0.10, 0.15, 0.20])
def test_a_synthesised_profile_comes_close_to_one_tracked_directly(tmp_path, every, checkpoint_dtype, bound, sigma_rel):
    """400 steps of a random walk with drift; a sigma_rel between the two tracked ones against a
    PowerEMA tracked alongside. The error is ||synthesised - direct|| over ||profile 0 - profile 1||
    (the scale on which the profiles differ); the bounds are about 3-5x the largest measured over
    three seeds."""
    model = torch.nn.Linear(8, 4)
    ema = make(tmp_path, model, checkpoint_every_num_steps=every, checkpoint_dtype=checkpoint_dtype)
    direct = wf.Averager(model, wf.PowerEMA(sigma_rel=sigma_rel), backend="cpu", use_buffers=True)
    drive(model, [ema, direct], trajectory(400))
    synthesized = flat(ema.synthesize_ema_state_dict(sigma_rel=sigma_rel))
    wide, narrow = (flat(p.module.state_dict()) for p in ema.ema_models)
    error = float((synthesized - flat(direct.module.state_dict())).norm() / (wide - narrow).norm())
    assert error < bound, error


def test_agrees_with_ema_pytorch(tmp_path):
    """Same trajectory and settings as ema-pytorch's PostHocEMA (update_every=1, fp32 snapshots).

    Its folder synthesised here agrees to 4.3e-6 (measured; values up to ~7: fp32 sums there,
    float64 here). The two runs' own syntheses differ by up to 0.0094 (measured) because its
    profile is one update behind the paper's (its first update counts twice); that difference is
    already in the tracked profiles themselves, so the syntheses may differ by no more than that."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = torch.nn.Linear(8, 4)
    options = {"sigma_rels": SIGMA_RELS, "checkpoint_every_num_steps": EVERY, "checkpoint_dtype": torch.float32}
    ours = wf.PostHocEMA(model, checkpoint_folder=tmp_path / "ours", backend="cpu", **options)
    theirs = ema_pytorch.PostHocEMA(model, checkpoint_folder=tmp_path / "theirs", update_every=1, **options)
    drive(model, [ours, theirs], trajectory(400))
    tracked_gap = max(float((p.module.weight - q.ema_model.weight).abs().max().detach())
                      for p, q in zip(ours.ema_models, theirs.ema_models))
    from_their_folder = wf.PostHocEMA(model, checkpoint_folder=tmp_path / "theirs", **options)
    for sigma_rel in (0.10, 0.15, 0.20):
        reference = theirs.synthesize_ema_model(sigma_rel=sigma_rel).ema_model.state_dict()
        read = from_their_folder.synthesize_ema_state_dict(sigma_rel=sigma_rel)
        own = ours.synthesize_ema_state_dict(sigma_rel=sigma_rel)
        for name, value in reference.items():
            torch.testing.assert_close(read[name], value, rtol=1e-5, atol=1e-5)
            assert float((own[name] - value).abs().max()) <= tracked_gap


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("options, error, words", [
    ({"sigma_rels": (0.05, 0.1), "gammas": (5.0, 7.0)}, ValueError, "exactly one of sigma_rels and gammas"),
    ({"sigma_rels": None}, ValueError, "exactly one of sigma_rels and gammas"),
    ({"sigma_rels": (0.05, 0.5)}, ValueError, "sigma_rels[1]"),
    ({"sigma_rels": (0.0, 0.1)}, ValueError, "sigma_rels[0]"),
    ({"gammas": (5.0, -1.0), "sigma_rels": None}, ValueError, "gammas[1]"),
    ({"sigma_rels": (0.1,)}, ValueError, "at least two profiles"),
    ({"sigma_rels": (0.1, 0.1)}, ValueError, "must all differ"),
    ({"checkpoint_every_num_steps": 0}, ValueError, "checkpoint_every_num_steps"),
    ({"checkpoint_every_num_steps": -5}, ValueError, "checkpoint_every_num_steps"),
    ({"checkpoint_every_num_steps": 2.5}, ValueError, "checkpoint_every_num_steps"),
    ({"checkpoint_every_num_steps": "auto"}, ValueError, "checkpoint_every_num_steps"),
    ({"checkpoint_dtype": torch.int8}, ValueError, "checkpoint_dtype"),
    ({"ignore_names": {"weight"}}, ValueError, "param_or_buffer_names_no_ema"),
    ({"frozen": True}, ValueError, "frozen"),
    ({"update_every": 0}, ValueError, "update_every"),
])
def test_bad_arguments_name_the_argument(tmp_path, options, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        make(tmp_path, **options)


def test_synthesis_arguments_are_checked(tmp_path):
    model = torch.nn.Linear(8, 4)
    ema = make(tmp_path, model)
    with pytest.raises(RuntimeError, match="no snapshots yet"):
        ema.synthesize_ema_model(sigma_rel=0.1)
    with pytest.raises(RuntimeError, match="no update has been averaged yet"):
        ema.checkpoint()
    drive(model, [ema], trajectory(25))
    with pytest.raises(ValueError, match="exactly one of gamma and sigma_rel"):
        ema.synthesize_ema_model(gamma=5.0, sigma_rel=0.1)
    with pytest.raises(ValueError, match="exactly one of gamma and sigma_rel"):
        ema.synthesize_ema_model()
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        ema.synthesize_ema_model(sigma_rel=0.4)
    with pytest.raises(ValueError, match="step must be an int from the first snapshot's step 10 to the latest's 20"):
        ema.synthesize_ema_model(sigma_rel=0.1, step=25)
    ema.synthesize_ema_model(sigma_rel=0.1, step=15)  # between snapshots: those up to 10


def test_update_takes_a_model_too(tmp_path):
    held, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ema = make(tmp_path, held)
    ema.update(other)
    assert torch.equal(ema.ema_models[0].module.weight, other.weight)
    assert int(ema.step) == 1 and len(ema(torch.ones(1, 8))) == 2


# ---------------------------------------------------------------------------------------- the files
def test_a_failed_write_leaves_no_torn_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(8, 4)
    ema = make(tmp_path, model)
    states = trajectory(20)
    drive(model, [ema], states[:10])
    before = folder_bytes(tmp_path)
    assert sorted(before) == ["0.10.safetensors", "1.10.safetensors"]

    def half_then_fail(file, data):
        file.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(posthoc_snapshots, "_write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        drive(model, [ema], states[10:])
    assert folder_bytes(tmp_path) == before  # no 0.20 file, no temporary left, the earlier ones intact
    # a crash (no clean-up) leaves a temporary file: never read
    (tmp_path / ".0.20.safetensors.abc.tmp").write_bytes(b"torn")
    assert [s.path.name for s in posthoc_snapshots.list_snapshots(tmp_path)] == list(before)
    ema.synthesize_ema_model(sigma_rel=0.1)


def test_snapshots_are_named_as_ema_pytorch_names_them(tmp_path):
    model = torch.nn.Linear(8, 4)
    ema = make(tmp_path, model, checkpoint_dtype=torch.float16)
    drive(model, [ema], trajectory(20))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["0.10.safetensors", "0.20.safetensors", "1.10.safetensors", "1.20.safetensors"]
    snapshot = posthoc_snapshots.list_snapshots(tmp_path)[0]
    assert (snapshot.t, snapshot.gamma) == (10, ema.gammas[0])
    assert posthoc_snapshots.read_tensors(snapshot)["weight"].dtype == torch.float16


def test_the_profile_time_counts_averaging_updates(tmp_path):
    """With update_every=2 a snapshot at step 10 holds 5 updates: its profile's time is 5."""
    model = torch.nn.Linear(8, 4)
    ema = make(tmp_path, model, update_every=2)
    drive(model, [ema], trajectory(20))
    assert [(s.step, s.t) for s in posthoc_snapshots.list_snapshots(tmp_path)][::2] == [(10, 5), (20, 10)]
    weight = ema.ema_models[0].module.weight.clone()
    torch.testing.assert_close(ema.synthesize_ema_state_dict(gamma=ema.gammas[0])["weight"], weight, rtol=FP32_ULP, atol=0)


def test_a_folder_of_other_profiles_is_refused(tmp_path):
    model = torch.nn.Linear(8, 4)
    drive(model, [make(tmp_path, model)], trajectory(10))
    with pytest.raises(ValueError, match="another profile"):
        make(tmp_path, model, sigma_rels=(0.05, 0.2))


def test_a_new_instance_over_the_folder_continues_the_series(tmp_path):
    """fp32 snapshots of fp32 profiles: resuming from them is exact, so the resumed run writes
    the uninterrupted run's snapshots bit for bit."""
    states = trajectory(100)
    model = torch.nn.Linear(8, 4)
    drive(model, [make(tmp_path / "whole", model)], states)
    drive(model, [make(tmp_path / "resumed", model)], states[:65])  # stops after 65: 60 is the latest snapshot
    resumed = make(tmp_path / "resumed", model)
    assert int(resumed.step) == 60 and int(resumed.ema_models[0].n_averaged) == 60
    drive(model, [resumed], states[60:])
    assert_same_snapshots(tmp_path / "resumed", tmp_path / "whole")


def test_loading_the_state_dict_continues_the_series(tmp_path):
    """With fp16 snapshots only the state dict resumes exactly; later snapshots are not used."""
    states = trajectory(100)
    model = torch.nn.Linear(8, 4)
    whole = make(tmp_path / "whole", model, checkpoint_dtype=torch.float16)
    drive(model, [whole], states)
    first = make(tmp_path / "resumed", model, checkpoint_dtype=torch.float16)
    drive(model, [first], states[:30])
    saved = copy.deepcopy(first.state_dict())  # as torch.save would keep it: the live tensors move on
    drive(model, [first], states[30:50])  # a continuation that is abandoned
    resumed = make(tmp_path / "resumed", model, checkpoint_dtype=torch.float16)
    with pytest.warns(UserWarning, match="snapshots .* are after step 30"):
        resumed.load_state_dict(saved)
    assert int(resumed.step) == 30
    assert resumed.synthesize_ema_state_dict(sigma_rel=0.1).keys() == {"weight", "bias"}
    with pytest.raises(ValueError, match="latest's 30"):
        resumed.synthesize_ema_model(sigma_rel=0.1, step=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drive(model, [resumed], states[30:])
    assert_same_snapshots(tmp_path / "resumed", tmp_path / "whole")


def test_integer_buffers_come_from_the_latest_snapshot(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = make(tmp_path, model)
    for _ in range(20):
        model(torch.randn(4, 3))  # bumps num_batches_tracked, moves the running statistics
        ema.update()
    synthesized = ema.synthesize_ema_model(sigma_rel=0.1, step=15)
    assert synthesized[1].num_batches_tracked.dtype == torch.long and int(synthesized[1].num_batches_tracked) == 10
    assert synthesized[1].running_mean.dtype == torch.float32

"""Scale-out: replicated models (DDP, DataParallel, torch.compile), FSDP2 local-shard averaging and
distributed checkpoints, on CPU with the gloo backend and 2 processes.

Every multi-process test compares against the same training run in one process: the ranks see
halves of each batch, FSDP2/DDP average their gradients, so the run (and its average) equals the
single-process run on whole batches within rounding.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import wavg_fused as wf
from models import OpLog  # noqa: E402 (tests/ is on the path: conftest.py)

dist = torch.distributed
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
STEPS = 5
BATCH = 8  # rows per step; each of the WORLD ranks trains on BATCH // WORLD of them
DECAY = 0.8


class Net(nn.Module):
    """Uneven shards over 2 ranks (5 rows: 3 + 2; a 1-element bias: 1 + 0), a parameter at the
    root (FSDP2's root group, left unsharded by an eval forward), and plain buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.hidden = nn.Linear(5, 3)
        self.out = nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("shift", torch.full((1,), 0.25))
        self.register_buffer("version", torch.tensor(3, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.norm(self.inp(x))))) * self.scale + self.shift


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    return [(torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 1, generator=generator)) for _ in range(steps)]


def rows(rank: int, world: int) -> slice:
    size = BATCH // world
    return slice(rank * size, (rank + 1) * size)


def train(model: nn.Module, averager: wf.Averager, rank: int = 0, world: int = 1, steps: int = STEPS) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in batches(steps):
        loss = (model(x[rows(rank, world)]) - y[rows(rank, world)]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averager.update(model)


def reference(method: wf.Method, steps: int = STEPS) -> wf.Averager:
    """The single-process run every distributed run must match."""
    model = make_net()
    averager = wf.Averager(model, method)
    train(model, averager, steps=steps)
    return averager


# ---------------------------------------------------------------------- process plumbing
def _entry(rank: int, worker, world: int, store: str, args: tuple, backend: str = "gloo") -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # a file store rather than a TCP port: nothing another process on the machine can take first
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # torch 2.14.1 with gloo, FSDP2 and DCP sometimes aborts in interpreter teardown ("terminate
    # called without an active exception"; reproduced without wavg_fused): the work is done and
    # checked, so leave without the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, *args, backend: str = "gloo", world: int = WORLD) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` processes of one process group; a failure in
    any rank raises here with its traceback."""
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        torch.multiprocessing.spawn(_entry, args=(worker, world, store, args, backend), nprocs=world, join=True)


def _collectives(ops: list[str]) -> list[str]:
    return [op for op in ops if "c10d" in op or "_c10d_functional" in op]


def _flats(averager: wf.Averager) -> list[torch.Tensor]:
    return [flat.clone() for flat in averager.storage.flats.values()]


# ---------------------------------------------------------------------- replicated models
def _ddp_worker(rank: int, world: int, out: Path) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_net())
    averager = wf.Averager(ddp, wf.EMA(DECAY))
    assert type(averager.module) is Net  # unwrapped in the constructor
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2)
    for step, (x, y) in enumerate(batches()):
        loss = (ddp(x[rows(rank, world)]) - y[rows(rank, world)]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == STEPS - 1:
            with OpLog() as log:
                averager.update(ddp)  # and in update
        else:
            averager.update(ddp)
    assert not _collectives(log.ops), log.ops
    with averager.swapped(ddp), torch.no_grad():  # and in swap
        prediction = ddp(batches()[0][0])

    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = FullyShardedDataParallel(make_net(), device_id=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="FSDP1"):  # not supported: a clear error
        wf.Averager(fsdp1, wf.EMA(DECAY))
    torch.save(
        {"state": averager.state_dict(), "prediction": prediction, "ops": log.ops, "bytes": averager.storage.tensor_bytes},
        out / f"ddp{rank}.pt",
    )


def test_ddp_every_rank_holds_the_single_process_average(tmp_path):
    spawn(_ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"ddp{rank}.pt") for rank in range(WORLD)]
    expected = reference(wf.EMA(DECAY))
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key}: ranks differ"  # no communication needed
    for key, value in expected.state_dict().items():
        if key != "_extra_state":
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(ranks[0]["prediction"], expected(batches()[0][0]), rtol=1e-5, atol=1e-6)
    assert ranks[0]["bytes"] == expected.storage.tensor_bytes  # replicated: a full average per rank
    if "cpu" in wf.available_backends("cpu"):
        assert sum("wavg_fused" in op for op in ranks[0]["ops"]) == 1


def test_data_parallel_and_compile_wrappers_are_unwrapped_everywhere():
    net = make_net()
    wrapped = torch.compile(nn.DataParallel(net))  # compiled lazily: nothing is traced here
    averager = wf.Averager(wrapped, wf.EMA(0.5))
    assert type(averager.module) is Net
    train(net, averager, steps=1)
    averager.update(wrapped)
    assert int(averager.n_averaged) == 2
    with torch.no_grad():
        net.inp.weight.add_(1.0)
    trained, average = net.inp.weight.detach().clone(), averager.module.inp.weight.detach().clone()
    with averager.swapped(wrapped):
        assert torch.equal(net.inp.weight, average)
    assert torch.equal(net.inp.weight, trained)
    averager.copy_to(wrapped)
    assert torch.equal(net.inp.weight, average)


# ---------------------------------------------------------------------- FSDP2
def _fully_shard(model: Net, world: int) -> Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.hidden, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root group: norm, out, scale
    return model


def _local(module: nn.Module) -> dict[str, torch.Tensor]:
    from wavg_fused.sharded import local_named_tensors

    return {name: tensor.detach().clone() for name, tensor in local_named_tensors(module)}


def _fsdp_worker(rank: int, world: int, out: Path) -> None:
    from torch.distributed.tensor import DTensor

    from wavg_fused.distributed import full_state_dict

    model = _fully_shard(make_net(), world)
    averager = wf.Averager(model, wf.EMA(DECAY))  # copy.deepcopy(model) raises for FSDP2 modules
    for (name, shadow), (_, param) in zip(averager.module.named_parameters(), model.named_parameters()):
        assert isinstance(shadow, DTensor), name
        assert shadow.device_mesh == param.device_mesh and shadow.placements == param.placements, name
        assert shadow.to_local().shape == param.to_local().shape, name
    assert not isinstance(averager.module.shift, DTensor)  # FSDP2 replicates buffers: so does the average
    with pytest.raises(RuntimeError, match="swapped"):
        averager(torch.zeros(1, 6))  # the copy has the shards, not the code: the error says what to do
    with pytest.raises(ValueError, match="averaged_module: an FSDP2"):
        wf.Averager(model, wf.EMA(DECAY), averaged_module=_fully_shard(make_net(), world))

    # fully_shard on a submodule only: the root's plain parameters stay the model's own memory
    from torch.distributed.fsdp import fully_shard

    partial = make_net()
    fully_shard(partial.hidden, mesh=model.inp.weight.device_mesh)
    partial_average = wf.Averager(partial, wf.EMA(DECAY))
    assert not partial_average.storage.owns(partial.scale) and not partial_average.storage.owns(partial.inp.weight)
    partial_average.update(partial)
    with torch.no_grad():
        partial.scale.add_(1.0)
    assert torch.equal(partial_average.module.scale, partial.scale.detach() - 1.0)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step, (x, y) in enumerate(batches()):
        loss = (model(x[rows(rank, world)]) - y[rows(rank, world)]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == STEPS - 1:
            with OpLog() as log:
                averager.update(model)
        else:
            averager.update(model)
    assert not _collectives(log.ops), log.ops
    assert len(averager._runs) == 1  # one plan, so one launch, per rank

    # A plain (unsharded) model of the same structure is refused, naming the tensor; nothing changes
    before = _flats(averager)
    with pytest.raises(ValueError, match="tensor 'scale': the model holds a plain tensor, the averaged copy a DTensor"):
        averager.update(make_net())
    assert all(torch.equal(a, b) for a, b in zip(before, _flats(averager)))

    # Evaluate through the FSDP model itself: an eval forward leaves the root group unsharded ...
    model.eval()
    probe = batches()[0][0]
    with torch.no_grad():
        model(probe)
    assert not isinstance(model.scale, DTensor)
    trained = None
    with averager.swapped(model):  # ... the averager reshards it, and swaps the shards in place
        trained = {name: value for name, value in _local(averager.module).items()}
        with torch.no_grad():
            prediction = model(probe)
    after = _local(model)
    assert all(torch.equal(after[name], value) for name, value in trained.items())  # trained weights back
    assert all(isinstance(p, DTensor) for p in model.parameters())

    # or write the average into a second model sharded the same way, kept for evaluation
    eval_model = _fully_shard(make_net(seed=5), world).eval()
    averager.copy_to(eval_model)
    with torch.no_grad():
        assert torch.equal(eval_model(probe), prediction)

    # torch.save of this rank's sharded state dict: DTensors whose shards are views into flat storage
    buffer = io.BytesIO()
    torch.save(averager.state_dict(), buffer)
    buffer.seek(0)
    own = torch.load(buffer, weights_only=True)
    for key, value in averager.state_dict().items():
        if isinstance(value, DTensor):
            assert isinstance(own[key], DTensor) and torch.equal(own[key].to_local(), value.to_local()), key
    assert buffer.getbuffer().nbytes < 4 * averager.storage.nbytes + 50_000  # not the flat buffer per tensor

    full = full_state_dict(averager)  # a collective: every rank calls it
    torch.save(
        {
            "full": full,
            "prediction": prediction,
            "ops": log.ops,
            "bytes": averager.storage.tensor_bytes,
            "param_bytes": sum(p.to_local().numel() * p.element_size() for p in averager.module.parameters()),
        },
        out / f"fsdp{rank}.pt",
    )


def _guard_worker(rank: int, world: int, out: Path) -> None:
    model = _fully_shard(make_net(), world)
    averager = wf.Averager(model, wf.EMA(DECAY), skip_nonfinite=True)
    averager.update(model)
    before = _flats(averager)
    with torch.no_grad():
        if rank == 0:  # an Inf in rank 0's shard only
            model.hidden.weight.to_local().view(-1)[0] = float("inf")
    averager.update(model)
    assert all(torch.equal(a, b) for a, b in zip(before, _flats(averager))), rank
    assert (int(averager.n_averaged), int(averager.n_skipped)) == (1, 1), rank
    with torch.no_grad():
        if rank == 0:
            model.hidden.weight.to_local().view(-1)[0] = 0.5
    averager.update(model)
    assert (int(averager.n_averaged), int(averager.n_skipped)) == (2, 1), rank

    # a DTensor whose local tensor moved (its own data_ptr() stays 0): the watch follows the shard
    weight = model.hidden.weight
    before = averager.module.hidden.weight.to_local().clone()
    weight._local_tensor = torch.full_like(weight._local_tensor, 2.0)
    averager.update(model)
    expected = before + (1 - DECAY) * (2.0 - before)
    torch.testing.assert_close(averager.module.hidden.weight.to_local(), expected)


def test_fsdp2_nonfinite_guard_skips_on_every_rank(tmp_path):
    """Ranks hold different shards: one rank's Inf skips the update everywhere (one all-reduce of
    the flag), so the ranks' averages and counters stay in step."""
    spawn(_guard_worker, tmp_path)


def _nccl_worker(rank: int, world: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_net().cuda()
    mesh = init_device_mesh("cuda", (world,))
    for part in (model.inp, model.hidden, model):
        fully_shard(part, mesh=mesh)
    averager = wf.Averager(model, wf.EMA(DECAY), skip_nonfinite=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in batches():
        x, y = x[rows(rank, world)].cuda(), y[rows(rank, world)].cuda()
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averager.update(model)
    torch.cuda.synchronize()
    assert (int(averager.n_averaged), int(averager.n_skipped)) == (STEPS, 0)
    from wavg_fused.distributed import full_state_dict

    torch.save(full_state_dict(averager), out / f"nccl{rank}.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA device and NCCL")
def test_fsdp2_on_cuda_with_nccl(tmp_path):
    """The FSDP2 path on a GPU with NCCL (world size: the GPUs here, 1 is enough for the code path)
    against the single-process CPU average of the same run."""
    world = min(torch.cuda.device_count(), WORLD)
    spawn(_nccl_worker, tmp_path, backend="nccl", world=world)
    full = torch.load(tmp_path / "nccl0.pt", weights_only=False)
    expected = reference(wf.EMA(DECAY)).state_dict()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(full[key].cpu(), value, rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp2_averages_local_shards_equal_to_single_process(tmp_path):
    spawn(_fsdp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"fsdp{rank}.pt", weights_only=False) for rank in range(WORLD)]
    expected = reference(wf.EMA(DECAY))
    full = ranks[0]["full"]
    assert ranks[1]["full"] == {}  # rank0_only
    assert sorted(full) == sorted(expected.state_dict())
    for key, value in expected.state_dict().items():
        if key != "_extra_state":
            torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(full["_extra_state"], expected.state_dict()["_extra_state"])
    with torch.no_grad():
        torch.testing.assert_close(ranks[0]["prediction"], expected(batches()[0][0]), rtol=1e-5, atol=1e-6)
    # memory: the ranks' parameter shards add up to one full average; buffers are replicated
    full_param_bytes = sum(p.numel() * p.element_size() for p in expected.module.parameters())
    assert sum(rank["param_bytes"] for rank in ranks) == full_param_bytes
    assert all(rank["bytes"] < expected.storage.tensor_bytes for rank in ranks)
    if "cpu" in wf.available_backends("cpu"):
        for rank in ranks:  # one fused op per update on each rank
            assert sum("wavg_fused" in op for op in rank["ops"]) == 1, rank["ops"]


# ---------------------------------------------------------------------- distributed checkpoints
def _dcp_worker(rank: int, world: int, out: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from wavg_fused.distributed import AveragerState, full_state_dict, load_full_state_dict

    saved_by_one = torch.load(out / "one_full.pt")
    model = _fully_shard(make_net(seed=7), world)
    averager = wf.Averager(model, wf.EMA(0.5))
    averager.update(model)  # a different state, about to be replaced

    # 1 -> 2 ranks: a single-process checkpoint loads into this rank's shards
    dcp.load({"avg": AveragerState(averager)}, checkpoint_id=str(out / "one"))
    assert averager.method == wf.SWA() and averager._calls == STEPS
    loaded = full_state_dict(averager)
    if rank == 0:
        for key, value in saved_by_one.items():
            assert torch.equal(loaded[key], value), key

    # the same through a gathered full state dict instead of DCP
    other = wf.Averager(model, wf.EMA(0.5))
    load_full_state_dict(other, saved_by_one)
    for name, value in _local(other.module).items():
        assert torch.equal(value, _local(averager.module)[name]), name

    # keep training the sharded model from the loaded average, then save with 2 ranks
    train(model, averager, rank, world, steps=2)
    dcp.save({"avg": AveragerState(averager)}, checkpoint_id=str(out / "two"))
    full = full_state_dict(averager)
    if rank == 0:
        torch.save(full, out / "two_full.pt")

    # 2 -> 2: a fresh averager gets exactly these shards back
    fresh = wf.Averager(model, wf.TADEMA(0.9))
    dcp.load({"avg": AveragerState(fresh)}, checkpoint_id=str(out / "two"))
    for name, value in _local(fresh.module).items():
        assert torch.equal(value, _local(averager.module)[name]), name
    assert fresh.method == wf.SWA() and int(fresh.n_averaged) == int(averager.n_averaged)


def test_dcp_round_trip_and_world_size_change(tmp_path):
    import torch.distributed.checkpoint as dcp

    from wavg_fused.distributed import AveragerState

    one = reference(wf.SWA())  # saved by a single process ...
    dcp.save({"avg": AveragerState(one)}, checkpoint_id=str(tmp_path / "one"))
    torch.save({k: v.clone() for k, v in one.state_dict().items()}, tmp_path / "one_full.pt")
    spawn(_dcp_worker, tmp_path)  # ... loaded by 2 ranks, which train on and save sharded ...

    back = wf.Averager(make_net(seed=3), wf.EMA(0.1))  # ... and loaded by one process again
    dcp.load({"avg": AveragerState(back)}, checkpoint_id=str(tmp_path / "two"))
    expected = torch.load(tmp_path / "two_full.pt")
    for key, value in back.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert back.method == wf.SWA() and int(back.n_averaged) == STEPS + 2 and back._calls == STEPS + 2


def test_dcp_checkpoint_of_another_model_changes_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp

    from wavg_fused.distributed import AveragerState

    small = wf.Averager(nn.Linear(6, 5), wf.SWA())
    dcp.save({"avg": AveragerState(small)}, checkpoint_id=str(tmp_path))
    averager = reference(wf.EMA(DECAY), steps=1)
    before = _flats(averager)
    with pytest.raises(dcp.api.CheckpointException, match="Missing key"):
        dcp.load({"avg": AveragerState(averager)}, checkpoint_id=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(before, _flats(averager)))


@pytest.mark.parametrize("staged", [False, True], ids=["in_place", "staged"])
def test_a_load_that_fails_after_reading_changes_nothing_when_staged(tmp_path, monkeypatch, staged):
    """DCP reads into the tensors ``state_dict()`` hands it, before ``load_state_dict`` runs: in
    place, a failure after the read (simulated here) leaves the averager half-loaded; staged, the
    read lands in copies and the averager is untouched until everything was read."""
    import torch.distributed.checkpoint as dcp

    from wavg_fused.distributed import AveragerState

    saved = reference(wf.EMA(DECAY), steps=3)
    dcp.save({"avg": AveragerState(saved)}, checkpoint_id=str(tmp_path))
    averager = reference(wf.EMA(DECAY), steps=1)
    before = _flats(averager)

    def fail(*args, **kwargs):
        raise OSError("the last read failed")

    monkeypatch.setattr(averager, "load_state_dict", fail)
    with pytest.raises(OSError, match="the last read failed"):
        dcp.load({"avg": AveragerState(averager, staged=staged)}, checkpoint_id=str(tmp_path))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _flats(averager)))
    assert unchanged == staged
    monkeypatch.undo()
    dcp.load({"avg": AveragerState(averager, staged=True)}, checkpoint_id=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(_flats(saved), _flats(averager)))


# ---------------------------------------------------------------------- what is not supported
def test_deepspeed_zero3_parameters_are_refused_with_a_clear_error():
    model = nn.Linear(4, 4)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO-3 tags its partitioned placeholders with
    model.weight.ds_tensor = torch.zeros(8)
    with pytest.raises(NotImplementedError, match="'weight' is partitioned by DeepSpeed ZeRO-3"):
        wf.Averager(model, wf.EMA(0.9))


def test_dcp_saves_and_loads_the_averager_itself(tmp_path):
    """``_extra_state`` keeps its size as the call count grows (space-padded JSON), so the
    averager passes to DCP as it is, a module being a ``Stateful``, across a count of 9 -> 10."""
    import torch.distributed.checkpoint as dcp

    saved = reference(wf.EMA(DECAY), steps=10)
    dcp.save({"avg": saved}, checkpoint_id=str(tmp_path))
    fresh = reference(wf.EMA(DECAY), steps=9)
    assert fresh.state_dict()["_extra_state"].shape == saved.state_dict()["_extra_state"].shape
    dcp.load({"avg": fresh}, checkpoint_id=str(tmp_path))
    assert fresh._calls == 10 and int(fresh.n_averaged) == 10
    assert all(torch.equal(a, b) for a, b in zip(_flats(saved), _flats(fresh)))

"""The Triton backend's device handling: Triton launches on the *current* CUDA device and stream,
so a plan on another device must enter its own. The guard's logic is checked on the CPU (with
``torch.cuda``'s device functions replaced); the launch itself needs two GPUs."""

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import wavg_fused as wf

pytest.importorskip("triton")
kernel = pytest.importorskip("wavg_fused.triton.kernel")


class _Devices:
    """Stands in for torch.cuda.current_device / torch.cuda.device: records what is entered."""

    def __init__(self, current: int) -> None:
        self.current = current
        self.entered: list[int] = []

    def current_device(self) -> int:
        return self.current

    def device(self, index: int):
        devices = self

        class Guard:
            def __enter__(self):
                devices.entered.append(index)
                self.previous, devices.current = devices.current, index

            def __exit__(self, *exc):
                devices.current = self.previous

        return Guard()


@pytest.fixture
def devices(monkeypatch):
    fake = _Devices(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


def test_a_plan_on_another_device_is_launched_there(devices):
    with kernel._device_guard(torch.device("cuda", 1)):
        assert devices.current == 1
    assert devices.entered == [1] and devices.current == 0


@pytest.mark.parametrize("device", [torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda")])
def test_no_guard_where_the_device_is_current(devices, device):
    assert isinstance(kernel._device_guard(device), nullcontext)
    assert devices.entered == []


def test_launch_enters_the_tables_device(devices, monkeypatch):
    seen = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(devices.current)

    class CudaTable:  # a table whose .device says cuda:1 (no CUDA tensor can exist here)
        def __init__(self, table):
            self.table, self.device, self.shape = table, torch.device("cuda", 1), table.shape

    monkeypatch.setattr(kernel, "_wavg_update_kernel", FakeKernel())
    table, blocks = torch.zeros(1, 9, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)
    n, workspace = torch.zeros((), dtype=torch.int64), torch.zeros(2, dtype=torch.int32)
    kernel.launch(CudaTable(table), blocks, table[0], n, workspace, 0, (0.9,), -1, True, 1024, 4)
    assert seen == [1] and devices.current == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_update_on_cuda1_while_cuda0_is_current():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 7)).to("cuda:1")
    with torch.cuda.device(0):
        fused = wf.Averager(model, wf.EMA(0.9), backend="triton")
        plain = wf.Averager(copy.deepcopy(model), wf.EMA(0.9), backend="torch")
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            fused.update(model)
            plain.update(model)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert int(fused.n_averaged) == 3
    for a, b in zip(fused.module.parameters(), plain.module.parameters()):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(a.dtype).eps, atol=0)

"""update() never reads a device value on the host: every such read raises here."""

import copy

import pytest
import torch
from conftest import DTYPES, cached_run

import wavg_fused as wf

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__")


@pytest.fixture
def host_reads_raise(monkeypatch):
    def forbid(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"update read a tensor on the host: Tensor.{name}")

        return read

    def arm():
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return arm


def test_the_guard_itself_catches_reads(host_reads_raise):
    host_reads_raise()
    with pytest.raises(AssertionError, match="Tensor.item"):
        torch.tensor(1).item()
    with pytest.raises(AssertionError, match="__bool__"):
        bool(torch.tensor(1) == 0)


@pytest.mark.parametrize("dtype", [DTYPES["fp32"], DTYPES["bf16"]], ids=["fp32", "bf16"])
def test_update_never_reads_device_values(host_reads_raise, method, backend, dtype):
    initial, states = cached_run("cnn")
    model = copy.deepcopy(initial).to(dtype)
    avg = wf.Averager(model, method, use_buffers=True, dtype=torch.float32, backend=backend)
    host_reads_raise()  # armed before the first update: plan building is checked too
    for state in states[:4]:
        with torch.no_grad():
            for p, v in zip(model.state_dict().values(), state.values()):
                p.copy_(v)
        avg.update(model)

"""The backend registry: one place decides, explicit requests never fall back silently."""

import pytest
import torch
from torch import nn

import wavg_fused as wf
from wavg_fused.backends import registry


def test_torch_is_always_available():
    assert "torch" in wf.available_backends("cpu")
    assert registry.select_backend("auto", "cpu").name == wf.available_backends("cpu")[0]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        registry.select_backend("fastest", "cpu")


def test_unavailable_backend_raises_with_the_reason():
    unavailable = [n for n in registry.BACKEND_NAMES if n not in wf.available_backends("cpu")]
    if not unavailable:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"backend {unavailable[0]!r} is unavailable on cpu: .+"):
        wf.Averager(nn.Linear(2, 2), wf.EMA(0.9), backend=unavailable[0])


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.select_backend("auto", "cpu").name == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        wf.Averager(nn.Linear(2, 2), wf.EMA(0.9))
    assert registry.select_backend("torch", "cpu").name == "torch"  # explicit argument wins


def test_report_names_every_backend():
    report = wf.backend_report()
    assert f"torch {torch.__version__}" in report
    for name in registry.BACKEND_NAMES:
        assert f"  {name}" in report

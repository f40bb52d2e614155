"""The backend registry: one place decides, explicit requests never fall back silently."""

import os
import platform
import subprocess
import sys

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


needs_ext = pytest.mark.skipif("cpu" not in wf.available_backends("cpu"), reason="the compiled extension is not built")


def _isa_this_cpu_supports() -> str:
    """The widest CPU kernel build this machine can run, read from /proc/cpuinfo (the kernel asks
    the CPU itself, through __builtin_cpu_supports: two sources that must agree)."""
    flags = set(open("/proc/cpuinfo").read().split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"


def _report_in_subprocess(**env) -> str:
    run = subprocess.run([sys.executable, "-c", "import wavg_fused; print(wavg_fused.backend_report())"],
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@needs_ext
def test_report_names_the_cpu_kernel_that_runs():
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("the expected kernel is read from x86 /proc/cpuinfo flags")
    expected = os.environ.get("WAVG_FUSED_CPU_ISA") or _isa_this_cpu_supports()
    assert f"compiled extension: CPU kernel {expected}" in wf.backend_report()
    assert "CPU kernel default (forced by WAVG_FUSED_CPU_ISA='default')" in _report_in_subprocess(WAVG_FUSED_CPU_ISA="default")
    bad = _report_in_subprocess(WAVG_FUSED_CPU_ISA="sse9")  # the report still prints, saying why
    assert "CPU kernel none (WAVG_FUSED_CPU_ISA must be default, avx2 or avx512, got sse9)" in bad


@needs_ext
def test_report_says_whether_cuda_kernels_were_compiled_in():
    # independent of the dispatcher: a library with device code carries nvcc's fat binary section
    with open(wf._C.__file__, "rb") as library:
        has_device_code = b".nv_fatbin" in library.read()
    assert f"CUDA kernels compiled in: {'yes' if has_device_code else 'no'}" in wf.backend_report()


def test_report_falls_back_for_an_older_or_missing_extension(monkeypatch):
    if "cpu" in wf.available_backends("cpu"):
        monkeypatch.delattr(wf._C, "cpu_kernel_isa", raising=False)  # as an extension built before it
        assert "CPU kernel unknown (this build of the extension predates cpu_kernel_isa)" in wf.backend_report()
    monkeypatch.setitem(sys.modules, "wavg_fused._C", None)  # import now fails, as with no build
    report = wf.backend_report()
    assert "compiled extension: not loaded (ModuleNotFoundError: " in report and "wavg_fused._C" in report
    assert "  torch         cpu: available" in report

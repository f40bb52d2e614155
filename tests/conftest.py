import functools
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import wavg_fused as wf  # noqa: E402
from models import training_run  # noqa: E402

# every backend that runs on CPU tensors, test tools too: cuda-emulated runs the CUDA kernel's code
CPU_BACKENDS = wf.available_backends("cpu", include_test_tools=True)
# Backends whose fp32 lerp rounds as torch's CPU lerp does, bit for bit. The cpu kernel fuses its
# multiply-adds where torch does (both are built per instruction set); cuda-emulated always fuses
# (explicit fma, as the GPU does), so it is exact where torch's CPU lerp fuses too (AVX2/AVX-512).
# The Triton interpreter (numpy) multiplies and adds separately: an ulp per update.
TORCH_CPU_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
EXACT_BACKENDS = {"cpu", "torch"} | ({"cuda-emulated"} if TORCH_CPU_FMA else set())
METHODS = {"ema": wf.EMA(0.9), "swa": wf.SWA(), "tadema": wf.TADEMA(0.9)}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = 55


@functools.lru_cache(maxsize=1)
def cpu_kernel_fma() -> bool:
    """Whether the ``cpu`` kernel fuses its multiply-adds (its AVX2 and AVX-512 builds do) as the
    ``cuda-emulated`` backend always does (explicit fma, as the GPU): then the two agree bit for
    bit for every method, since both compute w_n with the same host code and libm."""
    forced = os.environ.get("WAVG_FUSED_CPU_ISA", "")
    if forced:
        return forced != "default"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # compilers contract there by default, FMA being part of the base ISA
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return "avx2" in flags and "fma" in flags


@functools.lru_cache(maxsize=None)
def cached_run(kind: str):
    return training_run(kind, STEPS)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=list(METHODS), ids=list(METHODS))
def method(request):
    return METHODS[request.param]


# Modules whose every test needs a GPU; elsewhere a CUDA-only test carries @pytest.mark.gpu itself.
_GPU_MODULES = {"test_cuda.py", "test_triton_gpu.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in _GPU_MODULES:
            item.add_marker(pytest.mark.gpu)

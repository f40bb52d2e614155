import functools
import os
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

CPU_BACKENDS = wf.available_backends("cpu")
METHODS = {"ema": wf.EMA(0.9), "swa": wf.SWA(), "tadema": wf.TADEMA(0.9)}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = 55


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

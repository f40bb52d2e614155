"""Settings of the pytest-benchmark suite, from the environment (pytest's own options stay free).

WAVG_BENCH_MODELS  comma-separated zoo models (default: the quick set, 2000x1k and resnet50)
WAVG_BENCH_DEVICE  cpu or cuda (default: cuda when there is one)
"""

import os

import pytest
import torch

from wavg_fused.bench.zoo import QUICK


def bench_models() -> list[str]:
    return os.environ.get("WAVG_BENCH_MODELS", ",".join(QUICK)).split(",")


def bench_device() -> str:
    return os.environ.get("WAVG_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> str:
    return bench_device()

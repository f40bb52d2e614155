"""One averaging update per zoo model, dtype case and peer, under pytest-benchmark.

    pytest benchmarks --benchmark-only                         # time the quick set
    pytest benchmarks --benchmark-only --benchmark-autosave \
        --benchmark-storage=benchmarks/results/history         # keep a run for later comparison
    pytest benchmarks --benchmark-only --benchmark-compare \
        --benchmark-storage=benchmarks/results/history         # compare with the last kept run

Each group is one case; compare rows within a group. ``wavg-fused bench`` times the same cases
interleaved and adds the ratios, launch counts and the plot.
"""

import pytest
import torch

from conftest import bench_device, bench_models
from wavg_fused.bench.cli import VARIANTS
from wavg_fused.bench.peers import Unsupported, make_peers, warm_up
from wavg_fused.bench.timing import count_launches, model_bytes
from wavg_fused.bench.zoo import build

PEERS = [peer.name for peer in make_peers(bench_device())]
CASES = [(model, variant) for model in bench_models() for variant in VARIANTS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{v.replace('/', '_')}" for m, v in CASES])
def case(request, device):
    name, variant = request.param
    model_dtype, shadow_dtype = VARIANTS[variant]
    return name, variant, build(name, device, model_dtype), shadow_dtype


@pytest.mark.parametrize("peer_index", range(len(PEERS)), ids=PEERS)
def test_update(benchmark, case, device, peer_index):
    name, variant, model, shadow_dtype = case
    peer = make_peers(device)[peer_index]
    try:
        warm_up(peer, model, shadow_dtype)
    except Unsupported as error:
        pytest.skip(f"{peer.name}: {error}")
    cuda = device == "cuda"

    def step():
        peer.step(model)
        if cuda:  # time the device work, not just the launch
            torch.cuda.synchronize()

    benchmark.group = f"{name} {variant} ({device})"
    benchmark.extra_info.update(
        peer=peer.name, bytes=model_bytes(model, shadow_dtype), launches=count_launches(lambda: peer.step(model), cuda)
    )
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)

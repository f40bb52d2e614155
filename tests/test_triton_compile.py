"""The Triton kernel compiles for a real GPU target (sm_90) even where no GPU is present, so a
GPU-only compile error fails here rather than on the first lent GPU. It compiles what runs: every
variant the backend launches (``triton_backend.gpu_variants``), with the signature, constexprs
and specialisation Triton derives from the arguments ``kernel.launch_args`` builds for a launch.
Runs in one subprocess: the test session defines kernels under the interpreter."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = """
import concurrent.futures, json, multiprocessing, os, re
from wavg_fused.backends.triton_backend import gpu_variants
from wavg_fused.triton import aot

def compile_one(index):
    name, fn, args, kwargs = gpu_variants()[index]
    ptx = aot.compile_launch(fn, args, kwargs, aot.SM90).asm["ptx"]
    return name, {"ld_v4": len(re.findall(r"ld\\.global(?:\\.\\w+)*\\.v4", ptx)),
                  "st_v4": len(re.findall(r"st\\.global(?:\\.\\w+)*\\.v4", ptx)),
                  "atomic": "atom.global" in ptx}

# one process per variant, as many at once as there are cores: each compile is single-threaded
context = multiprocessing.get_context("fork")
with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
    out = dict(pool.map(compile_one, range(len(gpu_variants()))))
print(json.dumps(out))
"""


def test_every_launched_variant_compiles_for_sm90_with_vector_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=1500)
    if result.returncode != 0 and "ptxas" in result.stderr.lower() and "not found" in result.stderr.lower():
        pytest.skip("this Triton build ships no ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    variants = json.loads(result.stdout.splitlines()[-1])
    assert sorted(variants) == sorted(
        ["update-1024", "update-stochastic-1024", "update-4096", "update-stochastic-4096", "transfer-4096",
         "check-4096", "group-1024", "group-stochastic-1024"]
    )
    for name, found in variants.items():
        # 16-byte loads in every pass (the check only reads); stores wherever the pass writes
        assert found["ld_v4"] > 0, (name, found)
        assert (found["st_v4"] > 0) == (not name.startswith("check")), (name, found)
        # only the updates count finished programs (the last one bumps the counters)
        assert found["atomic"] == name.startswith(("update", "group")), (name, found)


def test_launch_args_are_never_specialised_per_call():
    """Values that change per call or per plan (block count, method, parameters, seed, flags)
    give one compile key: Triton would compile once per variant, never per value."""
    import torch

    from wavg_fused.triton import aot, kernel

    table = torch.zeros(2, 9, dtype=torch.int64)
    n = torch.zeros((), dtype=torch.int64)
    workspace = torch.zeros(2, dtype=torch.int32)
    keys = set()
    for num_blocks, method, params, bump, guard in [(1, 0, (0.9,), True, False), (16, 1, (), False, True),
                                                   (33, 2, (1.0,), True, True), (4096, 4, (7.0, 1.0, 16.0, 0.0),
                                                                                 False, False)]:
        for seed in (0, 1, 16, 2**40 + 3, 2**63 - 1):
            blocks = torch.zeros(num_blocks, 2, dtype=torch.int64)
            # an 8-byte aligned view: pointers are not specialised on alignment either
            skipped = torch.zeros(3, dtype=torch.int64)[1] if guard else None
            args, kwargs = kernel.launch_args(table, blocks, table, n, workspace, method, params, seed, bump, 1024, 4,
                                              0, guard, skipped)
            keys.add(aot.compile_key(kernel._wavg_update_kernel, args, kwargs))
    assert len(keys) == 1, keys


def test_gpu_block_follows_the_typical_tensor():
    from wavg_fused.backends.triton_backend import _gpu_config
    from wavg_fused.plan import MODE_CHECK, MODE_SWAP

    assert _gpu_config([1000] * 2000) == (1024, 4)
    assert _gpu_config([2048] * 10) == (1024, 4)
    assert _gpu_config([3] + [10**6] * 5) == (4096, 8)
    assert _gpu_config([]) == (1024, 4)
    assert _gpu_config([1000] * 2000, MODE_CHECK) == _gpu_config([1000] * 2000, MODE_SWAP) == (4096, 8)


def test_group_launch_args_are_never_specialised_per_call():
    """The group kernel: block count, member count and whether any counter is bumped give one
    compile key per STOCHASTIC (its two variants in ``gpu_variants``)."""
    import torch

    from wavg_fused.triton import aot, kernel

    workspace = torch.zeros(2, dtype=torch.int32)
    keys = {False: set(), True: set()}
    for num_blocks, members, flags in [(1, 2, [3, 3]), (16, 3, [2, 0, 1]), (33, 8, [3] * 8), (4096, 5, [0] * 5)]:
        table = torch.zeros(7 * members, 9, dtype=torch.int64)
        member_table = torch.zeros(members, len(kernel.MEMBER_COLUMNS), dtype=torch.int64)
        blocks = torch.zeros(num_blocks, 2, dtype=torch.int64)
        for stochastic in keys:
            args, kwargs = kernel.launch_group_args(table, blocks, table[0], member_table, workspace, flags, stochastic,
                                                    1024, 4)
            keys[stochastic].add(aot.compile_key(kernel._wavg_group_kernel, args, kwargs))
    assert len(keys[False]) == len(keys[True]) == 1 and keys[False] != keys[True], keys

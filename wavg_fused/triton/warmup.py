"""Compile every Triton kernel variant the package launches, in parallel processes, before use.

    python -m wavg_fused.triton.warmup --device cuda

One compile of the update kernel for sm_90 takes tens of seconds, and Triton compiles a variant
when it is first launched; a test session or a training run would otherwise pay for them one after
another. Each scenario below runs the public API on a tiny model in its own process, so the
variants compile side by side into Triton's on-disk cache, where every later process finds them.
With ``--device cpu`` the scenarios run under the Triton interpreter (nothing compiles): the
GPU suite's dry run checks the script that way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

SCENARIOS = ("update", "guarded", "stochastic", "copy_to", "swap", "swap_backup", "group", "group_stochastic")
# Tensor sizes that select each block size the update can use (triton_backend._gpu_config:
# 1024 up to 2048-element tensors, 4096 above); transfers, the check and the group kernel use one.
SIZES = (1000, 100_000)


def _model(numel: int, dtype):
    import torch

    torch.manual_seed(0)
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(numel, dtype=dtype)) for _ in range(3)])


def run_scenario(scenario: str, numel: int, device: str) -> str:
    """One use of the Triton backend that launches ``scenario``'s kernel variants."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this process
    import torch

    import wavg_fused as wf

    dtype = torch.bfloat16 if scenario in ("stochastic", "swap_backup", "group_stochastic") else torch.float32
    model = _model(numel, dtype).to(device)
    kwargs = {"skip_nonfinite": scenario == "guarded", "stochastic_rounding": scenario == "stochastic"}
    if scenario == "swap_backup":
        kwargs["dtype"] = torch.float32  # an fp32 average of a bf16 model swaps in through a backup
    start = time.perf_counter()
    if scenario.startswith("group"):  # AveragerGroup's one launch for every member
        group = wf.AveragerGroup(model, {"a": wf.EMA(0.9), "b": wf.SWA()}, backend="triton",
                                 stochastic_rounding=scenario == "group_stochastic")
        group.update(model)
        group.update(model)
        if device == "cuda":
            torch.cuda.synchronize()
        return f"{scenario} numel={numel}: {time.perf_counter() - start:.1f} s"
    avg = wf.Averager(model, wf.EMA(0.9), backend="triton", **kwargs)
    avg.update(model)
    avg.update(model)
    if scenario == "copy_to":
        avg.copy_to(model)
    elif scenario.startswith("swap"):
        with avg.swapped(model):
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    return f"{scenario} numel={numel}: {time.perf_counter() - start:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    jobs = [(s, n) for s in SCENARIOS for n in (SIZES if s in ("update", "stochastic") else SIZES[-1:])]
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_scenario, s, n, args.device): (s, n) for s, n in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                print(future.result(), flush=True)
            except Exception as error:
                failed += 1
                print(f"{futures[future]}: FAILED {type(error).__name__}: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

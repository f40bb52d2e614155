"""Shadow memory and update time per rank: FSDP2 (2 ranks, gloo, CPU) against one process.

    python benchmarks/distributed_cpu.py [--width 512] [--layers 6] [--updates 60] [--out results.json]

Each rank holds its shards of the average and updates them with one fused launch, no collective;
the single-process rows are the same model unsharded, with 1 thread (what each rank has here)
and with 2 (the whole machine). Times are medians of ``--updates`` timed updates after a warm-up,
each after ``--flush-mb`` MB were written (a training step's worth of cache traffic; 0: hot caches).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wavg_fused as wf  # noqa: E402


def make_model(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.LayerNorm(width)]
    return nn.Sequential(*blocks)


def time_updates(averager: wf.Averager, model: nn.Module, updates: int, flush_mb: int, barrier=None) -> float:
    for _ in range(5):
        averager.update(model)
    # Between two updates a training step streams activations and gradients through the caches:
    # rewriting `flush_mb` MB before each sample puts the update back in that state (0: hot caches)
    scratch = torch.empty(flush_mb * 2**18) if flush_mb else None
    samples = []
    for _ in range(updates):
        if scratch is not None:
            scratch.fill_(1.0)
        if barrier is not None:
            barrier()  # ranks start each update together, as after an optimizer step
        start = time.perf_counter()
        averager.update(model)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = make_model(args.width, args.layers)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    averager = wf.Averager(model, wf.EMA(0.999))
    seconds = time_updates(averager, model, args.updates, args.flush_mb, dist.barrier)
    result = {"rank": rank, "shadow_bytes": averager.storage.nbytes, "tensor_bytes": averager.storage.tensor_bytes,
              "update_s": seconds, "backend": averager._runs[0][1].name}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.14.1 + gloo can abort in interpreter teardown; the results are written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--flush-mb", type=int, default=64, help="MB written before each timed update (0: hot caches)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = make_model(args.width, args.layers)
        averager = wf.Averager(model, wf.EMA(0.999))
        rows.append({"setup": f"1 process, {threads} thread(s)", "shadow_bytes": averager.storage.nbytes,
                     "update_s": time_updates(averager, model, args.updates, args.flush_mb), "backend": averager._runs[0][1].name})

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_rank_main, args=(args.world, port, args, out), nprocs=args.world, join=True)
        for rank in range(args.world):
            result = json.loads(Path(out, f"rank{rank}.json").read_text())
            rows.append({"setup": f"FSDP2 rank {rank} of {args.world}, 1 thread", **result})

    params = sum(p.numel() for p in make_model(args.width, args.layers).parameters())
    print(f"model: {args.layers} x (Linear({args.width}, {args.width}) + LayerNorm), {params:,} fp32 parameters; "
          f"{args.flush_mb} MB written before each update")
    print(f"{'setup':34} {'shadow bytes':>14} {'update (median)':>16}  backend")
    for row in rows:
        print(f"{row['setup']:34} {row['shadow_bytes']:>14,} {row['update_s'] * 1e3:>13.3f} ms  {row['backend']}")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "params": params,
                                        "flush_mb": args.flush_mb,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

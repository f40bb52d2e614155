"""Per-update time of the ``cpu`` backend against flat-buffer proxies, broken down (issue 14 item 2).

    python benchmarks/small_tensors_cpu.py [--model 2000x1k] [--repeats 200] [--out results.json]

Every peer runs after the same untimed *condition*, round robin within each repeat (rotating which
peer goes first), so drift on a shared machine hits all alike:

hot       back to back: the same peer once more, untimed, just before (caches and threads warm)
standin   the CLI's condition: ``timing.optimizer_step_stand_in`` (an exact ``_foreach_mul_`` by 1)
optstep   an SGD-like step first, ``torch._foreach_add_(params, grads, alpha=-1e-7)``: per-tensor
          serial work of a few ms, as an optimizer step on a many-tensor model (threads idle)
evict     a 64 MB ``fill_`` first: the update's bytes come from memory; the fill itself is a
          parallel op, so the threads were just busy
idle      2 ms of sleep first: warm caches, threads gone to sleep

Peers: ``update`` (``Averager.update``), ``watch`` (``engine.runs``: the host check that no tensor
moved), ``op`` (``torch.ops.wavg_fused.update_`` with the plan's tables, nothing else), ``lerp_``
and ``add_`` over one flat buffer of the same bytes (the limit's proxies), ``foreach lerp_`` over
the 2,000 separate tensors (same allocations as the model: what scattered tensors cost torch), and
``tiny par`` (an ``add_`` of 64K elements, two 32K grains: about the cost of entering a parallel
region from that state). ``@1`` peers run with ``torch.set_num_threads(1)`` (set before the
condition, untimed), the others with the process's default thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wavg_fused as wf  # noqa: E402
from wavg_fused.bench.timing import optimizer_step_stand_in, percentile  # noqa: E402
from wavg_fused.bench.zoo import build  # noqa: E402
from wavg_fused.plan import MODE_AVERAGE  # noqa: E402

CONDITIONS = ["hot", "standin", "optstep", "evict", "idle"]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="2000x1k", help="a wavg_fused.bench.zoo model (default 2000x1k)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--peers", default="", help="comma-separated subset of the peers (default: all)")
    parser.add_argument("--out", default="", help="write the medians as JSON here")
    args = parser.parse_args()
    conditions = args.conditions.split(",")
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    model = build(args.model)
    params = [p for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    averager = wf.Averager(model, wf.EMA(0.999), backend="cpu")
    averager.update(model)
    engine = averager._engine
    [(plan, backend)] = engine.runs(model)
    method = averager.method
    counter = torch.zeros((), dtype=torch.long)
    table, blocks = plan.tensor_table(), plan.block_table(backend.block_elems)
    models, shadow_list = plan.models, plan.shadows  # the model's own allocations, the shadows' views
    numel = sum(p.numel() for p in params)
    flat_out, flat_src = torch.linspace(0.5, 1.5, numel), torch.linspace(1.5, 0.5, numel)
    tiny_out, tiny_src = torch.ones(65536), torch.ones(65536)
    evict = torch.empty(64 << 18)  # 64 MB
    stand_in = optimizer_step_stand_in(model)

    def op() -> None:
        torch.ops.wavg_fused.update_(plan.flats, table, blocks, counter, plan.workspace, method.code,
                                     list(method.params), False, -1, MODE_AVERAGE, False, None)

    steps = {
        "update": lambda: averager.update(model),
        "watch": lambda: engine.runs(model),
        "op": op,
        "lerp_": lambda: flat_out.lerp_(flat_src, 1e-3),
        "add_": lambda: flat_out.add_(flat_src, alpha=1e-3),
        "foreach lerp_": lambda: torch._foreach_lerp_(shadow_list, models, 1e-3),
        "tiny par": lambda: tiny_out.add_(tiny_src, alpha=1e-3),
    }
    peers = [(name, threads) for name in steps] + [(name, 1) for name in ("update", "op", "lerp_", "foreach lerp_")]
    if threads == 1:
        peers = [(name, 1) for name in steps]
    if args.peers:
        wanted = args.peers.split(",")
        peers = [p for p in peers if label(*p, threads) in wanted]

    def before(condition: str, step) -> None:
        if condition == "hot":
            step()
        elif condition == "standin":
            stand_in()
        elif condition == "optstep":
            torch._foreach_add_(params, grads, alpha=-1e-7)
        elif condition == "evict":
            evict.fill_(1.0)
        elif condition == "idle":
            time.sleep(0.002)

    samples = {(c, label(*p, threads)): [] for c in conditions for p in peers}
    for _ in range(3):  # warm-up
        for name, n in peers:
            steps[name]()
    for r in range(args.repeats):
        for ci, condition in enumerate(conditions):
            for k in range(len(peers)):
                name, n = peers[(r + ci + k) % len(peers)]
                torch.set_num_threads(n)
                before(condition, steps[name])
                start = time.perf_counter()
                steps[name]()
                samples[(condition, label(name, n, threads))].append(time.perf_counter() - start)
                torch.set_num_threads(threads)

    load = os.getloadavg()
    print(f"model {args.model}: {len(params)} tensors, {numel * 4 / 2**20:.1f} MB fp32; threads {threads}; "
          f"{args.repeats} repeats; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results = {"model": args.model, "threads": threads, "repeats": args.repeats, "load": load, "rows": []}
    for condition in conditions:
        print(f"\n[{condition}]  median ms (p10)   x lerp_  x add_")
        medians = {peer: statistics.median(v) for (c, peer), v in samples.items() if c == condition}
        lerp, add = medians.get(label("lerp_", threads, threads)), medians.get(label("add_", threads, threads))
        for (c, peer), values in samples.items():
            if c != condition:
                continue
            med, p10 = medians[peer], percentile(values, 0.1)
            ratios = "".join(f"  {med / ref:6.2f}" for ref in (lerp, add) if ref)
            print(f"  {peer:18s} {med * 1e3:8.3f} ({p10 * 1e3:.3f}){ratios}")
            results["rows"].append({"condition": condition, "peer": peer, "median_ms": med * 1e3, "p10_ms": p10 * 1e3})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def label(name: str, n: int, threads: int) -> str:
    return name if n == threads else f"{name} @{n}"


if __name__ == "__main__":
    main()

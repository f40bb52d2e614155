"""``wavg-fused bench``: median time of one averaging update, per model and peer.

Peers run round-robin within each repeat, so slow drift on the machine (frequency, other
processes) hits all of them alike instead of whichever happened to run last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import wavg_fused as wf

from .peers import FlatLerp, Peer, WavgFused, make_peers, warm_up
from .zoo import MODELS, QUICK

__all__ = ["main", "conditions", "bench_model", "format_rows"]


def conditions(repeats: int, device: str = "cpu") -> dict[str, Any]:
    """The machine state the numbers depend on; printed as the table's header and saved in JSON."""
    info = {
        "wavg_fused": wf.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "repeats": repeats,
        "backends": wf.available_backends(device),
    }
    if device == "cuda":
        info["copy_GBps"] = copy_bandwidth()
    return info


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Measured device-to-device copy bandwidth in GB/s, bytes read plus bytes written (the GPU limit)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / sorted(samples)[len(samples) // 2] / 1e9


def _percentile(sorted_values: list[float], q: float) -> float:
    # Linear interpolation, defined for any non-empty sample (statistics.quantiles wants >= 2).
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _time_round_robin(peers: list[Peer], model: nn.Module, repeats: int) -> list[list[float]]:
    cuda = next(itertools.chain(model.parameters(), model.buffers())).is_cuda
    times: list[list[float]] = [[] for _ in peers]
    for r in range(repeats):
        for k in range(len(peers)):
            i = (r + k) % len(peers)  # rotate the start too, so no peer always runs first
            if cuda:  # device time between events; the host may run ahead, so sync per sample
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                peers[i].step(model)
                end.record()
                end.synchronize()
                times[i].append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                peers[i].step(model)
                times[i].append(time.perf_counter() - start)
    return times


def bench_model(name: str, repeats: int, device: str = "cpu", copy_gbps: float | None = None) -> list[dict[str, Any]]:
    """One result row per peer for the zoo model ``name`` (times in milliseconds)."""
    model = MODELS[name]().to(device)
    tensors = [t.numel() for t in itertools.chain(model.parameters(), model.buffers())]
    nbytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    peers = make_peers(device)
    for peer in peers:
        warm_up(peer, model)
    times = _time_round_robin(peers, model, repeats)

    rows = []
    for peer, samples in zip(peers, times):
        ms = sorted(1e3 * t for t in samples)
        rows.append({
            "model": name,
            "peer": peer.name,
            "median_ms": _percentile(ms, 0.5),
            "p10_ms": _percentile(ms, 0.1),
            "p90_ms": _percentile(ms, 0.9),
            "tensors": len(tensors),
            "numel": sum(tensors),
        })
    limit = next(row for row, p in zip(rows, peers) if isinstance(p, FlatLerp))["median_ms"]
    baseline = min(row["median_ms"] for row, p in zip(rows, peers) if not isinstance(p, (WavgFused, FlatLerp)))
    for row, peer in zip(rows, peers):
        row["x_limit"] = row["median_ms"] / limit
        row["speedup"] = baseline / row["median_ms"] if isinstance(peer, WavgFused) else None
        # an update reads the model and the average and writes the average: 3x the model's bytes
        row["GBps"] = 3 * nbytes / (row["median_ms"] / 1e3) / 1e9
        row["pct_copy_bw"] = 100 * row["GBps"] / copy_gbps if copy_gbps else None
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Plain-text table lines for ``rows`` (no header)."""
    lines = []
    for row in rows:
        speedup = f"{row['speedup']:8.2f}x" if row["speedup"] is not None else ""
        pct = f"{row['pct_copy_bw']:6.1f}%" if row.get("pct_copy_bw") is not None else ""
        lines.append(
            f"{row['model']:10s} {row['peer']:20s} {row['median_ms']:10.3f} {row['p10_ms']:10.3f} "
            f"{row['p90_ms']:10.3f} {row['x_limit']:8.2f}x {speedup:>9s} {row['GBps']:8.1f} {pct}".rstrip()
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wavg-fused", description="Benchmarks of wavg_fused weight averaging.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time one averaging update per model and peer (CPU)")
    bench.add_argument("--quick", action="store_true", help=f"models {','.join(QUICK)}, 10 repeats")
    bench.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} (default: all, or the quick set)")
    bench.add_argument("--repeats", type=int, help="timed updates per peer (default 30, quick 10)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    bench.add_argument("--json", metavar="PATH", help="also write conditions and result rows here")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model lives")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wavg-fused``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else (QUICK if args.quick else list(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    repeats = args.repeats if args.repeats is not None else (10 if args.quick else 30)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    info = conditions(repeats, args.device)
    print(
        f"# wavg-fused bench: wavg_fused {info['wavg_fused']}, torch {info['torch']}, {info['device']}, "
        f"{info['threads']} threads, {info['cpus']} CPUs, {info['date']}, {repeats} repeats, fp32 EMA"
        + (f", copy {info['copy_GBps']:.0f} GB/s" if "copy_GBps" in info else "")
    )
    columns = ("median ms", "p10 ms", "p90 ms")
    print(
        f"{'model':10s} {'peer':20s} " + " ".join(f"{c:>10s}" for c in columns)
        + f" {'x limit':>9s} {'speedup':>9s} {'GB/s':>8s}" + (" % copy" if args.device == "cuda" else "")
    )
    rows = []
    for name in names:
        model_rows = bench_model(name, repeats, args.device, info.get("copy_GBps"))
        gc.collect()  # free this model's copies (if held in cycles) before the next one is built
        print(format_rows(model_rows), flush=True)
        rows += model_rows
    print("# x limit: median / 'flat lerp_' median; speedup: the best peer's median (not wavg_fused, not the limit) / this")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": info, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

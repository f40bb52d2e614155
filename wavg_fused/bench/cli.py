"""``wavg-fused bench``: time one averaging update per model, dtype case and peer, side by side.

``wavg-fused bench --quick`` is the short run (under a minute on a 2-core CPU);
``wavg-fused bench --device cuda`` the GPU one; ``wavg-fused plot results.json`` redraws a figure.
Results go to ``benchmarks/results/<device>-<date>.json`` (and ``.png``) when that folder exists.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import wavg_fused as wf

from .peers import FlatLerp, Unsupported, WavgFused, make_peers, warm_up
from .progress import Progress
from .timing import copy_bandwidth, count_launches, model_bytes, percentile, time_round_robin
from .zoo import LARGE, MODELS, QUICK, build

__all__ = ["main", "conditions", "bench_case", "format_rows", "VARIANTS"]

VARIANTS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),  # fp32 model, fp32 average
    "bf16/fp32": (torch.bfloat16, torch.float32),  # bf16 model, fp32 average (mixed precision)
}
RESULTS_DIR = Path("benchmarks") / "results"


def conditions(repeats: int, device: str = "cpu") -> dict[str, Any]:
    """The machine state the numbers depend on; printed as the table's header and saved in JSON."""
    info = {
        "wavg_fused": wf.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "repeats": repeats,
        "method": "EMA(0.999), use_buffers=False",
        "backends": wf.available_backends(device),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["copy_GBps"] = copy_bandwidth()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def device_slug(info: dict[str, Any]) -> str:
    """``cpu-2core`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``: the results file's prefix."""
    if info["device"] == "cpu":
        return f"cpu-{info['cpus']}core"
    return re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")


def bench_case(name: str, variant: str, repeats: int, device: str = "cpu", copy_gbps: float | None = None,
               progress: Progress | None = None) -> list[dict[str, Any]]:
    """One result row per peer for zoo model ``name`` in dtype case ``variant`` (times in ms)."""
    model_dtype, shadow_dtype = VARIANTS[variant]
    model = build(name, device, model_dtype)
    cuda = device == "cuda"
    tensors = list(model.parameters()) + list(model.buffers())
    nbytes = model_bytes(model, shadow_dtype)
    label = f"{name} {variant}"

    peers, skipped = [], {}
    for peer in make_peers(device):
        try:
            warm_up(peer, model, shadow_dtype)
            peers.append(peer)
        except Unsupported as error:
            skipped[peer.name] = str(error)
        if progress:
            progress.tick(f"{label}: set up {peer.name}")
    launches = [count_launches(lambda p=peer: p.step(model), cuda) for peer in peers]
    tick = (lambda: progress.tick(f"{label}: timing")) if progress else None
    samples = time_round_robin([lambda p=peer: p.step(model) for peer in peers], repeats, cuda, tick)

    common = {"model": name, "variant": variant, "tensors": len(tensors), "numel": sum(t.numel() for t in tensors),
              "bytes": nbytes}
    rows = []
    for peer, sample, launch_count in zip(peers, samples, launches):
        ms = [1e3 * t for t in sample.device]
        rows.append({
            **common,
            "peer": peer.name,
            "median_ms": percentile(ms, 0.5),
            "p10_ms": percentile(ms, 0.1),
            "p90_ms": percentile(ms, 0.9),
            "host_ms": percentile([1e3 * t for t in sample.host], 0.5),
            "launches": launch_count,
        })
    limit = next(row for row, p in zip(rows, peers) if isinstance(p, FlatLerp))["median_ms"]
    baselines = [row["median_ms"] for row, p in zip(rows, peers) if not isinstance(p, (WavgFused, FlatLerp))]
    for row, peer in zip(rows, peers):
        row["pct_limit"] = 100 * limit / row["median_ms"]
        row["speedup"] = min(baselines) / row["median_ms"] if isinstance(peer, WavgFused) and baselines else None
        row["GBps"] = nbytes / (row["median_ms"] / 1e3) / 1e9
        row["pct_copy_bw"] = 100 * row["GBps"] / copy_gbps if copy_gbps else None
    for peer_name, reason in skipped.items():
        rows.append({**common, "peer": peer_name, "unsupported": reason})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Plain-text table lines for ``rows`` (no header)."""
    lines = []
    for row in rows:
        case = f"{row['model']:10s} {row['variant']:9s} {row['peer']:23s}"
        if "unsupported" in row:
            lines.append(f"{case} {'n/a: ' + row['unsupported']}")
            continue
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else ""
        copy = f"{row['pct_copy_bw']:6.1f}%" if row.get("pct_copy_bw") is not None else ""
        lines.append(
            f"{case} {row['median_ms']:9.3f} {row['p10_ms']:9.3f} {row['p90_ms']:9.3f} {row['host_ms']:9.3f} "
            f"{row['launches']:8d} {row['GBps']:7.1f} {row['pct_limit']:6.1f}% {speedup:>8s} {copy}".rstrip()
        )
    return "\n".join(lines)


HEADER = (f"{'model':10s} {'variant':9s} {'peer':23s} {'median ms':>9s} {'p10 ms':>9s} {'p90 ms':>9s} "
          f"{'host ms':>9s} {'launches':>8s} {'GB/s':>7s} {'%limit':>7s} {'speedup':>8s}")
LEGEND = ("# %limit: 'flat lerp_' median / this median (100% = one torch op over one flat buffer); "
          "speedup: the fastest peer that is not wavg_fused / this; launches: kernels (GPU) or "
          "top-level operator calls (CPU) per update, from torch.profiler; host ms: until update() returns")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wavg-fused", description="Benchmarks of wavg_fused weight averaging.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time one averaging update per model, dtype case and peer")
    bench.add_argument("--quick", action="store_true", help=f"models {','.join(QUICK)}, 10 repeats")
    bench.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} "
                       f"(default: all but {','.join(LARGE)} on a CPU, or the quick set)")
    bench.add_argument("--variants", help=f"comma-separated, from {','.join(VARIANTS)} (default: all)")
    bench.add_argument("--repeats", type=int, help="timed updates per peer (default 30, quick 10)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model lives")
    bench.add_argument("--json", metavar="PATH", help=f"write conditions and rows here (default: "
                       f"{RESULTS_DIR}/<device>-<date>[-quick].json when that folder exists)")
    bench.add_argument("--plot", metavar="PATH", help="draw the figure here (default: beside the JSON, .png)")
    bench.add_argument("--no-save", action="store_true", help="print the table only")
    plot = commands.add_parser("plot", help="draw the figure of a results JSON")
    plot.add_argument("results", help="a JSON written by bench")
    plot.add_argument("-o", "--output", help="PNG path (default: the JSON's, .png)")
    table = commands.add_parser("table", help="print a results JSON as the README's Markdown table")
    table.add_argument("results", help="a JSON written by bench")
    return parser


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    default_models = QUICK if args.quick else [m for m in MODELS if args.device == "cuda" or m not in LARGE]
    names = args.models.split(",") if args.models else default_models
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for kind, chosen, known in (("model", names, MODELS), ("variant", variants, VARIANTS)):
        unknown = [n for n in chosen if n not in known]
        if unknown:
            parser.error(f"unknown {kind}(s) {unknown}; choose from {list(known)}")
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
        f"{info['threads']} threads, {info['cpus']} CPUs, {info['date']}, {repeats} repeats, {info['method']}"
        + (f", copy {info['copy_GBps']:.0f} GB/s" if "copy_GBps" in info else "")
    )
    print(HEADER + (" %copy" if args.device == "cuda" else ""))
    cases = [(n, v) for n in names for v in variants]
    progress = Progress(len(cases) * (len(make_peers(args.device)) + repeats))
    rows = []
    for name, variant in cases:
        case_rows = bench_case(name, variant, repeats, args.device, info.get("copy_GBps"), progress)
        gc.collect()  # free this model's copies (if held in cycles) before the next one is built
        if args.device == "cuda":
            torch.cuda.empty_cache()
        progress.close()
        print(format_rows(case_rows), flush=True)
        rows += case_rows
    print(LEGEND)

    json_path = args.json
    if json_path is None and not args.no_save and RESULTS_DIR.is_dir():
        json_path = str(RESULTS_DIR / f"{device_slug(info)}-{info['date'][:10]}{'-quick' if args.quick else ''}.json")
    if json_path and not args.no_save:
        with open(json_path, "w") as f:
            json.dump({"conditions": info, "results": rows}, f, indent=2)
        print(f"# wrote {json_path}")
        _draw(json_path, args.plot or str(Path(json_path).with_suffix(".png")))
    elif args.plot:
        parser.error("--plot needs the results saved (--json PATH)")
    return 0


def _draw(json_path: str, png_path: str) -> None:
    from .plot import plot_results

    try:
        plot_results(json_path, png_path)
    except ImportError:
        print("# no plot: matplotlib is not installed (pip install 'wavg_fused[bench]')")
        return
    print(f"# wrote {png_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wavg-fused``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "table":
        from .report import main_table

        print(main_table(args.results))
        return 0
    if args.command == "plot":
        _draw(args.results, args.output or str(Path(args.results).with_suffix(".png")))
        return 0
    return _bench(args, parser)


if __name__ == "__main__":
    sys.exit(main())

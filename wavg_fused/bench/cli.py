"""``wavg-fused bench``: time one averaging update per model, dtype case and peer, side by side.

``wavg-fused bench --quick`` is the short run (under a minute on a 2-core CPU);
``wavg-fused bench --device cuda`` the GPU one; ``wavg-fused plot results.json`` redraws a figure.
Results go to ``benchmarks/results/<device>-<date>.json`` (and ``.png``) when run at the
repository's root, and to the current folder anywhere else, and the run says where; ``--no-save``
keeps nothing. Arguments (models, output folders, matplotlib for ``--plot``) are checked before
anything is timed; a bad one is a one-line error and a non-zero exit status.
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
from typing import Any, NoReturn

import torch

import wavg_fused as wf

from .limit import COPY_BANDWIDTH, FlatFused, FlatOp, limit_row
from .peers import Unsupported, WavgFused, make_peers, warm_up
from .progress import Progress
from .report import ResultsError
from .timing import copy_bandwidth, count_launches, model_bytes, optimizer_step_stand_in, percentile, time_round_robin
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
    before = None if cuda else optimizer_step_stand_in(model)  # a GPU sample follows an L2 flush instead
    samples = time_round_robin([lambda p=peer: p.step(model) for peer in peers], repeats, cuda, tick, before)

    common = {"model": name, "variant": variant, "tensors": len(tensors), "numel": sum(t.numel() for t in tensors),
              "bytes": nbytes}
    rows, proxy_rows = [], []
    for peer, sample, launch_count in zip(peers, samples, launches):
        ms = [1e3 * t for t in sample.device]
        row = {
            **common,
            "peer": peer.name,
            "median_ms": percentile(ms, 0.5),
            "p10_ms": percentile(ms, 0.1),
            "p90_ms": percentile(ms, 0.9),
            "host_ms": percentile([1e3 * t for t in sample.host], 0.5),
            "launches": launch_count,
        }
        (proxy_rows if isinstance(peer, (FlatOp, FlatFused)) else rows).append(row)
    # on a GPU the copy bandwidth measured at start-up is a limit too (moving these bytes at it)
    copy_ms = {COPY_BANDWIDTH: nbytes / (copy_gbps * 1e9) * 1e3} if copy_gbps else None
    rows.append(limit_row(proxy_rows, copy_ms))
    limit = rows[-1]["median_ms"]
    ours = {p.name for p in peers if isinstance(p, WavgFused)}
    baselines = [row["median_ms"] for row in rows[:-1] if row["peer"] not in ours]
    for row in rows:
        row["pct_limit"] = 100 * limit / row["median_ms"]
        row["speedup"] = min(baselines) / row["median_ms"] if row["peer"] in ours and baselines else None
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
        if "proxies" in row:
            proxies = ", ".join(f"{name} {ms:.3f}" for name, ms in row["proxies"].items())
            lines.append(f"{'':20s} # limit = {row['proxy']}, the fastest of: {proxies} ms")
    return "\n".join(lines)


HEADER = (f"{'model':10s} {'variant':9s} {'peer':23s} {'median ms':>9s} {'p10 ms':>9s} {'p90 ms':>9s} "
          f"{'host ms':>9s} {'launches':>8s} {'GB/s':>7s} {'%limit':>7s} {'speedup':>8s}")
LEGEND = ("# %limit: the limit's median / this median (limit: the fastest of several ways of moving the "
          "update's bytes through memory, timed in the same run: flat lerp_, add_, copy_, wavg_fused over one "
          "tensor; on a GPU also the copy bandwidth); "
          "speedup: the fastest peer that is not wavg_fused / this; launches: kernels (GPU) or "
          "top-level operator calls (CPU) per update, from torch.profiler; host ms: until update() returns")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wavg-fused", description="Benchmarks of wavg_fused weight averaging.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="time one averaging update per model, dtype case and peer",
        description="Time one averaging update per model, dtype case and peer, side by side. Results (JSON and "
                    f"figure) go to {RESULTS_DIR}/ when run at the repository's root, else to the current "
                    "folder; the run prints where, or that --no-save kept nothing.")
    bench.add_argument("--quick", action="store_true", help=f"models {','.join(QUICK)}, 10 repeats")
    bench.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} "
                       f"(default: all but {','.join(LARGE)} on a CPU, or the quick set)")
    bench.add_argument("--variants", help=f"comma-separated, from {','.join(VARIANTS)} (default: all)")
    bench.add_argument("--repeats", type=int, help="timed updates per peer (default 30, quick 10)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model lives")
    bench.add_argument("--json", metavar="PATH", help=f"write conditions and rows here (default: "
                       f"{RESULTS_DIR}/<device>-<date>[-quick].json at the repository's root, where that folder "
                       "exists; elsewhere <device>-<date>[-quick].json in the current folder)")
    bench.add_argument("--plot", metavar="PATH", help="draw the figure here (default: beside the JSON, .png; "
                       "drawn only when matplotlib is installed, which an explicit --plot requires)")
    bench.add_argument("--no-save", action="store_true", help="print the table only; write no file")
    plot = commands.add_parser("plot", help="draw the figure of a results JSON (needs matplotlib)")
    plot.add_argument("results", help="a JSON written by bench")
    plot.add_argument("-o", "--output", help="PNG path (default: the JSON's, .png)")
    table = commands.add_parser("table", help="print a results JSON as the README's Markdown table")
    table.add_argument("results", help="a JSON written by bench")
    return parser


MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'wavg_fused[bench]')"


def _fail(command: str, message: str, status: int = 2) -> NoReturn:
    """One line on stderr and exit: 2 for a bad argument or input file (as argparse), 1 for a
    missing requirement."""
    print(f"wavg-fused {command}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_folder(command: str, option: str, path: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        _fail(command, f"{option} {path}: folder {folder} does not exist")


def _outputs(args: argparse.Namespace, info: dict[str, Any]) -> tuple[str | None, str | None]:
    """Where the JSON and figure go, checked before anything is timed; (None, None) for --no-save.

    At the repository's root the results join the committed ones; anywhere else (an installed
    package) they land in the current folder rather than nowhere: a benchmark's output is its point.
    """
    if args.no_save:
        for option, value in (("--json", args.json), ("--plot", args.plot)):
            if value:
                _fail("bench", f"{option} and --no-save: --no-save writes no file")
        return None, None
    name = f"{device_slug(info)}-{info['date'][:10]}{'-quick' if args.quick else ''}.json"
    json_path = args.json or str(RESULTS_DIR / name if RESULTS_DIR.is_dir() else Path(name))
    _check_folder("bench", "--json", json_path)
    if args.plot:
        _check_folder("bench", "--plot", args.plot)
        if not _has_matplotlib():
            _fail("bench", f"--plot {args.plot}: {MATPLOTLIB_MISSING}", 1)
    return json_path, args.plot or str(Path(json_path).with_suffix(".png"))


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
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    info = conditions(repeats, args.device)
    json_path, png_path = _outputs(args, info)
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

    if json_path is None:
        print("# not saved (--no-save)")
        return 0
    with open(json_path, "w") as f:
        json.dump({"conditions": info, "results": rows}, f, indent=2)
    print(f"# wrote {json_path}")
    if args.plot or _has_matplotlib():  # an explicit --plot was checked above
        _draw("bench", json_path, png_path)
    else:
        print(f"# no plot: {MATPLOTLIB_MISSING}")
    return 0


def _draw(command: str, json_path: str, png_path: str) -> None:
    from .plot import plot_results

    try:
        plot_results(json_path, png_path)
    except ResultsError as error:
        _fail(command, str(error))
    except ImportError:
        _fail(command, MATPLOTLIB_MISSING, 1)
    print(f"# wrote {png_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wavg-fused``; returns the exit status (bad arguments exit with 2, as
    argparse does; a missing matplotlib for an asked-for figure with 1)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "table":
        from .report import main_table

        try:
            print(main_table(args.results))
        except ResultsError as error:
            _fail("table", str(error))
        return 0
    if args.command == "plot":
        output = args.output or str(Path(args.results).with_suffix(".png"))
        _check_folder("plot", "-o", output)
        _draw("plot", args.results, output)
        return 0
    return _bench(args, parser)


if __name__ == "__main__":
    sys.exit(main())

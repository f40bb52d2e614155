"""``EMAModel.step``: wavg_fused's diffusers drop-in against diffusers' own, same run, interleaved.

    python benchmarks/diffusers_ema.py [--models resnet50 gpt2] [--repeats 15] [--threads N] [--out results.json]

For each zoo model (``wavg_fused.bench.zoo``) and case (fp32 model and average; bf16 model with
an fp32 average, which diffusers gets from ``ema.to(dtype=torch.float32)``), every peer takes
``--warmup`` untimed steps, then all are timed round-robin (``bench.timing``) and the median is
reported. Peers: diffusers' ``EMAModel`` with its per-tensor loop (its default) and with
``foreach=True``, and the drop-in (one fused pass). All average the parameters only, with
diffusers' default schedule (``decay=0.9999``, no warm-up form): after the warm-up steps every
one of them averages, so they move the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wavg_fused as wf  # noqa: E402
from wavg_fused.bench import zoo  # noqa: E402
from wavg_fused.bench.timing import time_round_robin  # noqa: E402
from wavg_fused.integrations.diffusers import EMAModel as FusedEMAModel  # noqa: E402

CASES = {"fp32": (torch.float32, None), "bf16/fp32": (torch.bfloat16, torch.float32)}


def peers(model: torch.nn.Module, average_dtype: torch.dtype | None) -> dict[str, object]:
    from diffusers.training_utils import EMAModel

    made = {
        "diffusers EMAModel": EMAModel(model.parameters()),
        "diffusers EMAModel foreach": EMAModel(model.parameters(), foreach=True),
        "wavg_fused EMAModel": FusedEMAModel(model.parameters()),
    }
    if average_dtype is not None:
        for ema in made.values():
            ema.to(dtype=average_dtype)
    return made


def run(name: str, case: str, repeats: int, warmup: int) -> dict:
    model_dtype, average_dtype = CASES[case]
    model = zoo.build(name, dtype=model_dtype)
    emas = peers(model, average_dtype)
    steps = [lambda ema=ema: ema.step(model.parameters()) for ema in emas.values()]
    for step in steps:
        for _ in range(warmup):
            step()
    samples = time_round_robin(steps, repeats, cuda=False)
    medians = {label: statistics.median(s.device) for label, s in zip(emas, samples)}
    fused = medians["wavg_fused EMAModel"]
    best_peer = min(v for k, v in medians.items() if k != "wavg_fused EMAModel")
    params = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters())
    return {"model": name, "case": case, "parameters": params, "tensors": tensors, "median_s": medians,
            "speedup_vs_best_diffusers": best_peer / fused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import diffusers

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes' load skews CPU timings: recorded with them

    rows = []
    for name in args.models:
        for case in args.cases:
            row = run(name, case, args.repeats, args.warmup)
            rows.append(row)
            cells = ", ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in row["median_s"].items())
            print(f"{name} {case} ({row['tensors']} tensors): {cells}; speed-up {row['speedup_vs_best_diffusers']:.2f}x",
                  flush=True)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]]},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "wavg_fused": wf.__version__},
        "repeats": args.repeats, "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

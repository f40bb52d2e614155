"""K averages of one model in one pass (``AveragerGroup``) against K separate ``Averager``s and K
of the fastest peer (timm's ``ModelEmaV3``, ema-pytorch's ``EMA``), in the same run, beside the
bytes each way must move: one pass reads the model once and each average once and writes it,
separate updates read the model K times::

    python benchmarks/groups.py --repeats 15 [--models 2000x1k resnet50 gpt2] [--members 2 3] [--json out.json]

Every contender averages K EMAs (decays 0.999, 0.9999, 0.99999 ...) with buffers copied;
interleaved medians (``wavg_fused.bench.timing``), on a CPU or with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics

import torch

import wavg_fused as wf
from wavg_fused.bench import zoo
from wavg_fused.bench.timing import time_round_robin

VARIANTS = {"fp32": None, "bf16/fp32": torch.float32}
DECAYS = (0.999, 0.9999, 0.99999, 0.999999)


def pass_bytes(model: torch.nn.Module, dtype: torch.dtype | None, members: int, one_pass: bool) -> int:
    """Fewest bytes K EMA updates move: the model read once (one pass) or K times, each average
    read and written (parameters) or written (buffers, copied)."""
    def itemsize(t: torch.Tensor) -> int:
        return torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() else t.element_size()

    model_reads = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    shadow = sum(p.numel() * 2 * itemsize(p) for p in model.parameters()) + sum(b.numel() * itemsize(b) for b in model.buffers())
    return (1 if one_pass else members) * model_reads + members * shadow


def _contenders(model: torch.nn.Module, dtype: torch.dtype | None, members: int, device: str) -> dict:
    decays = DECAYS[:members]
    group = wf.AveragerGroup(model, {f"ema{k}": wf.EMA(d) for k, d in enumerate(decays)}, dtype=dtype)
    alone = [wf.Averager(model, wf.EMA(d), dtype=dtype) for d in decays]
    steps = {"AveragerGroup (one pass)": lambda: group.update(model),
             f"{members} x Averager": lambda: [a.update(model) for a in alone]}
    try:
        from timm.utils import ModelEmaV3

        timm = [ModelEmaV3(model, decay=d, dtype=dtype, device=device) for d in decays]
        steps[f"{members} x timm ModelEmaV3"] = lambda: [t.update(model) for t in timm]
    except ImportError:
        pass
    try:
        import ema_pytorch

        def copy_in(dtype):  # ema-pytorch keeps an average in another dtype only as a given ema_model
            return {} if dtype is None else {"ema_model": copy.deepcopy(model).to(dtype), "coerce_dtype": True}

        emas = [ema_pytorch.EMA(model, beta=d, update_after_step=0, update_every=1, use_foreach=True, **copy_in(dtype))
                for d in decays]
        steps[f"{members} x ema-pytorch EMA"] = lambda: [e.update() for e in emas]
    except ImportError:
        pass
    return steps


def run(models: list[str], member_counts: list[int], repeats: int, device: str) -> list[dict]:
    rows = []
    for name in models:
        for variant, dtype in VARIANTS.items():
            model = zoo.build(name, device=device, dtype=torch.bfloat16 if dtype else torch.float32)
            for members in member_counts:
                steps = _contenders(model, dtype, members, device)
                for step in steps.values():  # warm-up: plans built, pages touched
                    step(), step()
                samples = time_round_robin(list(steps.values()), repeats, cuda=device == "cuda")
                ms = {label: statistics.median(s.device) * 1e3 for label, s in zip(steps, samples)}
                peers = {k: v for k, v in ms.items() if "timm" in k or "ema-pytorch" in k}
                fastest_peer = min(peers, key=peers.get) if peers else None
                one, separate = pass_bytes(model, dtype, members, True), pass_bytes(model, dtype, members, False)
                group_ms = ms["AveragerGroup (one pass)"]
                row = {"model": name, "dtype": variant, "members": members, "ms": ms,
                       "bytes_one_pass": one, "bytes_separate": separate, "bytes_ratio": separate / one,
                       "speedup_vs_averagers": ms[f"{members} x Averager"] / group_ms,
                       "fastest_peer": fastest_peer,
                       "speedup_vs_fastest_peer": peers[fastest_peer] / group_ms if fastest_peer else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del steps
                gc.collect()
            del model
            gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["2000x1k", "resnet50", "gpt2"])
    parser.add_argument("--members", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = run(args.models, args.members, args.repeats, args.device)
    if args.json:
        conditions = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                      "repeats": args.repeats, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        if args.device == "cuda":
            conditions["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as file:
            json.dump({**conditions, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()

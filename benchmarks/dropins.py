"""Each peer drop-in against the peer it replaces, in the same run: timm's ``ModelEmaV3`` and
ema-pytorch's ``EMA`` beside ``wavg_fused.integrations.timm.ModelEmaV3`` and
``wavg_fused.integrations.ema_pytorch.EMA`` (the same arguments), and the bare ``Averager``.

One EMA update (decay 0.999, every call averaging) of the zoo's ResNet-50 and GPT-2, fp32 and a
bf16 model with an fp32 average; interleaved medians (``wavg_fused.bench.timing``)::

    python benchmarks/dropins.py --repeats 15 [--models resnet50 gpt2] [--json out.json]
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
from wavg_fused.bench.peers import DECAY
from wavg_fused.bench.timing import time_round_robin
from wavg_fused.integrations import ema_pytorch as ours_ema_pytorch
from wavg_fused.integrations import timm as ours_timm

VARIANTS = {"fp32": None, "bf16/fp32": torch.float32}


def _contenders(model: torch.nn.Module, dtype: torch.dtype | None) -> dict:
    import ema_pytorch
    from timm.utils import ModelEmaV3

    timm_args = dict(decay=DECAY, dtype=dtype, stochastic_rounding=False)
    ema_args = dict(beta=DECAY, update_after_step=0, update_every=1, use_foreach=True)

    def fp32_copy():  # ema-pytorch keeps an average in another dtype only as a given ema_model
        return {} if dtype is None else {"ema_model": copy.deepcopy(model).to(dtype), "coerce_dtype": True}

    theirs_timm, mine_timm = ModelEmaV3(model, **timm_args), ours_timm.ModelEmaV3(model, **timm_args)
    theirs_ema = ema_pytorch.EMA(model, **ema_args, **fp32_copy())
    mine_ema = ours_ema_pytorch.EMA(model, **ema_args, **fp32_copy())
    averager = wf.Averager(model, wf.EMA(DECAY), use_buffers=True, dtype=dtype)
    return {
        "timm ModelEmaV3": lambda: theirs_timm.update(model),
        "wavg_fused timm.ModelEmaV3": lambda: mine_timm.update(model),
        "ema-pytorch EMA": theirs_ema.update,
        "wavg_fused ema_pytorch.EMA": mine_ema.update,
        "wavg_fused Averager": lambda: averager.update(model),
    }


def run(models: list[str], repeats: int) -> list[dict]:
    rows = []
    for name in models:
        for variant, dtype in VARIANTS.items():
            model = zoo.build(name, dtype=torch.bfloat16 if dtype else torch.float32)
            steps = _contenders(model, dtype)
            for step in steps.values():  # warm-up: plans built, pages touched
                step(), step()
            samples = time_round_robin(list(steps.values()), repeats, cuda=False)
            medians = {label: statistics.median(s.device) for label, s in zip(steps, samples)}
            row = {"model": name, "dtype": variant, "ms": {k: v * 1e3 for k, v in medians.items()},
                   "speedup_timm": medians["timm ModelEmaV3"] / medians["wavg_fused timm.ModelEmaV3"],
                   "speedup_ema_pytorch": medians["ema-pytorch EMA"] / medians["wavg_fused ema_pytorch.EMA"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del steps, model
            gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()  # a shared machine: other work slows the many-op peers most
    rows = run(args.models, args.repeats)
    if args.json:
        conditions = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        with open(args.json, "w") as file:
            json.dump({**conditions, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()

"""The limit: the fastest of several ways of moving an update's bytes through memory, same run.

Any averaging update reads the model and the average and writes the average (``model_bytes``);
none can beat the fastest way this machine moves that many bytes. No single operator is that
bound: the fused CPU kernel beat torch's ``lerp_`` over one flat buffer by 10-18% on ResNet-50
(issue 14). So the benchmark times several *proxies* that each move the same bytes in the same
round robin as the peers, and the fastest median is the limit. A proxy added can only lower the
limit, never flatter a row. On a GPU the measured copy bandwidth is one more candidate.

Proxies share one pair of flat fp32 buffers per case (one pair each would hold gigabytes for
GPT-2), sized for the proxy that needs the most elements per byte (``copy_``).

>>> import torch
>>> model = torch.nn.Linear(100, 10)
>>> proxies = make_proxies()
>>> [p.name for p in proxies]
['flat lerp_', 'flat add_', 'flat copy_']
>>> for p in proxies:
...     p.setup(model, None); p.step(model)
>>> {p.name: p.nbytes == model_bytes(model, None) for p in proxies}
{'flat lerp_': True, 'flat add_': True, 'flat copy_': True}
>>> rows = [{"peer": "flat lerp_", "median_ms": 2.0}, {"peer": "flat add_", "median_ms": 1.5}]
>>> row = limit_row(rows); (row["peer"], row["median_ms"], row["proxy"])
('limit', 1.5, 'flat add_')
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import wavg_fused as wf

from .timing import model_bytes

__all__ = ["LIMIT", "COPY_BANDWIDTH", "Proxy", "FlatOp", "FlatFused", "make_proxies", "limit_row", "is_limit"]

LIMIT = "limit"
COPY_BANDWIDTH = "copy bandwidth"
_FEWEST_BYTES_PER_ELEMENT = 8  # copy_'s: read 4, write 4
_WEIGHT = 1e-3  # an EMA weight; add_ grows the buffer by about this per step: no overflow, no denormals


def is_limit(peer: str) -> bool:
    """Whether a results row is the limit: ``limit`` now, ``flat lerp_`` in results written before
    the limit was the best of several proxies (those files still read).

    >>> is_limit("limit"), is_limit("flat lerp_"), is_limit("wavg_fused[cpu]")
    (True, True, False)
    """
    return peer == LIMIT or peer.startswith("flat ")


def _filled(numel: int, device: torch.device) -> torch.Tensor:
    # not zeros (they can run faster) and no denormals; linspace, not uniform_: several times
    # cheaper to fill, and a quick run fills a few hundred MB of these per case
    return torch.linspace(0.5, 1.5, numel, device=device)


class _Buffers:
    """Two flat fp32 buffers on the model's device, allocated once per case for the proxy that
    needs the most elements (``copy_``, 8 bytes an element), the others using their first part."""

    def __init__(self) -> None:
        self.a = self.b = torch.empty(0)
        self.nbytes = -1

    def get(self, device: torch.device, nbytes: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a.device != device or self.nbytes != nbytes:
            self.a = self.b = torch.empty(0)  # free the old pair before allocating the new one
            self.a = _filled(max(nbytes // _FEWEST_BYTES_PER_ELEMENT, numel), device)
            self.b = self.a.clone()
            self.nbytes = nbytes
        return self.a[:numel], self.b[:numel]


class FlatOp:
    """One torch operator over flat fp32 buffers, sized so it moves ``model_bytes`` bytes.

    ``bytes_per_element`` is what the operator reads plus writes per element: 12 for the
    read-2-write-1 triads (``lerp_``, ``add_``), 8 for ``copy_``. Mixed dtypes (bf16 model, fp32
    average: 10 bytes an element) get fp32 buffers of the same bytes, since torch's mixed-dtype
    ops are no faster on a CPU.
    """

    def __init__(self, name: str, op: Callable[[torch.Tensor, torch.Tensor], Any], bytes_per_element: int,
                 buffers: _Buffers) -> None:
        self.name, self.op, self.bytes_per_element, self.buffers = name, op, bytes_per_element, buffers

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        nbytes = model_bytes(model, dtype)
        numel = max(nbytes // self.bytes_per_element, 1)
        self.out, self.src = self.buffers.get(device, nbytes, numel)
        self.nbytes = numel * self.bytes_per_element

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        self.op(self.out, self.src)


class FlatFused:
    """wavg_fused's own fastest backend over a one-tensor model of the same bytes, in the case's
    dtypes: a vectorised, threaded triad with no per-tensor work. Never flattering: the real model
    adds tensors to the same kernel, and the limit is the minimum over all proxies."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"flat wavg_fused[{backend}]"

    def setup(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        tensors = list(itertools.chain(model.parameters(), model.buffers()))
        floating = [t for t in tensors if t.is_floating_point()] or tensors
        model_dtype = floating[0].dtype
        shadow_size = torch.empty((), dtype=dtype or model_dtype).element_size()
        per_element = torch.empty((), dtype=model_dtype).element_size() + 2 * shadow_size
        numel = max(model_bytes(model, dtype) // per_element, 1)
        self.flat = nn.Module()
        self.flat.weight = nn.Parameter(_filled(numel, floating[0].device).to(model_dtype))
        self.avg = wf.Averager(self.flat, wf.EMA(1 - _WEIGHT), dtype=dtype, backend=self.backend)
        self.nbytes = numel * per_element

    def step(self, model: nn.Module) -> None:
        self.avg.update(self.flat)


Proxy = FlatOp | FlatFused


def make_proxies(fused_backend: str | None = None) -> list[Proxy]:
    """The proxies of one case: torch's ``lerp_``, an ``add_`` triad and a ``copy_`` over flat
    buffers, and wavg_fused's ``fused_backend`` over one flat tensor when one is given.

    ``torch._foreach_*`` over one buffer is left out: on a CPU it runs the same per-tensor kernels.
    """
    buffers = _Buffers()
    proxies: list[Proxy] = [
        FlatOp("flat lerp_", lambda out, src: out.lerp_(src, _WEIGHT), 12, buffers),
        FlatOp("flat add_", lambda out, src: out.add_(src, alpha=_WEIGHT), 12, buffers),
        FlatOp("flat copy_", lambda out, src: out.copy_(src), 8, buffers),
    ]
    if fused_backend is not None:
        proxies.append(FlatFused(fused_backend))
    return proxies


def limit_row(proxy_rows: list[dict[str, Any]], candidates_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The one ``limit`` row of a case: the fastest proxy's row, renamed, with ``proxy`` (which
    won) and ``proxies`` (every proxy's median ms). ``candidates_ms`` adds limits that are not
    timed rows (on a GPU: the copy bandwidth's time for these bytes)."""
    if not proxy_rows:
        raise ValueError("limit_row: proxy_rows is empty; at least one proxy must have been timed")
    medians = {row["peer"]: row["median_ms"] for row in proxy_rows}
    medians.update(candidates_ms or {})
    winner = min(medians, key=medians.get)
    timed = {row["peer"]: row for row in proxy_rows}
    base = timed.get(winner, min(proxy_rows, key=lambda r: r["median_ms"]))
    row = {**base, "peer": LIMIT, "proxy": winner, "proxies": medians, "median_ms": medians[winner]}
    if winner not in timed:  # an untimed candidate: no spread to report
        row.update(p10_ms=medians[winner], p90_ms=medians[winner], host_ms=medians[winner], launches=0)
    return row

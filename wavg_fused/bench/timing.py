"""How the benchmark measures: interleaved medians, device events, launch counts, copy bandwidth.

Peers run round-robin within each repeat, so slow drift on the machine (frequency, other
processes) hits all of them alike instead of whichever happened to run last. Each sample follows
the same untimed ``before`` step, so that no peer is timed in the state another peer left: on a
CPU a peer after a long serial one found the thread pool asleep and its caches cold, one after a
parallel one found them warm (the guarded update, which does strictly more, measured faster than
the plain one right before it). The CLI's ``before`` stands in for the optimizer step that comes
before an update in training (``optimizer_step_stand_in``). On a GPU each sample is timed with
CUDA events after the L2 cache was overwritten, so a model smaller than the cache is read from
device memory as it would be after a training step, not from the previous sample's cache lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Samples", "percentile", "time_round_robin", "optimizer_step_stand_in", "count_launches", "copy_bandwidth",
           "model_bytes"]

_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MB, B200: 126 MB)


@dataclass
class Samples:
    """Seconds per update for one peer: ``device`` from events (wall time on a CPU) and ``host``,
    the time until ``step`` returned (on a GPU, what the training loop's thread pays)."""

    device: list[float] = field(default_factory=list)
    host: list[float] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q`` quantile of any non-empty sample (statistics.quantiles wants >= 2).

    >>> percentile([3.0, 1.0, 2.0], 0.5)
    2.0
    """
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def optimizer_step_stand_in(model: nn.Module) -> Callable[[], None]:
    """What an optimizer step does to the machine before an update, without changing the model:
    every parameter written in place (``_foreach_mul_`` by 1, exact in every dtype), with torch's
    own per-tensor threading, so the update finds the model's bytes and the thread pool as a
    training loop leaves them.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> before = lin.weight.detach().clone()
    >>> optimizer_step_stand_in(lin)()
    >>> torch.equal(lin.weight, before)
    True
    """
    params = [p for p in model.parameters()]

    @torch.no_grad()
    def step() -> None:
        torch._foreach_mul_(params, 1.0)

    return step


def time_round_robin(steps: Sequence[Callable[[], None]], repeats: int, cuda: bool,
                     tick: Callable[[], None] | None = None, before: Callable[[], None] | None = None) -> list[Samples]:
    """Time each of ``steps`` ``repeats`` times, interleaved, rotating which one goes first;
    ``before`` (untimed) runs before every sample."""
    samples = [Samples() for _ in steps]
    flush = torch.empty(_L2_FLUSH_BYTES // 4, device="cuda") if cuda else None
    for r in range(repeats):
        for k in range(len(steps)):
            i = (r + k) % len(steps)
            if before is not None:
                before()
            if cuda:
                flush.fill_(float(r + k))  # write, not read: evicts the L2 without timing zeros
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                host_start = time.perf_counter()
                start.record()
                steps[i]()
                samples[i].host.append(time.perf_counter() - host_start)
                end.record()
                end.synchronize()
                samples[i].device.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                steps[i]()
                elapsed = time.perf_counter() - start
                samples[i].device.append(elapsed)
                samples[i].host.append(elapsed)
        if tick is not None:
            tick()
    return samples


def count_launches(step: Callable[[], None], cuda: bool) -> int:
    """Work items one ``step`` issues, from ``torch.profiler``: kernels and memory copies/sets on
    a GPU; top-level operator calls on a CPU (each a separate pass over its tensors)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _quiet_stderr(), profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and "::" in e.name)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # the profiler's C++ side logs every start and stop on fd 2, over the table and progress bar
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written: the GPU's limit."""
    src = torch.empty(nbytes // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / percentile(times, 0.5) / 1e9


def model_bytes(model: nn.Module, shadow_dtype: torch.dtype | None) -> int:
    """Fewest bytes one update moves: each parameter read from the model and the average and
    written to the average; each buffer read from the model and written (buffers are copied)."""
    def shadow_size(tensor: torch.Tensor) -> int:
        if shadow_dtype is None or not tensor.is_floating_point():
            return tensor.element_size()
        return torch.empty((), dtype=shadow_dtype).element_size()

    # parameters() and buffers() skip repeats, so a tied tensor counts once, as it is updated once
    averaged = sum(p.numel() * (p.element_size() + 2 * shadow_size(p)) for p in model.parameters())
    copied = sum(b.numel() * (b.element_size() + shadow_size(b)) for b in model.buffers())
    return averaged + copied

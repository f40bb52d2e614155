"""When an ``update`` call averages: a warm-up that tracks the model, then every N-th call.

Decided on the host from a call counter, so a schedule adds no device work and no sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "Schedule"]


class Action(Enum):
    TRACK = "track"  # copy the model in; n_averaged stays 0 (ema-pytorch's update_after_step)
    AVERAGE = "average"
    SKIP = "skip"


def _count(value: object, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """``update_after`` first calls copy the model (the average tracks it until averaging
    starts); after them every ``update_every``-th call averages, the others return at once.

    >>> s = Schedule(update_after=2, update_every=3)
    >>> [s.action(call).value for call in range(1, 9)]
    ['track', 'track', 'skip', 'skip', 'average', 'skip', 'skip', 'average']
    """

    update_after: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        _count(self.update_after, "update_after", 0)
        _count(self.update_every, "update_every", 1)

    def averaging_calls(self, calls: int) -> int:
        """How many of the first ``calls`` calls averaged."""
        return max(0, calls - self.update_after) // self.update_every

    def action(self, call: int) -> Action:
        """What the ``call``-th call of ``update`` (counting from 1) does."""
        if call <= self.update_after:
            return Action.TRACK
        return Action.AVERAGE if (call - self.update_after) % self.update_every == 0 else Action.SKIP

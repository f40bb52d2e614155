"""A one-line progress bar on stderr, drawn only on a terminal (logs and pipes stay clean)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts ``total`` ticks and redraws ``[#####.....] 12/40 0:07 label`` in place.

    >>> import io
    >>> bar = Progress(4, stream=io.StringIO(), force=True)
    >>> bar.tick("resnet50"); bar.stream.getvalue().split("]")[0]
    '\\r[#######.....................'
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 28, force: bool = False) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = force or self.stream.isatty()
        self.label = ""
        self.start = time.monotonic()

    def tick(self, label: str | None = None, count: int = 1) -> None:
        self.done = min(self.done + count, self.total)
        if label is not None:
            self.label = label
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = int(time.monotonic() - self.start)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{elapsed // 60}:{elapsed % 60:02d} {self.label[:40]:40s}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 60) + "\r")
            self.stream.flush()

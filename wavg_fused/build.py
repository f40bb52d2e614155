"""``python -m wavg_fused.build``: compile ``wavg_fused._C`` against the torch that runs, ahead of
first use (a container image, a cluster's login node), and say where the kernels came from.
The compiler itself is ``wavg_fused._compile``; the cache layout ``wavg_fused._cache``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from . import _extension
from ._compile import BuildError, compile_into_cache, find_ninja

__all__ = ["BuildError", "find_ninja", "compile_into_cache", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wavg_fused.build``: get the compiled kernels now (the installed ones, an earlier
    build, or a build); print where they came from; exit 1 if there are none."""
    parser = argparse.ArgumentParser(prog="python -m wavg_fused.build", description=main.__doc__)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .backends import available_backends  # the registry loads (or builds) _C

    start = time.perf_counter()
    try:
        _extension.load()
    except ImportError as error:
        print(f"wavg_fused: no compiled kernels: {error}", file=sys.stderr)
        return 1
    print(f"wavg_fused: compiled kernels {_extension.origin()}")
    print(f"backends for CPU tensors: {', '.join(available_backends('cpu'))} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

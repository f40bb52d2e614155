"""Compiling ``wavg_fused._C`` against the torch that runs, into the cache (``_cache``), for the
first-use build (``_extension.load``) and the ``python -m wavg_fused.build`` command.

It takes the sources and flags of ``setup.py`` (``wavg_fused/_sources.py``) and the same switches
(``WAVG_FUSED_BUILD_CUDA``, ``TORCH_CUDA_ARCH_LIST``, ``DEBUG``, ``MAX_JOBS``), compiles with
torch's ``cpp_extension.load`` (ninja), and needs a C++ compiler (``CXX``, else ``c++``) and
``ninja``. An exclusive lock on the build directory makes a second process wait for the first
and then load its result; the kernel drops the lock when a builder dies, and a build that did not
finish leaves no stamp, so the next process builds again.

>>> isinstance(find_ninja(), (str, type(None)))
True
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import _sources
from ._cache import JIT_ENV_VAR, STAMP, library_path, variant_dir

__all__ = ["BuildError", "find_ninja", "compile_into_cache"]

log = logging.getLogger("wavg_fused")


class BuildError(RuntimeError):
    """Why a first-use build could not run, or failed (the message says which)."""


def find_ninja() -> str | None:
    """The ninja executable: on PATH, else beside this Python (a venv used without activating
    it) or in the ``ninja`` package from PyPI. torch looks only on PATH."""
    found = shutil.which("ninja")
    if found:
        return found
    places = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        places.append(ninja.BIN_DIR)
    for place in places:
        found = shutil.which("ninja", path=place)
        if found:
            return found
    return None


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    # torch reads these from os.environ; the user's process gets its own values back
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is not None:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # an OS lock (released when the holder dies), so a killed build never blocks the next one;
    # torch's own lock differs between its versions (a lock file that outlives its holder in some)
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock guards the build directory
        yield
        return
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpp_extension():
    # CUDA_HOME is read when torch's cpp_extension is first imported
    with _environ(CUDA_HOME=None if "torch.utils.cpp_extension" in sys.modules else _sources.default_cuda_home()):
        from torch.utils import cpp_extension
    return cpp_extension


def compile_into_cache(csrc: Path, verbose: bool = False) -> Path:
    """Build ``_C`` from the sources in ``csrc`` into its cache directory (``variant_dir``) unless
    a finished build is there, and return the library's path. Raises ``BuildError``."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler to build it ({compiler!r} not found; install g++ or clang++, or set CXX)")
    ninja = find_ninja()
    if ninja is None:
        raise BuildError("ninja, which builds it, is not installed (pip install ninja)")
    cpp_extension = _cpp_extension()
    with_cuda = _sources.want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    directory = variant_dir(csrc, with_cuda)
    (directory / "build").mkdir(parents=True, exist_ok=True)
    library = library_path(directory)
    with _locked(directory):
        if (directory / STAMP).is_file() and library.is_file():
            return library  # another process built it while this one waited
        what = "C++ and CUDA kernels" if with_cuda else "C++ kernels"
        log.warning(
            "wavg_fused: compiling its %s for torch %s on first use; this takes minutes, once per torch "
            "version and machine (cached in %s). `python -m wavg_fused.build` does it ahead; %s=0 forbids it.",
            what, torch.__version__, directory, JIT_ENV_VAR)
        debug = _sources.flag("DEBUG") is True
        sources = [str(csrc / name) for name in _sources.CPU_SOURCES]
        includes = [str(csrc)]
        if with_cuda:
            sources += [str(csrc / name) for name in _sources.cuda_sources(str(csrc))]
            includes += _sources.cuda_include_dirs(os.path.dirname(torch.__file__))
        start = time.perf_counter()
        (directory / STAMP).unlink(missing_ok=True)
        try:
            with _environ(PATH=os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", ""),
                          TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST") or _sources.DEFAULT_CUDA_ARCH_LIST):
                built = cpp_extension.load(
                    name="_C",
                    sources=sources,
                    extra_cflags=_sources.cxx_flags(debug),
                    extra_cuda_cflags=_sources.nvcc_flags(debug, bool(_sources.flag("WAVG_FUSED_PTXAS_VERBOSE"))),
                    extra_ldflags=list(_sources.LINK_FLAGS),
                    extra_include_paths=includes,
                    build_directory=str(directory / "build"),
                    with_cuda=with_cuda,
                    is_python_module=False,  # wavg_fused._extension imports it under its package name
                    verbose=verbose,
                )
        except Exception as error:
            (directory / "build.log").write_text(f"{type(error).__name__}: {error}\n")
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BuildError(f"building it failed ({first}; the build's output is in {directory / 'build.log'})") from None
        if Path(built) != library:
            raise BuildError(f"torch built {built}, expected {library}")
        seconds = time.perf_counter() - start
        (directory / STAMP).write_text(json.dumps({"seconds": round(seconds, 1), "torch": torch.__version__,
                                                   "cuda": with_cuda, "sources": sources}) + "\n")
        log.info("wavg_fused: compiled in %.0f s", seconds)
    return library



"""What ``wavg_fused._C`` is built from, and with which flags: the one description that both
``setup.py`` (at install) and ``wavg_fused.build`` (on first use) read, so the two cannot drift.

No torch import here: ``setup.py`` loads this file by path, in build environments that may have
no torch (pip's build isolation), without importing the package. Paths are relative to the
``csrc`` directory; the switches are the environment variables of the build table in docs/backends.md.

>>> CPU_SOURCES[0], CPU_SOURCES[-1]
('wavg_fused.cpp', 'cpu/kernel_avx512.cpp')
>>> cxx_flags(debug=False)
['-O3', '-DNDEBUG', '-fopenmp']
"""

from __future__ import annotations

import glob
import os

__all__ = [
    "CPU_SOURCES",
    "DEFAULT_CUDA_ARCH_LIST",
    "LINK_FLAGS",
    "flag",
    "cuda_sources",
    "cxx_flags",
    "nvcc_flags",
    "cuda_include_dirs",
    "default_cuda_home",
    "want_cuda",
]

# Files compiled for a wider instruction set come last: the linker keeps the first copy of an
# inline function it sees, and that copy must run on every CPU. The ISA files pick their
# instruction set with `#pragma GCC target`, so one flag set serves every file.
CPU_SOURCES: tuple[str, ...] = (
    "wavg_fused.cpp",
    "module.cpp",
    "address_watch.cpp",
    "cpu/update_cpu.cpp",
    "cpu/update_group_cpu.cpp",
    "cpu/update_if_unmoved.cpp",
    "cuda/update_emulated.cpp",  # the CUDA kernels' code on the CPU (host compiler, always built)
    "cpu/kernel_default.cpp",
    "cpu/kernel_avx2.cpp",
    "cpu/kernel_avx512.cpp",
)
LINK_FLAGS: tuple[str, ...] = ("-fopenmp",)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def flag(name: str) -> bool | None:
    """An on/off environment switch: ``None`` when unset or empty, else whether it is on.

    >>> flag("WAVG_FUSED_NO_SUCH_SWITCH") is None
    True
    """
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False", "no", "off")


def cuda_sources(csrc: str) -> list[str]:
    """The ``.cu`` files under ``csrc``, relative to it, in a fixed order."""
    return sorted(os.path.relpath(path, csrc) for path in glob.glob(os.path.join(csrc, "cuda", "*.cu")))


def cxx_flags(debug: bool) -> list[str]:
    """Host compiler flags (the C++ standard is what torch's headers need; torch sets it).
    ``-DNDEBUG``: setuptools adds it from Python's CFLAGS at install, the first-use build would not."""
    return (["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]) + ["-fopenmp"]


def nvcc_flags(debug: bool, ptxas_verbose: bool) -> list[str]:
    """nvcc flags: no fast math, since the rule must round as the CPU kernels do."""
    flags = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["-lineinfo"]
    return flags + (["-Xptxas", "-v"] if ptxas_verbose else [])


def cuda_include_dirs(torch_dir: str) -> list[str]:
    """CUDA headers shipped with torch's CUDA wheels, for toolkits that lack some of them."""
    return sorted(glob.glob(os.path.join(torch_dir, "..", "nvidia", "cu*", "include")))


def default_cuda_home() -> str | None:
    """``/usr/local/cuda`` when ``CUDA_HOME`` is unset and it has nvcc: torch guesses CUDA_HOME
    from the nvcc on PATH, and a wrapper script there (as in some images) points it at a
    directory without the CUDA libraries."""
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def want_cuda(torch_cuda: str | None, cuda_home: str | None) -> bool:
    """Whether to build the CUDA kernels: ``WAVG_FUSED_BUILD_CUDA`` if set, else when torch is a
    CUDA build and a toolkit was found (no GPU is needed to compile).

    >>> want_cuda(None, "/usr/local/cuda") if flag("WAVG_FUSED_BUILD_CUDA") is None else False
    False
    """
    forced = flag("WAVG_FUSED_BUILD_CUDA")
    return forced if forced is not None else (torch_cuda is not None and cuda_home is not None)

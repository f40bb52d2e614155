"""Where first-use builds of ``wavg_fused._C`` live: one directory per build key (package version,
torch and its CUDA version, C++ ABI, Python, machine, sources, ``DEBUG``), one subdirectory per
variant (CPU only, or with the CUDA kernels), a stamp once a build is complete. Shared by the
loader (``_extension``) and the compiler (``_compile``), which import nothing of each other's
at module level."""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import platform
import sys
from pathlib import Path

import torch

from . import _sources

__all__ = ["JIT_ENV_VAR", "CACHE_ENV_VAR", "STAMP", "csrc_dir", "cache_root", "build_key", "variant_dir", "library_path"]

JIT_ENV_VAR = "WAVG_FUSED_JIT"
CACHE_ENV_VAR = "WAVG_FUSED_CACHE"
STAMP = "built"  # written after a build is complete: a half-linked library is never loaded


def csrc_dir() -> Path | None:
    """The kernels' sources: ``wavg_fused/csrc`` in an installed package, ``csrc/`` beside the
    package in a source tree (editable installs)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / _sources.CPU_SOURCES[0]).is_file():
            return candidate
    return None


def cache_root() -> Path:
    """Where first-use builds are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wavg_fused"


def _version() -> str:
    from . import __version__

    return __version__


def _sources_digest(csrc: Path) -> str:
    # every source file, so an edited header (editable installs) gets a build of its own
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")):
        digest.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_key(csrc: Path) -> str:
    """The cache directory's name: what a compiled ``_C`` depends on (package version, torch
    version and its CUDA version, the C++ ABI, Python, machine, the sources, ``DEBUG``).

    >>> key = build_key(csrc_dir()) if csrc_dir() else "wavg_fused-torch"
    >>> key.startswith("wavg_fused-") and "torch" in key
    True
    """
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    debug = "-debug" if _sources.flag("DEBUG") else ""
    torch_id = f"torch{torch.__version__}-{'cu' + torch.version.cuda if torch.version.cuda else 'cpu'}"
    return (f"wavg_fused-{_version()}-{torch_id}-abi{abi}-{sys.implementation.cache_tag}-{platform.machine()}"
            f"-{_sources_digest(csrc)}{debug}").replace("+", "_")


def variant_dir(csrc: Path, with_cuda: bool) -> Path:
    """The directory of one build: CPU kernels only, or with the CUDA kernels for the
    architectures of ``TORCH_CUDA_ARCH_LIST``."""
    variant = "cpu"
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or _sources.DEFAULT_CUDA_ARCH_LIST
        variant = "cuda-" + "".join(c if c.isalnum() or c in ".+" else "_" for c in arch)
    return cache_root() / build_key(csrc) / variant


def library_path(directory: Path) -> Path:
    return directory / "build" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[-1]}"

"""Where ``wavg_fused._C`` (the compiled kernels) comes from, in this order:

1. the extension built at install (``pip install --no-build-isolation``, or a wheel built with torch);
2. an earlier first-use build in the cache, for this torch, Python, machine and these sources;
3. a build now, at first use of a compiled backend (``wavg_fused.build``), unless
   ``WAVG_FUSED_JIT=0`` forbids it (a build already in the cache is still used).

Importing the package only does 1 and 2 (``preload``), which never compile: a first-use build
registers itself as ``wavg_fused._C`` in ``sys.modules``, so ``from ._C import ...`` finds it in
every later process. When none of the three works, ``load`` raises ``ImportError`` with the
reason (the backend registry reports it) and warns once (``SlowPathWarning``) that the slow
pure-PyTorch path runs.

The cache is ``$WAVG_FUSED_CACHE``, else ``$XDG_CACHE_HOME/wavg_fused``, else
``~/.cache/wavg_fused``; one directory per build key (``build_key``).

Examples:
    >>> state() in ("prebuilt", "cached", "built", "not loaded", "failed")
    True
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch

from . import _sources
from ._cache import CACHE_ENV_VAR, JIT_ENV_VAR, STAMP, build_key, cache_root, csrc_dir, library_path, variant_dir

__all__ = ["SlowPathWarning", "JIT_ENV_VAR", "CACHE_ENV_VAR", "csrc_dir", "cache_root", "build_key",
           "variant_dir", "preload", "load", "state", "origin"]

MODULE_NAME = "wavg_fused._C"


class SlowPathWarning(UserWarning):
    """The compiled kernels are unavailable: updates run on the pure-PyTorch ``torch`` backend."""


# how this process got _C: "prebuilt", "cached", "built", "failed", or None before any attempt
_state: str | None = None
_origin: str = ""
_failure: str | None = None


def _ops_registered() -> bool:
    # a second copy of the library would register the ops again, which aborts the process
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key("wavg_fused::update_", "CPU")
    except RuntimeError:  # "operator wavg_fused::update_ does not exist"
        return False
    return True


def _import_library(path: Path, loaded_by_torch: bool = False) -> types.ModuleType:
    # loaded_by_torch: the build just dlopen'ed this very file, which importing it opens again
    # (the same handle, no second registration)
    if not loaded_by_torch and _ops_registered():
        raise ImportError(f"not loading {path}: another build of the extension is loaded in this process")
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the library's op registrations
    sys.modules[MODULE_NAME] = module
    setattr(sys.modules[__package__], "_C", module)
    return module


def _record(kind: str, origin: str, module: types.ModuleType) -> types.ModuleType:
    global _state, _origin
    _state, _origin = kind, origin
    return module


def jit_allowed() -> bool:
    return _sources.flag(JIT_ENV_VAR) is not False


def _cached_variants(csrc: Path) -> list[Path]:
    # the CUDA build first where torch can run it; whichever was built is taken
    forced = _sources.flag("WAVG_FUSED_BUILD_CUDA")
    variants = []
    if torch.version.cuda is not None and forced is not False:
        variants.append(variant_dir(csrc, True))
    if forced is not True:
        variants.append(variant_dir(csrc, False))
    return variants


def _from_cache() -> types.ModuleType | None:
    # also under WAVG_FUSED_JIT=0, which forbids compiling, not using what was compiled
    csrc = csrc_dir()
    if csrc is None:
        return None
    for directory in _cached_variants(csrc):
        if (directory / STAMP).is_file() and library_path(directory).is_file():
            return _record("cached", str(library_path(directory)), _import_library(library_path(directory)))
    return None


def _prebuilt() -> tuple[types.ModuleType | None, str]:
    """The extension that came with the installed package, or the reason it did not load."""
    already = sys.modules.get(MODULE_NAME)
    if already is not None:
        return already, getattr(already, "__file__", "") or ""
    try:
        module = importlib.import_module(MODULE_NAME)
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and error.name == MODULE_NAME
        return None, "" if missing else f"the installed one did not load ({error})"
    return _record("prebuilt", module.__file__ or "", module), module.__file__ or ""


def preload() -> None:
    """At package import: the extension from 1 or 2 of the module docstring, never a compile, so
    that modules importing ``_C`` at import time (the address watch) find it."""
    module, _ = _prebuilt()
    if module is None:
        try:
            _from_cache()
        except Exception:  # a broken cache entry: load() reports it at first use
            pass


def _fail(reason: str) -> ImportError:
    global _state, _failure
    if _failure is None:
        _state, _failure = "failed", reason
        warnings.warn(
            f"wavg_fused is running its slow path: {reason}. The 'cpu' and 'cuda' backends are "
            "unavailable; CPU tensors are updated by the pure-PyTorch 'torch' backend (2-4x slower "
            "on the benchmark models). wavg_fused.backend_report() shows this again.",
            SlowPathWarning,
            stacklevel=3,
        )
    return ImportError(_failure)


def load() -> types.ModuleType:
    """``wavg_fused._C``: the one installed, cached, or built now (the module docstring's order).
    Raises ``ImportError`` naming the reason when none can be had, and warns once.

    Examples:
        >>> import wavg_fused._extension as ext
        >>> ext.load().__name__ if ext.state() in ("prebuilt", "cached", "built") else "wavg_fused._C"
        'wavg_fused._C'
    """
    if _failure is not None:
        raise ImportError(_failure)
    try:
        module = importlib.import_module(MODULE_NAME) if _ops_registered() else None
    except ImportError as error:  # the library is loaded, its module hidden (tests do that): no rebuild
        raise ImportError(f"{type(error).__name__}: {error}") from None
    if module is not None:
        return module
    module, broken = _prebuilt()
    if module is not None:
        return module
    try:
        module = _from_cache()
    except Exception as error:  # rebuilding would relink the same library: the user must delete it
        raise _fail(f"the cached build did not load ({type(error).__name__}: {error}); delete {cache_root()} "
                    "to build it again") from None
    if module is not None:
        return module
    prefix = f"{broken}; " if broken else "the installed package has no compiled extension; "
    if not jit_allowed():
        raise _fail(f"{prefix}{JIT_ENV_VAR}=0 forbids building it on first use")
    csrc = csrc_dir()
    if csrc is None:
        raise _fail(f"{prefix}its sources (csrc/) are not in the installed package, so it cannot be built")
    from ._compile import BuildError, compile_into_cache

    try:
        path = compile_into_cache(csrc)
    except BuildError as error:
        raise _fail(f"{prefix}{error}") from None
    try:
        return _record("built", str(path), _import_library(path, loaded_by_torch=True))
    except Exception as error:
        raise _fail(f"{prefix}it was built ({path}) but did not load ({type(error).__name__}: {error})") from None


def state() -> str:
    """``"prebuilt"``, ``"cached"`` (an earlier first-use build), ``"built"`` (by this process),
    ``"failed"``, or ``"not loaded"`` (no compiled backend was asked for yet)."""
    return _state or "not loaded"


def origin() -> str:
    """Where ``_C`` came from, for ``backend_report``'s extension line (after ``load``)."""
    if _state == "prebuilt":
        return f"installed with the package ({_origin})"
    if _state in ("cached", "built"):
        return f"built on first use {'by this process' if _state == 'built' else 'earlier'} ({_origin})"
    if _state == "failed":
        return f"not loaded ({_failure})"
    return f"not loaded yet (first use builds it into {cache_root()})"

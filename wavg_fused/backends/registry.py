"""Backend choice, in one place.

``select_backend(requested, device)`` is the only function that decides which backend runs.
``"auto"`` takes the first available backend in ``PREFERENCE`` for the device type and quietly
falls back; an explicit request that cannot be met raises, naming the reason. The environment
variable ``WAVG_FUSED_BACKEND`` overrides ``"auto"`` (never an explicit argument).
Backends whose code is missing (no compiled extension, no Triton) are registered anyway, so
``backend_report()`` can say why each one is unavailable.

Test tools (``TEST_TOOLS``: ``cuda-emulated``, the CUDA kernels' code on CPU tensors) are
backends too, chosen only by name: never by ``"auto"``, and listed by ``available_backends`` only
when asked (``include_test_tools=True``, as the test suite does).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .base import Backend
from .torch_backend import TorchBackend

__all__ = ["BACKEND_NAMES", "PREFERENCE", "TEST_TOOLS", "ENV_VAR", "select_backend", "available_backends", "backend_report"]

ENV_VAR = "WAVG_FUSED_BACKEND"

# Fastest first, per device type; "torch" runs everywhere.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch", "triton"),  # triton: under TRITON_INTERPRET=1 only (tests)
}
DEFAULT_PREFERENCE = ("torch",)
# Backends for testing only, per device type: never chosen by "auto".
TEST_TOOLS: dict[str, tuple[str, ...]] = {
    "cpu": ("cuda-emulated",),  # the cuda backend's kernel code, emulated on the CPU
}


def _load_from(module: str, attribute: str) -> Callable[[], Backend]:
    def load() -> Backend:
        return getattr(importlib.import_module(module, __package__), attribute)()

    return load


_LOADERS: dict[str, Callable[[], Backend]] = {
    "cuda": _load_from(".fused", "CudaBackend"),
    "triton": _load_from(".triton_backend", "TritonBackend"),
    "cpu": _load_from(".fused", "CpuBackend"),
    "torch": TorchBackend,
    "cuda-emulated": _load_from(".fused", "CudaEmulatedBackend"),
}
BACKEND_NAMES = tuple(_LOADERS)

_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


def _backend(name: str) -> Backend | None:
    """The backend object, or ``None`` with the load error recorded (raised only on request)."""
    if name not in _loaded and name not in _load_errors:
        try:
            _loaded[name] = _LOADERS[name]()
        except Exception as error:  # a broken build must not break the other backends
            _load_errors[name] = f"{type(error).__name__}: {error}"
    return _loaded.get(name)


def _reason(name: str, device: torch.device) -> str | None:
    backend = _backend(name)
    if backend is None:
        return f"not loaded ({_load_errors[name]})"
    return backend.unavailable_reason(device)


def select_backend(requested: str, device: torch.device | str) -> Backend:
    """The backend that updates tensors on ``device``.

    Examples:
        >>> select_backend("torch", "cpu").name
        'torch'
    """
    device = torch.device(device)
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested == "auto":
        for name in PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
            if _reason(name, device) is None:
                return _loaded[name]
        raise RuntimeError(f"no wavg_fused backend can update tensors on {device}")  # unreachable: torch
    if requested not in _LOADERS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {requested!r}")
    reason = _reason(requested, device)
    if reason is not None:
        raise RuntimeError(f"wavg_fused backend {requested!r} is unavailable on {device}: {reason}")
    return _loaded[requested]


def available_backends(device: torch.device | str = "cpu", include_test_tools: bool = False) -> list[str]:
    """Names of the backends that can update tensors on ``device``, fastest first; with
    ``include_test_tools``, followed by the available test tools (``TEST_TOOLS``).

    Examples:
        >>> "torch" in available_backends("cpu")
        True
        >>> "cuda-emulated" in available_backends("cpu")
        False
    """
    device = torch.device(device)
    order = PREFERENCE.get(device.type, DEFAULT_PREFERENCE)
    if include_test_tools:
        order = order + TEST_TOOLS.get(device.type, ())
    return [name for name in order if _reason(name, device) is None]


def _extension_line() -> str:
    """Which CPU kernel the compiled extension runs and whether it has CUDA kernels, or why not."""
    from .._extension import load, origin

    try:
        extension = load()  # the installed extension, or one built on first use (may build it now)
    except ImportError as error:
        return f"compiled extension: not loaded ({error})"
    pick = getattr(extension, "cpu_kernel_isa", None)
    if pick is None:
        isa = "unknown (this build of the extension predates cpu_kernel_isa)"
    else:
        try:
            isa = pick()
        except RuntimeError as error:  # WAVG_FUSED_CPU_ISA names no kernel: the cpu backend will raise
            isa = f"none ({str(error).splitlines()[0]})"
    forced = os.environ.get("WAVG_FUSED_CPU_ISA")
    isa += f" (forced by WAVG_FUSED_CPU_ISA={forced!r})" if forced else ""
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("wavg_fused::update_", "CUDA")
    return f"compiled extension: CPU kernel {isa}; CUDA kernels compiled in: {'yes' if cuda else 'no'}; {origin()}"


def backend_report() -> str:
    """A text to paste into bug reports: versions, the compiled extension's CPU kernel (AVX-512,
    AVX2 or default) and CUDA kernels, and why each backend is or is not available.

    Examples:
        >>> backend_report().splitlines()[2].startswith("compiled extension: ")
        True
    """
    import platform

    from .. import __version__

    lines = [
        f"wavg_fused {__version__}, torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
        f"Python {platform.python_version()}, {platform.machine()}",
        f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
        f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r}",
        _extension_line(),
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in BACKEND_NAMES:
        states = []
        for device in devices:
            reason = _reason(name, torch.device(device))
            states.append(f"{device}: {'available' if reason is None else reason}")
        tool = " (test tool)" if any(name in tools for tools in TEST_TOOLS.values()) else ""
        lines.append(f"  {name:13s} " + "; ".join(states) + tool)
    return "\n".join(lines)

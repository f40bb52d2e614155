"""Post-hoc EMA snapshots on disk: one safetensors file per profile and step, written atomically.

A snapshot is named ``<profile index>.<step>.safetensors``, ema-pytorch's ``<index>.<step>.pt``
with another suffix, and carries in its metadata the profile's ``gamma`` and ``t``, the number of
updates its average holds (the time the profile is read at). It is written to a temporary file
in the same folder, flushed to disk, then renamed over the final name (``os.replace``, atomic on
POSIX and Windows), so a crash leaves either the whole file or none under that name; temporary
files left by a crash (``.<name>.<random>.tmp``) are never read. ema-pytorch's own ``.pt``
snapshots are read too (their time is their step), so its folders can be synthesised from.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import torch

__all__ = ["Snapshot", "list_snapshots", "read_tensors", "write_snapshot", "snapshot_path"]

FORMAT = "wavg_fused.posthoc/1"
_NAME = re.compile(r"^(\d+)\.(\d+)\.(safetensors|pt)$")
_EMA_PYTORCH_PREFIX = "ema_model."  # ema-pytorch's KarrasEMA state dict: its module, plus these counters
_EMA_PYTORCH_COUNTERS = ("initted", "step")


def _safetensors() -> ModuleType:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "wavg_fused.PostHocEMA stores its snapshots with safetensors, which is not installed: "
            "pip install 'wavg_fused[posthoc]' (or pip install safetensors)"
        ) from None
    return safetensors.torch


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: profile ``index`` at ``step`` (``update`` calls), averaging ``t``
    updates; ``gamma`` is None in an ema-pytorch file (its profile is known by index only)."""

    path: Path
    index: int
    step: int
    t: int
    gamma: float | None


def snapshot_path(folder: Path, index: int, step: int) -> Path:
    """``folder / "<index>.<step>.safetensors"``.

    >>> snapshot_path(Path("ckpt"), 1, 2000).name
    '1.2000.safetensors'
    """
    return Path(folder) / f"{index}.{step}.safetensors"


def _write_bytes(file: BinaryIO, data: bytes) -> None:
    file.write(data)  # its own function, so a test can make the write fail half-way


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible everywhere (Windows), hence the guard."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_snapshot(folder: Path, index: int, step: int, t: int, gamma: float,
                   tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (contiguous CPU tensors, none sharing memory) as the snapshot of profile
    ``index`` at ``step``, atomically; return its path."""
    metadata = {"format": FORMAT, "index": str(index), "step": str(step), "t": str(t), "gamma": repr(float(gamma))}
    data = _safetensors().save(dict(tensors), metadata=metadata)
    final = snapshot_path(folder, index, step)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            _write_bytes(file, data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(Path(folder))
    return final


def _read_metadata(path: Path) -> dict[str, str]:
    with _safetensors().safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def list_snapshots(folder: Path) -> list[Snapshot]:
    """The snapshots in ``folder``, by step then profile index (temporary files are skipped)."""
    found = []
    for path in Path(folder).iterdir():
        match = _NAME.match(path.name)
        if not match or not path.is_file():
            continue
        index, step = int(match[1]), int(match[2])
        if match[3] == "pt":
            found.append(Snapshot(path, index, step, step, None))
            continue
        metadata = _read_metadata(path)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a wavg_fused post-hoc EMA snapshot (metadata {metadata})")
        found.append(Snapshot(path, index, step, int(metadata["t"]), float(metadata["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.index))


def read_tensors(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The snapshot's tensors (on the CPU), named as in the averaged module's state dict."""
    if snapshot.path.suffix == ".safetensors":
        return _safetensors().load_file(str(snapshot.path))
    state = torch.load(snapshot.path, map_location="cpu", weights_only=True)
    return {key.removeprefix(_EMA_PYTORCH_PREFIX): value for key, value in state.items()
            if key not in _EMA_PYTORCH_COUNTERS}

"""The package's version, written once: ``pyproject.toml``'s ``[project] version``.

Read from that file in a source tree (an editable install's metadata is as old as the last
``pip install -e``), else from the installed distribution's metadata.

>>> import re; bool(re.match(r"\\d+\\.\\d+", version()))
True
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

__all__ = ["version"]


def _from_pyproject() -> str | None:
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not path.is_file():
        return None
    import tomllib

    project = tomllib.loads(path.read_text()).get("project", {})
    return project.get("version") if project.get("name") == "wavg_fused" else None


def version() -> str:
    """``pyproject.toml``'s version in a source tree, the installed one's otherwise, else
    ``"0+unknown"`` (sources copied without either)."""
    found = _from_pyproject()
    if found:
        return found
    try:
        return importlib.metadata.version("wavg_fused")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"

"""A results JSON as a Markdown table (what the README shows), one row per model and dtype case."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["markdown_table"]


def _cell(row: dict[str, Any] | None, fastest_peer: float) -> str:
    if row is None or "unsupported" in row:
        return "n/a"
    cell = f"{row['median_ms']:.3g} ms ({row['pct_limit']:.0f}%)"
    return f"**{cell}**" if row["median_ms"] < fastest_peer else cell


def markdown_table(results: dict[str, Any]) -> str:
    """Median ms per update and percent of the limit, per case and implementation; wavg_fused
    cells faster than every other implementation in bold, and their speedup over the fastest.

    >>> rows = [{"model": "m", "variant": "fp32", "peer": p, "median_ms": t, "pct_limit": 100 / t,
    ...          "speedup": s} for p, t, s in [("timm", 4.0, None), ("wavg_fused[cpu]", 2.0, 2.0),
    ...                                        ("flat lerp_", 1.0, None)]]
    >>> print(markdown_table({"results": rows}).splitlines()[2])
    | m | fp32 | 4 ms (25%) | **2 ms (50%)** | 1 ms (100%) | 2.00x |
    """
    rows = results["results"]
    peers = list(dict.fromkeys(r["peer"] for r in rows if not r["peer"].startswith("flat ")))
    header = ["model", "dtype (model/average)", *peers, "limit", "best speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    cases = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    for model, variant in cases:
        case = {r["peer"]: r for r in rows if (r["model"], r["variant"]) == (model, variant)}
        others = [r["median_ms"] for p, r in case.items()
                  if "unsupported" not in r and not p.startswith(("wavg_fused", "flat "))]
        fastest_peer = min(others) if others else float("inf")
        limit = next(r for p, r in case.items() if p.startswith("flat "))
        speedups = [r["speedup"] for r in case.values() if r.get("speedup") is not None]
        cells = [_cell(case.get(p), fastest_peer) for p in peers]
        best = f"{max(speedups):.2f}x" if speedups else ""
        lines.append(f"| {model} | {variant} | " + " | ".join(cells) + f" | {limit['median_ms']:.3g} ms (100%) | {best} |")
    return "\n".join(lines)


def main_table(path: str) -> str:
    with open(path) as f:
        return markdown_table(json.load(f))

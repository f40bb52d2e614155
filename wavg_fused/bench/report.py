"""A results JSON as a Markdown table (what the README shows), one row per model and dtype case."""

from __future__ import annotations

import json
from typing import Any

from .limit import is_limit

__all__ = ["ResultsError", "load_results", "markdown_table", "main_table"]

_ROW_KEYS = ("model", "variant", "peer")
_TIMED_KEYS = ("median_ms", "pct_limit")


class ResultsError(ValueError):
    """A file that is not a results JSON of ``wavg-fused bench``; the message names the file."""


def load_results(path: str) -> dict[str, Any]:
    """The results JSON at ``path``, checked to have what the table and the figure read.

    >>> load_results("no/such.json")
    Traceback (most recent call last):
    ...
    wavg_fused.bench.report.ResultsError: no/such.json: cannot read it (No such file or directory)
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as error:
        raise ResultsError(f"{path}: cannot read it ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"{path}: not JSON ({error})") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ResultsError(f"{path}: not a results file of `wavg-fused bench` (no 'results' rows)")
    for index, row in enumerate(rows):
        needed = _ROW_KEYS + (() if isinstance(row, dict) and "unsupported" in row else _TIMED_KEYS)
        missing = [key for key in needed if not isinstance(row, dict) or key not in row]
        if missing:
            raise ResultsError(f"{path}: result row {index} lacks {', '.join(missing)}")
    if not any(is_limit(row["peer"]) for row in rows):
        raise ResultsError(f"{path}: no limit row")
    return data


def _cell(row: dict[str, Any] | None, bold: bool) -> str:
    if row is None or "unsupported" in row:
        return "n/a"
    cell = f"{row['median_ms']:.3g} ms ({row['pct_limit']:.0f}%)"
    return f"**{cell}**" if bold else cell


def markdown_table(results: dict[str, Any]) -> str:
    """Median ms per update and percent of the limit, per case and implementation; in bold the
    fastest wavg_fused cell of a case when it beats every other implementation, and its speedup
    over the fastest of those. The limit cell names the proxy that set it (results written before
    the limit was the best of several proxies have ``flat lerp_`` alone).

    >>> rows = [{"model": "m", "variant": "fp32", "peer": p, "median_ms": t, "pct_limit": 100 / t,
    ...          "speedup": s} for p, t, s in [("timm", 4.0, None), ("wavg_fused[cpu]", 2.0, 2.0),
    ...                                        ("wavg_fused[torch]", 3.0, 1.33), ("limit", 1.0, None)]]
    >>> rows[-1]["proxy"] = "flat add_"
    >>> print(markdown_table({"results": rows}).splitlines()[2])
    | m | fp32 | 4 ms (25%) | **2 ms (50%)** | 3 ms (33%) | 1 ms (flat add_) | 2.00x |
    """
    rows = results["results"]
    peers = list(dict.fromkeys(r["peer"] for r in rows if not is_limit(r["peer"])))
    header = ["model", "dtype (model/average)", *peers, "limit", "best speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    cases = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    for model, variant in cases:
        case = {r["peer"]: r for r in rows if (r["model"], r["variant"]) == (model, variant)}
        timed = {p: r for p, r in case.items() if "unsupported" not in r and not is_limit(p)}
        ours = {p: r["median_ms"] for p, r in timed.items() if p.startswith("wavg_fused")}
        others = [r["median_ms"] for p, r in timed.items() if p not in ours]
        fastest = min(ours, key=ours.get) if ours else None
        if fastest is not None and others and ours[fastest] >= min(others):
            fastest = None  # bold means "faster than every other implementation"
        limit = next((r for p, r in case.items() if is_limit(p)), None)
        limit_cell = f"{limit['median_ms']:.3g} ms ({limit.get('proxy', limit['peer'])})" if limit else "n/a"
        speedups = [r["speedup"] for r in case.values() if r.get("speedup") is not None]
        cells = [_cell(case.get(p), p == fastest) for p in peers]
        best = f"{max(speedups):.2f}x" if speedups else ""
        lines.append(f"| {model} | {variant} | " + " | ".join(cells) + f" | {limit_cell} | {best} |")
    return "\n".join(lines)


def main_table(path: str) -> str:
    """``wavg-fused table PATH``: the Markdown table of a results JSON (``ResultsError`` if it is none)."""
    return markdown_table(load_results(path))

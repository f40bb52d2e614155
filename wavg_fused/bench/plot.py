"""The benchmark figure: speedup over the fastest peer, and percent of the limit, per case."""

from __future__ import annotations

from typing import Any

from .limit import is_limit
from .report import load_results

__all__ = ["plot_results"]


def _cases(rows: list[dict[str, Any]]) -> list[str]:
    cases: list[str] = []
    for row in rows:
        case = f"{row['model']}\n{row['variant']}"
        if case not in cases:
            cases.append(case)
    return cases


def _bars(axis: Any, rows: list[dict[str, Any]], peers: list[str], key: str, cases: list[str]) -> None:
    width = 0.8 / max(len(peers), 1)
    for k, peer in enumerate(peers):
        values = []
        for case in cases:
            match = [r for r in rows if f"{r['model']}\n{r['variant']}" == case and r["peer"] == peer]
            values.append(match[0][key] if match and match[0].get(key) is not None else 0.0)
        positions = [i + (k - (len(peers) - 1) / 2) * width for i in range(len(cases))]
        axis.bar(positions, values, width, label=peer)
    axis.set_xticks(range(len(cases)), cases, fontsize=8)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)


def plot_results(json_path: str, png_path: str) -> None:
    """Draw ``png_path`` from a results JSON written by ``wavg-fused bench`` (needs matplotlib).

    Raises ``ResultsError`` for a file that is no results JSON (checked before matplotlib is
    imported, so that error wins) and ``ImportError`` without matplotlib.
    """
    data = load_results(json_path)
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "unsupported" not in r]
    info = {"device": "?", "threads": "?", "torch": "?", "date": "?", "method": "?", **data.get("conditions", {})}
    cases = _cases(rows)
    ours = list(dict.fromkeys(r["peer"] for r in rows if r["peer"].startswith("wavg_fused")))
    others = list(dict.fromkeys(r["peer"] for r in rows if not is_limit(r["peer"])))

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    _bars(left, rows, ours, "speedup", cases)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_ylabel("speedup over the fastest peer (x)")
    left.set_title("wavg_fused backends vs the fastest other implementation")
    _bars(right, rows, others, "pct_limit", cases)
    right.axhline(100.0, color="black", linewidth=0.8)
    right.set_ylabel("% of limit (fastest same-bytes memory mover)")
    right.set_yscale("log")
    right.set_title("every implementation, percent of the limit")
    figure.suptitle(f"wavg-fused bench on {info['device']} ({info['threads']} threads), torch {info['torch']}, "
                    f"{info['date'][:10]}, {info['method']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)

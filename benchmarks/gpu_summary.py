"""summary.md of a ``gpu_suite.sh`` run, from what its phases left so far (rerun after each phase).

    python benchmarks/gpu_summary.py LOGS_DIR OUT_DIR > OUT_DIR/summary.md

Phases, their exit status and seconds; the test counts (JUnit XML) with the failures' first lines;
the benchmark tables (``wavg-fused table``); the environment and the build's register report.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _phases(logs: Path) -> list[str]:
    path = logs / "phases.txt"
    lines = ["| phase | exit | seconds |", "| --- | --- | --- |"]
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, seconds = line.split()
            meaning = {"0": "ok", "124": "timed out", "137": "killed"}.get(status, status)
            lines.append(f"| {name} | {meaning} | {seconds} |")
    return lines


def _tests(logs: Path) -> list[str]:
    path = logs / "tests.xml"
    if not path.exists():
        return ["no test results (the tests phase did not finish)"]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [
        f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
        f"({float(sum(float(s.get('time', 0)) for s in suites)):.0f} s)"
    ]
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is not None:
                message = (problem.get("message") or "").splitlines()[:1]
                lines.append(f"- {kind}: {case.get('classname')}::{case.get('name')}: {' '.join(message)[:300]}")
    return lines


def _bench(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("gpu-bench-*.json")):
        try:
            from wavg_fused.bench.report import main_table

            lines += [f"### {path.name}", "```", main_table(str(path)), "```"]
        except Exception as error:  # a summary must still be written
            lines.append(f"{path.name}: unreadable ({type(error).__name__}: {error})")
    return lines or ["no benchmark results yet"]


def _head(path: Path, lines: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[:lines] if path.exists() else [f"({path.name} missing)"]


def main(logs: Path, out: Path) -> str:
    registers = [line for line in _head(logs / "build.log", 100000) if "registers" in line or "spill" in line]
    parts = [
        "# GPU suite summary",
        *(["**dry run on the CPU** (GPU_SUITE_DRY_RUN=1)"] if (logs / "dry-run.txt").exists() else []),
        "## Phases",
        *_phases(logs),
        "## Tests (pytest -m gpu)",
        *_tests(logs),
        "## Benchmarks",
        *_bench(out),
        "## Environment",
        "```",
        *_head(logs / "env.log", 40),
        *_head(logs / "backends.log", 20),
        "```",
        "## CUDA build (ptxas)",
        "```",
        *(sorted(set(registers)) or ["(no ptxas report)"]),
        "```",
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(Path(sys.argv[1]), Path(sys.argv[2])))

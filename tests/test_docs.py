"""The documentation runs: every ```python block in README.md and docs/**/*.md is executed.

Each page's blocks run in order in one fresh namespace (a page reads as one script), in a
temporary working directory, with tracebacks pointing at the page's own line numbers. A block
that cannot run here carries a marker on the line right before its fence::

    <!-- skip: needs CUDA -->

and the reason is required. Blocks whose reason starts with "needs CUDA" run where CUDA is
available. ```bash blocks are never run. The page list is also checked against mkdocs.yml's
nav, so a guide cannot be left out of the site even where mkdocs is not installed.

mkdocs is not a test dependency (it is the ``docs`` extra): ``test_mkdocs_build_strict`` runs the
strict build where mkdocs and mkdocstrings are installed and skips, saying so, elsewhere; CI runs
the same build in its own step after installing the extra (.ci/run).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

# A fence at the start of a line: its info string, its body, the closing fence.
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:([^\n]*?)-->\Z")  # one line, right before the fence
ANY_SKIP = re.compile(r"<!--\s*skip\b")
# What the pages hold today: fewer means the extractor or a page lost its examples.
MIN_RUNNABLE_BLOCKS = 28


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence; the code starts on the next line
    code: str
    skip: str | None  # the reason, if the block is marked to be skipped

    def runs_here(self) -> bool:
        if self.skip is None:
            return True
        return self.skip.startswith("needs CUDA") and torch.cuda.is_available()


def fences(page: Path) -> list[tuple[str, int, str, str]]:
    """(info string, fence line, code, text before the fence) for each fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(m.group(1).strip(), text.count("\n", 0, m.start()) + 1, m.group(2), text[: m.start()])
            for m in FENCE.finditer(text)]


def python_blocks(page: Path) -> list[Block]:
    blocks = []
    for info, line, code, before in fences(page):
        if info == "python":
            marker = SKIP.search(before.rstrip())
            blocks.append(Block(page, line, code, None if marker is None else marker.group(1).strip()))
    return blocks


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


RUNNABLE_PAGES = [page for page in PAGES if python_blocks(page)]


def test_the_extractor_finds_the_examples():
    blocks = [block for page in PAGES for block in python_blocks(page)]
    runnable = [block for block in blocks if block.skip is None]
    assert len(runnable) >= MIN_RUNNABLE_BLOCKS, f"only {len(runnable)} runnable python blocks found"
    assert _name(ROOT / "README.md") in {_name(page) for page in RUNNABLE_PAGES}
    # the guides that teach an API show it in code that runs
    for guide in ("evaluating", "schedules", "migrating", "checkpoints", "compile-and-graphs", "backends", "semantics"):
        assert any(block.skip is None for block in python_blocks(DOCS / f"{guide}.md")), guide


def test_every_skip_marker_gives_a_reason_and_sits_on_a_python_block():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marked = [block for block in python_blocks(page) if block.skip is not None]
        for block in marked:
            assert block.skip, f"{_name(page)}:{block.line}: a skip marker without a reason"
        assert len(ANY_SKIP.findall(text)) == len(marked), (
            f"{_name(page)}: a skip marker that is malformed or not right before a ```python fence")


def test_python_fences_are_spelled_python():
    # a block fenced ```py or ```Python would silently escape the run
    for page in PAGES:
        for info, line, _, _ in fences(page):
            assert not (info.lower().startswith("py") and info != "python"), f"{_name(page)}:{line}: ```{info}"


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=_name)
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may save checkpoints
    namespace: dict = {"__name__": "__docs__"}
    skipped = []
    for block in python_blocks(page):
        if not block.runs_here():
            skipped.append(f"line {block.line}: {block.skip}")
            continue
        # newlines first, so a traceback names the page's own line
        exec(compile("\n" * block.line + block.code, str(page), "exec"), namespace)
    if skipped:
        print(f"{_name(page)}: skipped " + "; ".join(skipped))


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.search(r"^nav:\n((?:[ \t]+.*\n|\n)*)", text, re.M)
    assert nav, "mkdocs.yml has no nav"
    return re.findall(r"([\w./-]+\.md)\s*$", nav.group(1), re.M)


def test_every_docs_page_is_in_the_nav():
    listed = _nav_pages()
    pages = sorted(page.relative_to(DOCS).as_posix() for page in DOCS.rglob("*.md"))
    assert sorted(listed) == pages, "mkdocs.yml's nav and the files in docs/ differ"
    assert len(set(listed)) == len(listed), "a page is listed twice in the nav"


def test_readme_links_to_docs_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert links, "README links to no docs page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README links to missing pages: {missing}"


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip('mkdocs and mkdocstrings[python] are not installed (pip install -e ".[docs]"); CI builds the site')
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

"""Installing as users do, and the kernels' first-use build (wavg_fused._extension, wavg_fused.build).

Each scenario runs in a fresh Python process on a package that has no compiled extension: a copy
of the package laid out as a wheel installs it, or the wheel pip builds from the sdist with build
isolation on (no torch in the build environment: the issue's `pip install .`).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import wavg_fused as wf
from wavg_fused import _sources

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = [*_sources.CPU_SOURCES, *_sources.cuda_sources(str(CSRC))]
HEADERS = sorted(str(p.relative_to(CSRC)) for p in CSRC.rglob("*.h"))

# Runs first in every child: the development venv's editable install of wavg_fused (a meta-path
# finder) would otherwise resolve wavg_fused._C to the source tree's build.
PROLOGUE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "wavg_fused" not in getattr(f, "__module__", "")]
"""

# One first use: import, two averagers and the report; prints what the test checks as JSON.
FIRST_USE = PROLOGUE + """
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import wavg_fused as wf
    import wavg_fused.watch as watch
    at_import = [str(w.message) for w in caught]
    state_at_import = wf._extension.state()
    model = torch.nn.Linear(5, 3)
    avg = wf.Averager(model, wf.EMA(0.5))
    avg.update(model)
    with torch.no_grad():
        model.weight.add_(2.0)
    avg.update(model)
    again = wf.Averager(model, wf.SWA())
    again.update(model)
    chosen = wf.backends.registry.select_backend("auto", "cpu").name  # what both updates ran on
    report = wf.backend_report()
slow = [str(w.message) for w in caught if issubclass(w.category, wf.SlowPathWarning)]
expected = model.weight - 1.0  # the average of the two weights the model had
print(json.dumps({
    "backend": chosen, "state_at_import": state_at_import,
    "state": wf._extension.state(), "at_import": at_import, "slow": slow, "report": report,
    "correct": torch.allclose(avg.module.weight, expected), "watch_fast": watch._first_moved is not None,
}))
"""


BUILD_COMMAND = PROLOGUE + "import sys, wavg_fused.build as b; sys.exit(b.main([]))"


def child_env(site: Path, **env: str) -> dict[str, str]:
    """This environment, less the switches this suite's own run may have set, with ``site``
    first on the path and ``env`` added."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("WAVG_FUSED_EXPECT_EXT", "WAVG_FUSED_BACKEND", "WAVG_FUSED_JIT", "CXX", "PYTHONPATH")}
    return {**clean, "PYTHONPATH": str(site), **env}


def run_code(code: str, site: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=child_env(site, **env), capture_output=True,
                          text=True, timeout=900)


def run_child(code: str, site: Path, cwd: Path, **env: str) -> tuple[dict, str]:
    """Run ``code`` with ``site`` first on the path; returns its JSON line and its stderr."""
    done = run_code(code, site, cwd, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _tree_without_build(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", "csrc"))


@pytest.fixture(scope="module")
def copied_package(tmp_path_factory) -> Path:
    """The package as a pure wheel installs it (``wavg_fused/csrc`` inside, no ``_C``)."""
    site = tmp_path_factory.mktemp("copied") / "site"
    _tree_without_build(ROOT / "wavg_fused", site / "wavg_fused")
    shutil.copytree(CSRC, site / "wavg_fused" / "csrc")
    return site


def test_version_is_pyprojects():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert wf.__version__ == version


def test_changelog_names_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {wf.__version__}" in changelog


@pytest.mark.skipif("cpu" not in wf.available_backends("cpu"), reason="the compiled extension is not built")
def test_a_loaded_library_is_never_loaded_again(monkeypatch, tmp_path):
    """A second copy of the library would register the ops again, which aborts the process: with
    the ops registered, load() neither builds nor loads another, even with wavg_fused._C hidden."""
    from wavg_fused import _extension

    monkeypatch.setenv("WAVG_FUSED_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match="another build of the extension is loaded"):
        _extension._import_library(Path(wf._C.__file__))
    monkeypatch.setitem(sys.modules, "wavg_fused._C", None)
    with pytest.raises(ImportError, match="ModuleNotFoundError: import of wavg_fused._C halted"):
        _extension.load()
    assert list(tmp_path.iterdir()) == [] and _extension.state() != "failed"


def test_every_source_file_is_built():
    """The one list setup.py and the first-use build read names every .cpp and .cu file."""
    on_disk = {str(p.relative_to(CSRC)) for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu")}
    assert on_disk == set(SOURCES)
    assert len(SOURCES) == len(set(SOURCES))


def test_jit_forbidden_warns_once_and_runs_torch(copied_package, tmp_path):
    out, _ = run_child(FIRST_USE, copied_package, tmp_path, WAVG_FUSED_JIT="0", WAVG_FUSED_CACHE=str(tmp_path / "c"))
    assert out["at_import"] == [] and out["state_at_import"] == "not loaded"
    assert out["backend"] == "torch" and out["correct"]
    assert len(out["slow"]) == 1, out["slow"]
    assert "slow path" in out["slow"][0] and "WAVG_FUSED_JIT=0 forbids" in out["slow"][0]
    assert "cpu           cpu: not loaded (ImportError: the installed package has no compiled extension" in out["report"]
    assert out["report"].splitlines()[2].startswith("compiled extension: not loaded (the installed package has no")
    assert "WAVG_FUSED_JIT=0 forbids" in out["report"].splitlines()[2]
    assert not (tmp_path / "c").exists()


def test_no_compiler_warns_once_and_runs_torch(copied_package, tmp_path):
    out, _ = run_child(FIRST_USE, copied_package, tmp_path, CXX="/nonexistent/c++", WAVG_FUSED_CACHE=str(tmp_path / "c"))
    assert out["backend"] == "torch" and out["correct"]
    assert len(out["slow"]) == 1, out["slow"]
    assert "no C++ compiler to build it ('/nonexistent/c++' not found" in out["slow"][0]
    assert "no C++ compiler" in out["report"]
    assert not list((tmp_path / "c").rglob("built"))


def test_build_command_fails_with_the_reason(copied_package, tmp_path):
    done = run_code(BUILD_COMMAND, copied_package, tmp_path, WAVG_FUSED_JIT="0", WAVG_FUSED_CACHE=str(tmp_path / "c"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "wavg_fused: no compiled kernels: the installed package has no compiled extension" in done.stderr


def test_broken_installed_extension_is_named(copied_package, tmp_path):
    """An installed _C that no longer loads (torch upgraded since) is reported, not just missing;
    with building allowed, first use would build a new one."""
    site = tmp_path / "site"
    shutil.copytree(copied_package, site)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (site / "wavg_fused" / f"_C{suffix}").write_bytes(b"not a shared library")
    out, _ = run_child(FIRST_USE, site, tmp_path, WAVG_FUSED_JIT="0", WAVG_FUSED_CACHE=str(tmp_path / "c"))
    assert out["backend"] == "torch" and len(out["slow"]) == 1
    assert "the installed one did not load (" in out["slow"][0] and "WAVG_FUSED_JIT=0 forbids" in out["slow"][0]


def test_no_sources_warns_once_and_runs_torch(tmp_path):
    site = tmp_path / "site"
    _tree_without_build(ROOT / "wavg_fused", site / "wavg_fused")  # as a wheel of 0.1.0 installed it
    out, _ = run_child(FIRST_USE, site, tmp_path, WAVG_FUSED_CACHE=str(tmp_path / "c"))
    assert out["backend"] == "torch" and len(out["slow"]) == 1
    assert "its sources (csrc/) are not in the installed package" in out["slow"][0]


# -- the scenario: sdist, then `pip install` with build isolation, then first use --------


def _pip(*args: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAVG_FUSED_")}  # a plain `pip install`
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """``python -m build --sdist`` (isolated: its build environment has no torch)."""
    pytest.importorskip("build", reason="the test extra installs `build`")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("wavg_fused-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    """The wheel pip builds from the sdist with build isolation on, as `pip install` does."""
    out = tmp_path_factory.mktemp("wheels")
    _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(sdist), cwd=out)
    (path,) = out.glob("wavg_fused-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("installed") / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(site), str(wheel), cwd=wheel.parent)
    return site


def test_sdist_carries_the_sources(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {f"csrc/{name}" for name in SOURCES + HEADERS} <= names
    assert {"setup.py", "MANIFEST.in", "CHANGELOG.md", "wavg_fused/_sources.py", "wavg_fused/build.py"} <= names
    assert not [name for name in names if name.endswith((".so", ".o"))]


def test_isolated_wheel_is_python_only_with_sources(wheel):
    assert wheel.name.endswith("-py3-none-any.whl")
    assert wheel.name.startswith(f"wavg_fused-{wf.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"wavg_fused/csrc/{name}" for name in SOURCES + HEADERS} <= names
    assert not [name for name in names if name.endswith((".so", ".pyd"))]


@pytest.fixture(scope="module")
def first_uses(installed, tmp_path_factory) -> tuple[list[dict], list[str], Path]:
    """Two processes use the installed package at once on an empty cache (CPU kernels only, to
    keep the build short): one compiles, the other waits on the lock and loads its build."""
    cache = tmp_path_factory.mktemp("cache")
    env = child_env(installed, WAVG_FUSED_CACHE=str(cache), WAVG_FUSED_BUILD_CUDA="0")
    children = [subprocess.Popen([sys.executable, "-c", FIRST_USE], cwd=installed.parent, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [child.communicate(timeout=900) for child in children]
    for child, (_, stderr) in zip(children, results):
        assert child.returncode == 0, stderr
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in results], [err for _, err in results], cache


@pytest.mark.slow  # the build: 2-4 minutes on 2 cores (CI runs slow tests)
def test_first_use_builds_the_cpu_kernel(first_uses):
    outs, stderrs, cache = first_uses
    assert sum(err.count("wavg_fused: compiling its C++ kernels") for err in stderrs) == 1, stderrs
    for out in outs:
        assert out["state_at_import"] == "not loaded" and out["at_import"] == []
        assert out["backend"] == "cpu" and out["correct"] and out["slow"] == [], out["slow"]
        assert "  cpu           cpu: available" in out["report"]
        line = out["report"].splitlines()[2]
        assert line.startswith("compiled extension: CPU kernel ") and "; built on first use" in line, line
    (stamp,) = cache.rglob("built")
    assert stamp.parent.name == "cpu" and json.loads(stamp.read_text())["cuda"] is False
    print(f"first-use build: {json.loads(stamp.read_text())['seconds']} s")


@pytest.mark.slow  # the build: 2-4 minutes on 2 cores (CI runs slow tests)
def test_later_process_loads_the_build_at_import(first_uses, installed):
    _, _, cache = first_uses
    # WAVG_FUSED_JIT=0: forbids compiling, not loading what was compiled
    out, stderr = run_child(FIRST_USE, installed, installed.parent, WAVG_FUSED_CACHE=str(cache),
                            WAVG_FUSED_BUILD_CUDA="0", WAVG_FUSED_JIT="0")
    assert "compiling" not in stderr
    assert out["state_at_import"] == "cached" and out["watch_fast"]  # the address watch's C++ path too
    assert out["backend"] == "cpu" and out["correct"] and out["slow"] == [], out["slow"]


@pytest.mark.slow  # the build: 2-4 minutes on 2 cores (CI runs slow tests)
def test_build_command_reports_the_cached_build(first_uses, installed):
    _, _, cache = first_uses
    done = run_code(BUILD_COMMAND, installed, installed.parent, WAVG_FUSED_CACHE=str(cache), WAVG_FUSED_BUILD_CUDA="0")
    assert done.returncode == 0, done.stderr
    assert "built on first use earlier" in done.stdout and "backends for CPU tensors: cpu, torch" in done.stdout

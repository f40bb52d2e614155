"""The Triton kernel's compiled variants, measured without a GPU.

  python benchmarks/triton_variants.py compile [--arch 90 80] [--json FILE]
      compiles every variant the launches use (``triton_backend.gpu_variants()``) for the
      given SM targets and prints registers, spills, shared memory and whether each pass got
      16-byte (``.v4``) global loads/stores, from the compiled kernel (metadata, cubin, PTX).
  python benchmarks/triton_variants.py count [--json FILE] [pytest args...]
      runs pytest (default: the Triton tests under the interpreter) and records every kernel
      launch; prints how many distinct compilations (Triton cache keys for sm_90: argument
      types, integer/alignment specialisation, constexprs, num_warps) those launches would cause
      on a GPU, per test file and in all.

Both run on the CPU (``count`` under ``TRITON_INTERPRET=1``, ``compile`` without it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["-k", "triton", "tests", "tests/test_stochastic_rounding.py"]


def _machine(arch: str) -> dict:
    import torch
    import triton

    return {
        "machine": f"no GPU ({platform.node()}), compiled for sm_{arch} with triton {triton.__version__}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
    }


# ---- compile -------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else name


def _resources(compiled, arch: int) -> dict:
    """Registers and spills from ptxas -v on the kernel's PTX, stack/shared from the cubin."""
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        (Path(tmp) / "k.cubin").write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(Path(tmp) / "k.cubin")],
                               capture_output=True, text=True).stdout
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([_tool("ptxas"), "-v", f"-arch={sm}", str(Path(tmp) / "k.ptx"), "-o",
                              str(Path(tmp) / "v.cubin")], capture_output=True, text=True).stderr
    field = lambda name, text: int(m.group(1)) if (m := re.search(name, text)) else None  # noqa: E731
    return {
        "registers": field(r"REG:(\d+)", usage),
        "stack_bytes": field(r"STACK:(\d+)", usage),
        "local_bytes": field(r"LOCAL:(\d+)", usage),
        "spill_stores_bytes": field(r"(\d+) bytes spill stores", log),
        "spill_loads_bytes": field(r"(\d+) bytes spill loads", log),
        "shared_bytes": compiled.metadata.shared,
        "ptxas_registers": field(r"Used (\d+) registers", log),
    }


def _accesses(ptx: str) -> dict:
    count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
    return {
        "ld_global_v4": count(r"ld\.global(?:\.\w+)*\.v4"),
        "ld_global_v2": count(r"ld\.global(?:\.\w+)*\.v2"),
        "ld_global_scalar": count(r"ld\.global(?:\.\w+)*\.(?:b|u|s|f)\d+\s"),
        "st_global_v4": count(r"st\.global(?:\.\w+)*\.v4"),
        "st_global_v2": count(r"st\.global(?:\.\w+)*\.v2"),
        "st_global_scalar": count(r"st\.global(?:\.\w+)*\.(?:b|u|s|f)\d+\s"),
        "atomics": count(r"atom\.global"),
        "philox_mul_hi": count(r"mul\.hi\.u32"),
    }


def compile_variants(archs: list[int]) -> list[dict]:
    from triton.backends.compiler import GPUTarget

    from wavg_fused.backends.triton_backend import gpu_variants
    from wavg_fused.triton import aot

    rows = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, args, kwargs in gpu_variants():
            began = time.perf_counter()
            compiled = aot.compile_launch(fn, args, kwargs, target)
            row = {"arch": f"sm_{arch}", "variant": name, "num_warps": kwargs.get("num_warps"),
                   "compile_s": round(time.perf_counter() - began, 1)}
            row.update(_resources(compiled, arch))
            row.update(_accesses(compiled.asm["ptx"]))
            rows.append(row)
            print(_format(row), flush=True)
    return rows


_COLUMNS = ("arch", "variant", "num_warps", "registers", "spill_stores_bytes", "stack_bytes", "shared_bytes",
            "ld_global_v4", "ld_global_scalar", "st_global_v4", "st_global_scalar", "atomics", "compile_s")


def _format(row: dict) -> str:
    return " | ".join(f"{row.get(c)}" for c in _COLUMNS)


# ---- count ---------------------------------------------------------------------------------------

class _Recorder:
    """A pytest plugin that wraps ``kernel.launch_args`` (what every launch passes) and records,
    per launch, the compile key Triton would use for sm_90: once with the interpreter's block
    size, as run, and once with the block size and warps the backend picks for the same plan on
    a GPU (``triton_backend._gpu_config``), which is what a GPU run compiles."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = defaultdict(set)
        self.interpreter_keys: set[str] = set()
        self.launches = 0
        self.current = "?"

    def pytest_configure(self, config):
        import torch

        from wavg_fused.backends import triton_backend
        from wavg_fused.plan import COLUMNS, MODE_AVERAGE, block_table
        from wavg_fused.triton import aot, kernel

        original = kernel.launch_args
        signature = inspect.signature(original)
        with_mode = "mode" in inspect.signature(triton_backend._gpu_config).parameters
        numel_column = COLUMNS.index("numel")
        tolist = torch.Tensor.tolist  # the real one: tests/test_host_reads.py replaces it to catch host reads

        def launch_args(*args, **kwargs):
            result = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if not isinstance(bound.arguments["table"], torch.Tensor):  # a test's stand-ins (test_triton_gpu)
                return result
            self.launches += 1
            self.interpreter_keys.add(aot.compile_key(kernel._wavg_update_kernel, *result))
            numels = tolist(bound.arguments["table"][:, numel_column])
            mode = bound.arguments.get("mode", MODE_AVERAGE)
            block, warps = triton_backend._gpu_config(numels, mode) if with_mode else triton_backend._gpu_config(numels)
            bound.arguments.update(blocks=block_table(numels, block), block=block, num_warps=warps)
            gpu = original(*bound.args, **bound.kwargs)
            self.keys[self.current].add(aot.compile_key(kernel._wavg_update_kernel, *gpu))
            return result

        kernel.launch_args = launch_args

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid.split("::")[0]


def count(pytest_args: list[str]) -> dict:
    import pytest

    recorder = _Recorder()
    status = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[recorder])
    every = set().union(*recorder.keys.values()) if recorder.keys else set()
    per_file = {f: len(k) for f, k in sorted(recorder.keys.items())}
    return {"pytest_args": pytest_args, "pytest_status": int(status), "launches": recorder.launches,
            "compilations": len(every), "compilations_at_interpreter_blocks": len(recorder.interpreter_keys), "compilations_per_file": per_file, "keys": sorted(every)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compile", "count"])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--json")
    known, rest = parser.parse_known_args()
    sys.path.insert(0, str(ROOT))
    if known.what == "compile":
        os.environ.pop("TRITON_INTERPRET", None)
        # a fresh cache, so compile_s is a compilation's time rather than a cache hit
        os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-variants-"))
        print(" | ".join(_COLUMNS))
        result = {**_machine("/".join(map(str, known.arch))), "variants": compile_variants(known.arch)}
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (its own kernels too)
        result = {**_machine("90"), **count(rest or DEFAULT_TESTS)}
        print(f"{result['launches']} launches -> {result['compilations']} compilations on sm_90 at the GPU's "
              f"block sizes ({result['compilations_at_interpreter_blocks']} at the interpreter's)")
        for name, n in result["compilations_per_file"].items():
            print(f"  {name}: {n}")
    if known.json:
        Path(known.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

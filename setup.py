"""Build script. The compiled kernels in ``csrc/`` are optional: without them the package runs on its
pure-PyTorch backend, and builds them on first use (``wavg_fused.build``). Switches (environment
variables, see docs/backends.md):

* ``WAVG_FUSED_BUILD_EXT=0``: Python only, build no extension.
* ``WAVG_FUSED_BUILD_CUDA=0/1``: force the CUDA kernels off/on (default: on when torch is a CUDA
  build and ``nvcc`` is found via ``CUDA_HOME``, else ``/usr/local/cuda``; no GPU is needed).
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default ``8.0;9.0+PTX``).
* ``DEBUG=1``: ``-O0 -g``.
* ``WAVG_FUSED_PTXAS_VERBOSE=1``: print ptxas resource usage (registers, spills) per kernel.

The extension compiles against the torch in the build environment: ``pip install
--no-build-isolation`` after torch builds it now. Under pip's default build isolation there is no
torch, so the wheel is Python only; it carries ``csrc/`` (as ``wavg_fused/csrc``) and compiles it
against the user's torch at first use. Sources and flags come from ``wavg_fused/_sources.py``,
which the first-use build reads too.
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_sources():
    # by path: importing the package would import torch, which the build environment may lack
    spec = importlib.util.spec_from_file_location("_wavg_fused_sources", os.path.join(_HERE, "wavg_fused", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


src = _load_sources()


class BuildPyWithSources(build_py):
    """Also puts ``csrc/`` into the package (``wavg_fused/csrc``), so an installed package without
    ``_C`` can compile it on first use. Editable installs read ``csrc/`` where it is."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "wavg_fused", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(_HERE, "csrc"), target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))


def extensions() -> tuple[list, dict]:
    cmdclass = {"build_py": BuildPyWithSources}
    if src.flag("WAVG_FUSED_BUILD_EXT") is False:
        return [], cmdclass
    cuda_home = src.default_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch's cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("wavg_fused: torch is not importable at build time; building the Python-only package "
              "(it compiles its kernels against your torch on first use)")
        return [], cmdclass

    cmdclass["build_ext"] = BuildExtension
    debug = src.flag("DEBUG") is True
    cxx = src.cxx_flags(debug)
    sources = [f"csrc/{name}" for name in src.CPU_SOURCES]
    kwargs = dict(name="wavg_fused._C", include_dirs=[os.path.abspath("csrc")], extra_link_args=list(src.LINK_FLAGS))
    if not src.want_cuda(torch.version.cuda, CUDA_HOME):
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)], cmdclass

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", src.DEFAULT_CUDA_ARCH_LIST)
    nvcc = src.nvcc_flags(debug, bool(src.flag("WAVG_FUSED_PTXAS_VERBOSE")))
    kwargs["include_dirs"] += src.cuda_include_dirs(os.path.dirname(torch.__file__))
    sources += [f"csrc/{name}" for name in src.cuda_sources("csrc")]
    ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return [ext], cmdclass


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

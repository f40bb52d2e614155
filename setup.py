"""Build script. The compiled kernels in ``csrc/`` are optional: without them the package runs on its
pure-PyTorch backend. Switches (environment variables, see README.md):

* ``WAVG_FUSED_BUILD_EXT=0``: Python only, build no extension.
* ``WAVG_FUSED_BUILD_CUDA=0/1``: force the CUDA kernels off/on (default: on when torch is a CUDA
  build and ``nvcc`` is found via ``CUDA_HOME``, else ``/usr/local/cuda``; no GPU is needed).
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default ``8.0;9.0+PTX``).
* ``DEBUG=1``: ``-O0 -g``.
* ``WAVG_FUSED_PTXAS_VERBOSE=1``: print ptxas resource usage (registers, spills) per kernel.

The extension compiles against the torch in the build environment, so install with
``pip install --no-build-isolation`` after torch.
"""

import glob
import os

from setuptools import setup


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False", "no")


def extensions() -> tuple[list, dict]:
    if _flag("WAVG_FUSED_BUILD_EXT") is False:
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as in some
        # images) points it at a directory without the CUDA libraries.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("wavg_fused: torch is not importable at build time; building the Python-only package")
        return [], {}

    debug = _flag("DEBUG") is True
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # the C++ standard is what torch's headers need; BuildExtension sets it
    # Files compiled for a wider instruction set come last: the linker keeps the first copy of an
    # inline function it sees, and that copy must run on every CPU.
    sources = [
        "csrc/wavg_fused.cpp",
        "csrc/module.cpp",
        "csrc/cpu/update_cpu.cpp",
        "csrc/cuda/update_emulated.cpp",  # the CUDA kernels' code on the CPU (host compiler, always built)
        "csrc/cpu/kernel_default.cpp",
        "csrc/cpu/kernel_avx2.cpp",
        "csrc/cpu/kernel_avx512.cpp",
    ]
    build_cuda = _flag("WAVG_FUSED_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    kwargs = dict(name="wavg_fused._C", include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    if not build_cuda:
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)], {
            "build_ext": BuildExtension
        }

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]  # no fast math: the rule must match the CPU
    nvcc += ["-lineinfo"]
    if _flag("WAVG_FUSED_PTXAS_VERBOSE"):
        nvcc += ["-Xptxas", "-v"]
    include_dirs = kwargs.pop("include_dirs")
    # CUDA headers shipped with torch's CUDA wheels, for toolkits that lack some of them.
    include_dirs += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    ext = CUDAExtension(sources=sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                        **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

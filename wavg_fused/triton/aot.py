"""What a launch of a Triton kernel compiles to on a GPU, worked out without one.

Triton decides per launch which compiled variant runs: argument types, the integers it
specialises (equal to 1, divisible by 16), pointers' 16-byte alignment, the constexprs and the
options (``num_warps``). :func:`compile_key` applies Triton's own binder (the function
``JITFunction.run`` builds) to a launch's arguments for a CUDA target, so it needs no GPU and
works under the interpreter; :func:`compile_launch` compiles exactly what that launch would
compile. Used by ``tests/test_triton_compile.py`` and ``benchmarks/triton_variants.py``; both
rely on Triton internals that are the same in Triton 3.6 and 3.8 (``create_function_from_signature``,
``JITFunction._pack_args``), so a Triton release that moves them breaks those two, not the backend.
"""

from __future__ import annotations

import inspect
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, KernelParam, create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)
SM80 = GPUTarget("cuda", 80, 32)


def jit_function(fn: Any) -> JITFunction:
    """The ``JITFunction`` for ``fn`` (under ``TRITON_INTERPRET=1`` kernels are interpreted
    functions; their source and ``do_not_specialize`` lists are kept, which is all a binder needs)."""
    if isinstance(fn, JITFunction):
        return fn
    options = getattr(fn, "kwargs", {})
    return JITFunction(
        fn.fn,
        do_not_specialize=options.get("do_not_specialize"),
        do_not_specialize_on_alignment=options.get("do_not_specialize_on_alignment"),
    )


def _params(fn: Any) -> tuple[inspect.Signature, list[KernelParam]]:
    # what JITFunction.__init__ builds, without building one (that would disturb the interpreter)
    if isinstance(fn, JITFunction):
        return fn.signature, fn.params
    options = getattr(fn, "kwargs", {})
    dns = options.get("do_not_specialize") or ()
    dns_oa = options.get("do_not_specialize_on_alignment") or ()
    signature = inspect.signature(fn.fn)
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
              for i, p in enumerate(signature.parameters.values())]
    return signature, params


def _bind(fn: Any, args: tuple, kwargs: dict, target: GPUTarget):
    backend = make_backend(target)
    binder = create_function_from_signature(*_params(fn), backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return backend, bound_args, specialization, options


def compile_key(fn: Any, args: tuple, kwargs: dict, target: GPUTarget = SM90) -> str:
    """Triton's in-memory cache key of the launch ``fn[grid](*args, **kwargs)`` on ``target``:
    two launches with the same key share one compilation, every new key is a compilation."""
    _, _, specialization, options = _bind(fn, args, kwargs, target)
    return f"{fn.fn.__name__}{specialization}{sorted(options.items())}"


def compile_launch(fn: Any, args: tuple, kwargs: dict, target: GPUTarget = SM90):
    """``triton.compile`` of what ``fn[grid](*args, **kwargs)`` compiles on ``target`` (the
    signature, constexprs, alignment attributes and options the launch specialises to)."""
    jit = jit_function(fn)
    backend, bound_args, specialization, options = _bind(jit, args, kwargs, target)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)

"""Compiled hot loops, with the same Python code as the fallback.

A kernel is a plain Python function over numpy arrays and scalars, written in the subset
numba compiles. With numba installed (the ``data`` extra; a binary wheel, so no compiler
is needed) ``@kernel`` returns the compiled function, cached on disk per machine. Without
numba, or with ``ZH_COMPILED_KERNELS=0`` in the environment, the same code runs as Python:
the output is identical, only slower, and the first use prints one line saying so.

Why numba (measured in ``bench/kernel_mechanisms.py``): it needs no compiler on the user's
machine, so the install stays one ``pip install``, and its first use costs ~2 s. A C++
extension built with ``torch.utils.cpp_extension`` (DeepSpeed's way) ran the same loop about
twice as fast per call, but needs g++ and ninja on every machine and ~30 s to build, and at
~10 microseconds per chunk the Python around either kernel costs more than the difference.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable)

DISABLE_VARIABLE = "ZH_COMPILED_KERNELS"


def _load_numba():
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"{DISABLE_VARIABLE}=0"
    try:
        import numba
    except ImportError:
        return None, "numba is not installed (pip install numba, or the project's data extra)"
    except Exception as error:  # a broken llvmlite install must not stop the pipeline
        return None, f"numba failed to import ({type(error).__name__}: {error})"
    return numba, None


_numba, _why_not = _load_numba()
COMPILED = _numba is not None
_noticed = False


def kernel(function: F) -> F:
    """Compile ``function`` with numba when available; otherwise return it unchanged.

    The pure-Python original stays reachable as ``.py_func`` either way, so tests can run
    both paths on the same input.
    """
    if _numba is None:
        function.py_func = function  # type: ignore[attr-defined]
        return function
    try:
        return _numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "no locator available": neither the package nor a user cache dir is writable
        return _numba.njit(cache=False, nogil=True)(function)


def run_kernel(function: Callable, compiled: bool, *args: Any) -> Any:
    """``function(*args)``: the compiled kernel, or with ``compiled=False`` its Python twin. The twin runs
    without numpy's scalar overflow warnings, since the random streams' uint64 arithmetic wraps on purpose."""
    if compiled and COMPILED:
        return function(*args)
    with np.errstate(over="ignore"):
        return function.py_func(*args)


def notice_if_pure_python(stage: str) -> None:
    """One stderr line per process when kernels run as Python."""
    global _noticed
    if COMPILED or _noticed:
        return
    _noticed = True
    print(f"{stage}: compiled kernels off ({_why_not}); running them as Python: same output, slower",
          file=sys.stderr)

"""Numba set-up shared by every CPU kernel module: the on-disk cache, the `jit`
decorator, and the float32 fused multiply-add.

Cache. Kernels are `njit(cache=True)` functions. Numba keys a cached function
by its own file only, so a kernel whose helper (in another module) changed
would load stale machine code; the cache therefore lives in a directory named
by a hash of every source file of the CPU backend and the Numba version:

    $QNNJIT_CACHE_DIR/numba/<hash>/        (default ~/.cache/qnnjit/numba/<hash>)

`QNNJIT_CACHE_DIR=""` turns caching off; `NUMBA_CACHE_DIR`, when set, wins
(Numba's own convention). Processes share the directory safely: the
executor gives every cached function a save under a file lock, and a cold
warm-up compiles with a helper process into it (`../compile_jobs.py`).
The directory must be chosen before the kernel modules are imported (Numba
fixes it when a function is decorated), so the kernels package imports this
module first.

FMA. `fma_f32(a, b, c)` is LLVM's `llvm.fma.f32`: `round32(a * b + c)` with
one rounding (a `vfmadd` where the CPU has FMA, else libm's correctly rounded
`fmaf`). ONNX Runtime's QLinearAdd relies on it; plain Numba code never
contracts `a * b + c` (fastmath is off everywhere here), so every other float
expression in the kernels rounds after each operation, like NumPy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .... import diskcache

_BACKEND_DIR = Path(__file__).resolve().parent.parent


def _source_hash() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    for path in sorted(_BACKEND_DIR.rglob("*.py")):
        h.update(str(path.relative_to(_BACKEND_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path | None:
    """Where compiled kernels persist, or None when caching is off."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    root = diskcache.cache_dir()
    return None if root is None else root / "numba" / _source_hash()


CACHE_DIR = cache_dir()
_CACHE = CACHE_DIR is not None


class numba_cache_dir:
    """Context manager: Numba functions decorated inside it cache to CACHE_DIR."""

    def __enter__(self):
        self._saved = numba.config.CACHE_DIR
        if CACHE_DIR is not None and not os.environ.get("NUMBA_CACHE_DIR"):
            numba.config.CACHE_DIR = str(CACHE_DIR)
        return self

    def __exit__(self, *exc):
        numba.config.CACHE_DIR = self._saved
        return False


def jit(*, inline: bool = False):
    """`numba.njit` as every kernel uses it: cached, no GIL, no fastmath.
    `inline=True` for the small per-element helpers: Numba then inlines them
    into each caller before typing, which removes the per-call reference
    counting of their array arguments (it cost ~80 ns per element)."""
    return numba.njit(
        cache=_CACHE, nogil=True, error_model="numpy", inline="always" if inline else "never"
    )


# Index arithmetic in hot loops goes through U (uint64): Numba wraps negative
# indices of signed type (`a[-1]`), a check that blocks vectorization when
# LLVM cannot prove an index non-negative; unsigned indices have no such case.
U = np.uint64


@intrinsic
def fma_f32(typingctx, a, b, c):
    """float32 fused multiply-add, one rounding (`llvm.fma.f32`)."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3))
        return builder.call(fn, args)

    return sig, codegen

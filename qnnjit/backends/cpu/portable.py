"""The portable microkernel: the microkernel ABI (``ukernels``) in plain Numba loops.

A C callback (``numba.cfunc``, cached on disk), so the very same Numba driver
loops (``drivers``) run it through its address like the LLVM kernels; its own
module because a cfunc compiles on import, and only the portable path needs it.

Being generic, it reads the ABI's ``desc`` argument (specialized kernels ignore
it): ``rows | NR << 16 | a_xor << 32``, where ``a_xor = 0x80`` turns a signed A
byte into ``a + 128`` read as u8 (compensated by ``init``, as in the SIMD
kernels). It reads weights in the ``"kn"`` layout (``packing``): each k a
contiguous row of NR bytes, so the inner loop (``acc[r, :] += a[r, k] *
B[k, :]``, int32) vectorizes. Numba's int32 arithmetic is computed wider and
stored back truncated, i.e. wrapped modulo 2**32: exactly the i32 result.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, types

__all__ = ["portable_ukernel"]

_PORTABLE_SIG = types.void(
    types.voidptr,
    types.int64,
    types.voidptr,
    types.int64,
    types.voidptr,
    types.int64,
    types.voidptr,
    types.int64,
    types.int64,
    types.int64,
)


@cfunc(_PORTABLE_SIG, cache=True, nopython=True)
def portable_ukernel(a_p, lda, b_p, kg, c_p, ldc, init_p, nvalid, accumulate, desc):
    rows = desc & 0xFFFF
    nr = (desc >> 16) & 0xFFFF
    a_xor = (desc >> 32) & 0xFF
    a = carray(a_p, ((rows - 1) * lda + 4 * kg,), np.uint8)
    b = carray(b_p, (kg * 4 * nr,), np.int8)
    c = carray(c_p, ((rows - 1) * ldc + nvalid,), np.int32)
    init = carray(init_p, (nr,), np.int32)
    acc = np.empty((rows, nr), np.int32)
    for r in range(rows):
        for j in range(nr):
            acc[r, j] = c[r * ldc + j] if accumulate and j < nvalid else init[j]
    for kk in range(4 * kg):
        brow = b[kk * nr : (kk + 1) * nr]
        for r in range(rows):
            x = np.int32(a[r * lda + kk] ^ a_xor)
            for j in range(nr):
                acc[r, j] += x * brow[j]
    for r in range(rows):
        for j in range(nvalid):
            c[r * ldc + j] = acc[r, j]

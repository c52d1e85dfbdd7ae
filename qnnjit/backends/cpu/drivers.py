"""The Numba blocking loops around the GEMM microkernels (every ISA path).

Every function here is generic over tile sizes (they are run-time arguments),
so Numba compiles each once and caches it on disk (``cache=True``); nothing is
specialized per layer.

Work split. C is cut into tasks of MC rows x NC columns; tasks are independent
(each owns its C block for the whole K loop), so threads need no
synchronization beyond taking distinct tasks: ``run_tasks`` (a range),
``run_claimed`` (claim from an atomic counter until none is left: what
``gemm``'s helper threads run), ``run_parallel`` (``prange``). Inside a task,
the loop order is

    for k0 in KC blocks:              # C block re-read from L1/L2 when k0 > 0
        for n0 in NR panels:          # B micro-panel (KC x NR, contiguous) stays in L1/L2
            for m0 in MR row tiles:   # A rows (MR x KC, strided, unpacked) from L2
                ukernel(rows, ...)

(The convolutions' requantizing loops, `kernels/_gemm.gemm_requant_rows`,
put the panels outermost instead: ukernels PREFETCH_DOC.)

A is read in place (row stride ``lda``), never packed: its four k per
broadcast are already contiguous in a row-major A, and packing would cost a
full pass over A (up to a third of the run time for N = 64 layers).

Microkernels are called through their addresses (``calls.call_ukernel``, an
intrinsic that emits an indirect call), so the compiled driver holds no
process-specific pointer and stays cacheable. ``fptrs[rows - 1]`` is the kernel
for a tile of ``rows`` rows; only full tiles and the one remainder of M occur.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .calls import call_ukernel

__all__ = [
    "run_tasks",
    "run_claimed",
    "run_serial",
    "run_parallel",
    "task_count",
    "row_sums",
]


@njit(cache=True, nogil=True)
def _task(t, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg, mc, nc,
          n_nblocks, desc):  # fmt: skip
    m0 = (t // n_nblocks) * mc
    n0 = (t % n_nblocks) * nc
    m1 = min(m, m0 + mc)
    n1 = min(n, n0 + nc)
    k0 = 0
    while True:
        kg = min(kcg, k_groups - k0)
        accumulate = 1 if k0 > 0 else 0
        for nn in range(n0, n1, nr):
            bp = b + (nn // nr) * panel_bytes + k0 * nr * 4
            nvalid = min(nr, n - nn)
            for mm in range(m0, m1, mr):
                rows = min(mr, m1 - mm)
                call_ukernel(fptrs[rows - 1], a + mm * lda + k0 * 4, lda, bp, kg,
                             c + (mm * ldc + nn) * 4, ldc, init + nn * 4, nvalid, accumulate,
                             desc | rows)  # fmt: skip
        k0 += kcg
        if k0 >= k_groups:
            break


def task_count(m: int, n: int, mc: int, nc: int) -> int:
    """How many tasks (MC x NC blocks of C) the drivers split a GEMM into."""
    return -(-m // mc) * -(-n // nc)


@njit(cache=True, nogil=True)
def run_tasks(t0, t1, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg,
              mc, nc, desc):  # fmt: skip
    """Tasks ``[t0, t1)`` of C = A @ B on the calling thread (tasks are MC x NC
    blocks of C, row-block major; ``task_count``). Threads running disjoint
    ranges of one GEMM write disjoint parts of C: no synchronization needed."""
    n_nblocks = (n + nc - 1) // nc
    for t in range(t0, t1):
        _task(t, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg, mc, nc,
              n_nblocks, desc)  # fmt: skip


@intrinsic
def _fetch_add(typingctx, counter, delta):
    """``counter[0] += delta`` atomically (sequentially consistent); returns the
    old value. ``counter``: a contiguous int64 array."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None
    sig = types.int64(counter, types.int64)

    def codegen(context, builder, signature, llargs):
        array = context.make_array(signature.args[0])(context, builder, llargs[0])
        delta = context.cast(builder, llargs[1], signature.args[1], types.int64)
        return builder.atomic_rmw("add", array.data, delta, "seq_cst")

    return sig, codegen


@njit(cache=True, nogil=True)
def run_claimed(counter, tasks, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init,
                mr, kcg, mc, nc, desc):  # fmt: skip
    """Claim tasks from the shared ``counter`` (int64 [1], starting at 0) until
    ``tasks`` are taken, running each: every thread calls this once, so a
    thread slowed down by others simply claims fewer tasks, and the GIL is
    released for the whole run."""
    n_nblocks = (n + nc - 1) // nc
    while True:
        t = _fetch_add(counter, 1)
        if t >= tasks:
            break
        _task(t, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg, mc, nc,
              n_nblocks, desc)  # fmt: skip


@njit(cache=True, nogil=True)
def run_serial(fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg, mc, nc,
               desc):  # fmt: skip
    """C = A @ B, every task, on the calling thread.

    Arguments (addresses are integers): ``fptrs`` int64 [MR], the microkernel
    for each row count; ``a``/``lda``: A's address and row stride in bytes (K
    padded to ``4*k_groups`` readable bytes per row); ``b``/``panel_bytes``:
    the packed weights and the bytes of one NR panel (``k_groups*NR*4``);
    ``c``/``ldc``: C's address and row stride in int32 elements; ``init``:
    NR-padded int32 start values per column; ``mr``, ``kcg`` (KC/4), ``mc``,
    ``nc``: the tiles; ``desc``: ``NR << 16 | a_xor << 32`` for the portable
    kernel (0 for the LLVM kernels)."""
    tasks = ((m + mc - 1) // mc) * ((n + nc - 1) // nc)
    run_tasks(0, tasks, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg,
              mc, nc, desc)  # fmt: skip


@njit(cache=True, nogil=True, parallel=True)
def run_parallel(fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg, mc,
                 nc, desc):  # fmt: skip
    """``run_serial`` with the tasks spread over Numba's threads (``prange``)."""
    n_nblocks = (n + nc - 1) // nc
    tasks = ((m + mc - 1) // mc) * n_nblocks
    for t in prange(tasks):
        _task(t, fptrs, a, lda, m, k_groups, b, panel_bytes, nr, c, ldc, n, init, mr, kcg, mc, nc,
              n_nblocks, desc)  # fmt: skip


@njit(cache=True, nogil=True)
def row_sums(a):
    """``sum_k a[m, k]`` per row, int32 (wrapping like the GEMM; exact for K < 2**23)."""
    m, k = a.shape
    out = np.empty(m, np.int32)
    for i in range(m):
        s = np.int64(0)
        for j in range(k):
            s += np.int64(a[i, j])
        out[i] = np.int32(s & 0xFFFFFFFF)
    return out

"""Multi-threading for the CPU kernels: contiguous ranges of a kernel's tasks
on the GEMM engine's helper threads (`backends/cpu/threadpool.py`).

Every kernel takes a task range `(t0, t1, ...)` and releases the GIL
(`nogil=True`), so Python threads run ranges in parallel. This replaces
Numba's `parallel=True`, whose compile cost (1-3 s more per kernel, measured)
would dominate the time to first inference; the price is a thread hand-off,
paid only when a call has enough work to amortize it. The helpers are woken
on a CPU other than the caller's: with a plain thread pool, Linux ran the
woken helper on the caller's CPU and a ResNet-18 layer gained 1.0-1.5x
from a second core; see `threadpool`.
"""

from __future__ import annotations

from ..spinteam import run_ranges_spinning

# Below this many operations (multiply-adds, or elements for elementwise
# kernels, weighted by the caller) a call runs on the calling thread only.
MIN_PARALLEL_WORK = 1 << 20


def run_tasks(kernel, tasks: int, work: float, threads: int, *args) -> None:
    """`kernel(t0, t1, *args)` over the tasks [0, tasks), split into at most
    `threads` contiguous ranges when `work` is worth it."""
    if threads <= 1 or tasks <= 1 or work < MIN_PARALLEL_WORK:
        kernel(0, tasks, *args)
        return
    run_ranges_spinning(kernel, tasks, threads, *args)

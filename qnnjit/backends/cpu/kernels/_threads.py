"""Multi-threading for the CPU kernels: contiguous ranges of a kernel's tasks
on a shared thread pool.

Every kernel takes a task range `(t0, t1, ...)` and releases the GIL
(`nogil=True`), so Python threads run ranges in parallel. This replaces
Numba's `parallel=True`, whose compile cost (1-3 s more per kernel, measured)
would dominate the time to first inference; the price is a thread hand-off
(about 10-30 us), paid only when a call has enough work to amortize it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

# Below this many operations (multiply-adds, or elements for elementwise
# kernels, weighted by the caller) a call runs on the calling thread only.
MIN_PARALLEL_WORK = 1 << 20

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qnnjit-cpu")
            _POOL_SIZE = workers
        return _POOL


def run_tasks(kernel, tasks: int, work: float, threads: int, *args) -> None:
    """`kernel(t0, t1, *args)` over the tasks [0, tasks), split into at most
    `threads` contiguous ranges when `work` is worth it."""
    parts = min(threads, tasks)
    if parts <= 1 or work < MIN_PARALLEL_WORK:
        kernel(0, tasks, *args)
        return
    bounds = [tasks * i // parts for i in range(parts + 1)]
    pool = _pool(threads - 1)
    futures = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, parts)]
    try:
        kernel(bounds[0], bounds[1], *args)
    finally:
        for future in futures:
            future.result()

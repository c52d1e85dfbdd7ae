"""Multi-threading for the CPU kernels: contiguous ranges of a kernel's tasks
on the spinning helper team (`backends/cpu/spinteam.py`).

Every kernel takes a task range `(t0, t1, ...)` and releases the GIL
(`nogil=True`), so Python threads run ranges in parallel. This replaces
Numba's `parallel=True`, whose compile cost (1-3 s more per kernel, measured)
would dominate the time to first inference; the price is a thread hand-off
(about 7-9 us here, `spinteam`), paid only when a call has enough work to
amortize it.
"""

from __future__ import annotations

from ..spinteam import run_ranges_spinning

# Below this much work (operations weighted by the caller so that this is
# roughly 15 us on one thread) a call runs on the calling thread only. A
# layer of 30-60 us gains 1.2-1.5x from a second thread (the hand-off is
# ~10 us), and one left on one thread runs slower while the helper spins
# beside it (`spinteam._pause`), so splitting pays from about 20 us of work
# (MobileNetV2 at 2 threads: the 28x28 and smaller layers went 10-35%
# faster than with the threshold at 4x this).
MIN_PARALLEL_WORK = 1 << 18


def run_tasks(kernel, tasks: int, work: float, threads: int, *args) -> None:
    """`kernel(t0, t1, *args)` over the tasks [0, tasks), split into at most
    `threads` contiguous ranges when `work` is worth it."""
    if threads <= 1 or tasks <= 1 or work < MIN_PARALLEL_WORK:
        kernel(0, tasks, *args)
        return
    run_ranges_spinning(kernel, tasks, threads, *args)

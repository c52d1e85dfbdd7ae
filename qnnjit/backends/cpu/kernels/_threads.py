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

import functools
import threading
from collections.abc import Callable
from typing import NamedTuple

from ..spinteam import bind_moving_ranges, bind_ranges, bind_serial, run_ranges_spinning

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
    `threads` contiguous ranges when `work` is worth it. Inside `recording()`
    the call is also appended to the recorder's list."""
    calls = getattr(_RECORDER, "calls", None)
    if calls is not None:
        calls.append(TaskCall(kernel, tasks, work, threads, args))
    if _serial(tasks, work, threads):
        kernel(0, tasks, *args)
        return
    run_ranges_spinning(kernel, tasks, threads, *args)


class TaskCall(NamedTuple):
    """One recorded `run_tasks` call."""

    kernel: Callable
    tasks: int
    work: float
    threads: int
    args: tuple

    def bound(self) -> Callable[[], None]:
        """The call as a function of no arguments, its thread split decided
        once: what `backends/cpu/replay.py` repeats."""
        kernel, tasks, work, threads, args = self
        if _serial(tasks, work, threads):
            call = bind_serial(kernel, tasks, args)
            if call is None:
                call = functools.partial(_entry_point(kernel, (0, tasks, *args)), 0, tasks, *args)
            return call
        return bind_ranges(kernel, tasks, threads, args)

    def rebinding(self, moving: tuple[int, ...]) -> Callable[[tuple], None] | None:
        """The call as a function of its arguments, of which the arrays at
        positions `moving` are others each time, of the same types, shapes
        and strides (views of a graph input), the thread split decided once:
        what `replay.py` repeats for a step that reads a graph input. None
        where such a call cannot be bound (`bind_moving_ranges`)."""
        kernel, tasks, work, threads, args = self
        if _serial(tasks, work, threads):
            entry = _entry_point(kernel, (0, tasks, *args))
            return lambda call_args: entry(0, tasks, *call_args)
        return bind_moving_ranges(kernel, tasks, threads, args, moving)


def _entry_point(kernel, args: tuple) -> Callable:
    """The compiled overload of the Numba `kernel` for exactly `args`' types,
    called without the dispatcher's type resolution (0.43 instead of 0.75 us a
    call of 18 arguments: 5 us of an attention block's 165 us at one thread);
    `kernel` itself when it has none (a Python function, types not compiled)."""
    overloads = getattr(kernel, "overloads", None)
    if overloads is None:
        return kernel
    try:
        types = tuple(kernel.typeof_pyval(a) for a in args)
    except (TypeError, ValueError):  # an argument Numba cannot type
        return kernel
    compiled = overloads.get(types)
    return kernel if compiled is None else compiled.entry_point


class recording:
    """`with recording() as calls:` collects this thread's `run_tasks` calls
    made inside the block (a nested block collects its own)."""

    def __enter__(self) -> list[TaskCall]:
        self._outer = getattr(_RECORDER, "calls", None)
        _RECORDER.calls = []
        return _RECORDER.calls

    def __exit__(self, *exc) -> None:
        _RECORDER.calls = self._outer


def _serial(tasks: int, work: float, threads: int) -> bool:
    return threads <= 1 or tasks <= 1 or work < MIN_PARALLEL_WORK


_RECORDER = threading.local()

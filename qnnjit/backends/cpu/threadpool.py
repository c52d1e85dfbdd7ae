"""Helper threads for GIL-free kernels, woken on a CPU other than the caller's.

Why. A Python pool thread sleeps between calls; when the caller wakes it,
Linux's wake-affine heuristic tends to run it on the *caller's* CPU, where it
time-slices with the caller instead of using the idle core. Measured on the
2-core Zen 4 VM (784x128x1152 int8 GEMM, two threads): a plain
``ThreadPoolExecutor`` gave 370/350 GOPS (best/median), no better than one
thread (415/400); with the helper kept off the caller's CPU, 680/530. Spinning
thread teams (OpenMP, ONNX Runtime) avoid the problem by never sleeping, at
the price of burning cores other processes want (on a loaded machine Numba's
OpenMP layer then collapses: a 64^3 GEMM took 2 ms instead of 16 us).

How. Before waking helpers, each one's CPU affinity is set to every CPU but
the one the caller runs on now (``sched_getcpu``), so the wake-up lands
elsewhere; once the caller's own share is done it waits, its CPU is free, and
helpers still running get their full affinity back (a helper stuck behind
another process on its CPU may then move to the caller's). Two syscalls per
helper per call, a few microseconds. Without ``sched_getcpu`` /
``sched_setaffinity`` (not Linux) helpers are plain threads.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_on_threads", "run_ranges"]


class _Helper:
    """One thread with its own queue; ``tid`` is its kernel thread id."""

    def __init__(self, index: int):
        ready = threading.Event()
        self.tid = None

        def record():
            self.tid = threading.get_native_id()
            ready.set()

        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix=f"qnnjit-helper{index}", initializer=record
        )
        self.pool.submit(lambda: None).result()
        ready.wait()


def _sched_getcpu():
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return fn


_GETCPU = _sched_getcpu()
_CPUS = frozenset(os.sched_getaffinity(0)) if _GETCPU is not None else frozenset()
_LOCK = threading.Lock()
_HELPERS: list[_Helper] = []


def _helpers(count: int) -> list[_Helper]:
    with _LOCK:
        while len(_HELPERS) < count:
            _HELPERS.append(_Helper(len(_HELPERS)))
        return _HELPERS[:count]


def _set_affinity(tid, cpus) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError:  # a CPU went offline, or a sandbox forbids it: not needed
        pass


def _wake(kernel, count: int, calls) -> list:
    """Submit ``calls`` (argument tuples) to ``count`` helpers, kept off this CPU."""
    helpers = _helpers(count)
    if _GETCPU is not None and len(_CPUS) > 1:
        elsewhere = _CPUS - {_GETCPU()}
        for h in helpers:
            _set_affinity(h.tid, elsewhere)
    return [(h, h.pool.submit(kernel, *args)) for h, args in zip(helpers, calls)]


def _join(futures) -> None:
    for h, f in futures:
        if not f.done() and _GETCPU is not None and len(_CPUS) > 1:
            _set_affinity(h.tid, _CPUS)
    for _, f in futures:
        f.result()


def run_on_threads(fn, threads: int, *args) -> None:
    """``fn(*args)`` on the calling thread and on ``threads - 1`` helpers at once
    (``fn`` shares the work out itself, e.g. by claiming tasks from an atomic
    counter, and should release the GIL); returns when all are done."""
    futures = _wake(fn, threads - 1, [args] * (threads - 1)) if threads > 1 else []
    try:
        fn(*args)
    finally:
        _join(futures)


def run_ranges(kernel, tasks: int, threads: int, *args) -> None:
    """``kernel(t0, t1, *args)`` over ``[0, tasks)`` cut into ``threads``
    contiguous ranges, the first on the calling thread."""
    parts = max(1, min(threads, tasks))
    bounds = [tasks * i // parts for i in range(parts + 1)]
    calls = [(bounds[i], bounds[i + 1], *args) for i in range(1, parts)]
    futures = _wake(kernel, parts - 1, calls) if parts > 1 else []
    try:
        kernel(bounds[0], bounds[1], *args)
    finally:
        _join(futures)

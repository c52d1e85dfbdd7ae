"""A team of helper threads that spin briefly between kernels instead of sleeping.

Why. A model runs one kernel after another, each split over the cores, every
few hundred microseconds. A helper that sleeps between them must be woken
each time, and on this 2-vCPU VM waking a thread on the idle vCPU took about
100 us (a ResNet-18 7x7 layer: 0.05 ms on one thread, 0.15 ms on two), which
ate most of what the second core gained. So after each piece of work a helper
waits for the next one by spinning, GIL-free, on a generation counter for
about `SPIN_SECONDS`, and only then sleeps on a condition variable. The
price: a helper burns its core for that long after the last kernel of a run
(ONNX Runtime's and OpenMP's thread teams spin likewise).

Protocol, per helper (one `int64[2]` array: generation, completions):
the caller stores the work, then bumps the generation under the helper's
condition (so a sleeping helper cannot miss it) and runs its own share; the
helper sees the new generation (spinning, or woken), runs the work, and bumps
its completion count, on which the caller spins (GIL-free) when its share is
done. Exceptions in a helper are re-raised in the caller.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .drivers import _fetch_add

__all__ = ["run_ranges_spinning", "SPIN_SECONDS"]

SPIN_SECONDS = 0.002
_CHECKS_PER_SECOND = 2_000_000_000  # measured: about 0.5 ns per check (one atomic load)


@intrinsic
def _load_acquire(typingctx, array, index):
    """``array[index]`` as an atomic (acquire) load, so a spin loop re-reads it."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.int64(array, types.int64)

    def codegen(context, builder, signature, llargs):
        arr = context.make_array(signature.args[0])(context, builder, llargs[0])
        index = context.cast(builder, llargs[1], signature.args[1], types.int64)
        ptr = builder.gep(arr.data, [index])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@njit(cache=True, nogil=True)
def _spin_until_changed(state, index, old, checks):
    """Spin (GIL-free) until ``state[index] != old`` or ``checks`` reads pass;
    returns the last value read."""
    v = old
    for _ in range(checks):
        v = _load_acquire(state, index)
        if v != old:
            break
    return v


@njit(cache=True, nogil=True)
def _complete_and_spin(state, seen, checks):
    """Bump the completion count, then spin for the next generation, in one
    GIL-free call: the caller, spinning on that count, then finds the GIL
    free (a separate bump call would take it just when the caller wants it)."""
    _fetch_add(state[1:], 1)
    return _spin_until_changed(state, 0, seen, checks)


class _Helper:
    def __init__(self, index: int):
        self.state = np.zeros(2, np.int64)  # generation, completions
        self.cond = threading.Condition()
        self.work = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"qnnjit-spin{index}", daemon=True)
        self.thread.start()

    def _loop(self):
        seen = 0
        checks = int(SPIN_SECONDS * _CHECKS_PER_SECOND)
        gen = _spin_until_changed(self.state, 0, seen, checks)
        while True:
            if gen == seen:
                with self.cond:
                    while self.state[0] == seen:
                        self.cond.wait()
                    gen = int(self.state[0])
            seen = gen
            kernel, args = self.work
            try:
                kernel(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.error = exc
            gen = _complete_and_spin(self.state, seen, checks)

    def start(self, kernel, args) -> int:
        """Hand `kernel(*args)` over; returns the completion count to wait for."""
        target = int(self.state[1]) + 1
        self.work = (kernel, args)
        with self.cond:
            self.state[0] += 1
            self.cond.notify()
        return target

    def wait(self, target: int) -> BaseException | None:
        """Wait until the work handed over as `target` is done; its exception."""
        while _spin_until_changed(self.state, 1, target - 1, 1 << 20) != target:
            time.sleep(0)  # the helper is descheduled: let others run
        error, self.error = self.error, None
        return error


_LOCK = threading.Lock()  # guards the team's growth
_LOCK_CALL = threading.Lock()  # one kernel on the team at a time
_TEAM: list[_Helper] = []


def _team(count: int) -> list[_Helper]:
    with _LOCK:
        while len(_TEAM) < count:
            _TEAM.append(_Helper(len(_TEAM)))
        return _TEAM[:count]


def run_ranges_spinning(kernel, tasks: int, threads: int, *args) -> None:
    """``kernel(t0, t1, *args)`` over ``[0, tasks)`` cut into ``threads``
    contiguous ranges, the first on the calling thread, the others on spinning
    helpers. One caller at a time (the executor runs one kernel at a time)."""
    parts = max(1, min(threads, tasks))
    bounds = [tasks * i // parts for i in range(parts + 1)]
    helpers = _team(parts - 1)
    with _LOCK_CALL:
        targets = [
            h.start(kernel, (bounds[i + 1], bounds[i + 2], *args)) for i, h in enumerate(helpers)
        ]
        try:
            kernel(bounds[0], bounds[1], *args)
        finally:  # every helper finished before anything is raised
            errors = [h.wait(target) for h, target in zip(helpers, targets)]
        for error in errors:
            if error is not None:
                raise error

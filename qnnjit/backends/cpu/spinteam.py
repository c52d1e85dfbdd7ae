"""A team of helper threads that spin briefly between kernels instead of sleeping.

Why spin. A model runs one kernel after another, each split over the cores,
every few tens to hundreds of microseconds. A helper that sleeps between them
must be woken each time, and on this 2-vCPU VM waking a thread on the idle
vCPU took about 100 us (a ResNet-18 7x7 layer: 0.05 ms on one thread, 0.15 ms
on two), which ate most of what the second core gained. So after each piece
of work a helper waits for the next one by spinning, GIL-free, on a
generation counter for about `SPIN_SECONDS`, and only then sleeps on a
condition variable. The price: a helper burns its core for that long after
the last kernel of a run (ONNX Runtime's and OpenMP's thread teams spin
likewise).

Why the hand-off runs in compiled code. Two threads that both need the GIL at
once cost a futex sleep and a wake-up of the loser, tens of microseconds
here. With the kernel called from Python on both sides, that happened twice
per call: a hand-off to one helper and back cost 14-25 us, more than many of
MobileNetV2's layers gain from a second core. So for a Numba kernel
(`Dispatcher`) the caller makes one GIL-free call, `_lead`, that publishes
the work (bumps each helper's generation), runs the caller's own range and
spins until the helpers' completions arrive; a helper that sees its new
generation finds the GIL free (the caller is inside `_lead`), makes one
call, `_follow`, that runs its range, bumps its completion count and spins
for the next generation. Both call the kernel's compiled code through its
native entry point (`_native_entry`: the address of the overload for these
argument types, looked up by Numba's own type fingerprint of the argument
tuple), so neither holds the GIL while the other wants it. About 4 us a
hand-off (measured, trivial kernel).

State, per helper: one row of `_STATES` (int64, a cache line of its own):
generation (the caller's count of calls handed over), completions (the
helper's count of calls finished), error (the last range's status), sleeping
(1 while the helper waits on its condition). Between calls, generation ==
completions. A sleeping helper cannot see a GIL-free bump, so the caller
bumps it in Python under its condition and notifies it; `_lead` skips those
rows (`skip`). A helper going to sleep just as a GIL-free bump arrives may
miss it: `_lead` then gives up waiting after `_LEAD_CHECKS` and the caller
notifies from Python until the completion arrives.

Errors. A range whose Numba kernel returned an error status runs again on the
calling thread through the dispatcher, which raises the exception itself
(kernels are deterministic). A plain Python callable (tests, fallbacks) runs
as before: called from Python on each side, exceptions re-raised in the
caller after every helper is done.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba._dispatcher import compute_fingerprint
from numba.core.dispatcher import Dispatcher
from numba.core.typing.typeof import Purpose, typeof
from numba.extending import intrinsic

from .drivers import _fetch_add

__all__ = ["run_ranges_spinning", "task_ranges", "SPIN_SECONDS", "MAX_THREADS"]

SPIN_SECONDS = 0.002
_CHECKS_PER_SECOND = 40_000_000  # measured: about 25 ns per check (a load and a `pause`)
_SPIN_CHECKS = int(SPIN_SECONDS * _CHECKS_PER_SECOND)
# How long `_lead` waits for the helpers before handing back to Python (which
# then notifies, in case a helper fell asleep just as its bump arrived).
_LEAD_CHECKS = 1 << 15  # ~1 ms
MAX_THREADS = 64  # the caller and 63 helpers: `_lead`'s skip mask is one int64
_GEN, _DONE, _ERROR, _SLEEPING = 0, 1, 2, 3
_STATES = np.zeros((MAX_THREADS - 1, 8), np.int64)  # 64 bytes a row: no false sharing


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


@intrinsic
def _store_release(typingctx, array, index, value):
    """``array[index] = value`` as an atomic (release) store: everything the
    caller wrote before is visible to a thread that reads the new value."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.void(array, types.int64, types.int64)

    def codegen(context, builder, signature, llargs):
        arr = context.make_array(signature.args[0])(context, builder, llargs[0])
        index = context.cast(builder, llargs[1], signature.args[1], types.int64)
        value = context.cast(builder, llargs[2], signature.args[2], types.int64)
        builder.store_atomic(value, builder.gep(arr.data, [index]), "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _call_native(typingctx, address, t0, t1, args):
    """Call the Numba function whose native entry point is at `address` (an
    overload for exactly (int64, int64, *args' types), returning nothing) with
    (t0, t1, *args); returns 1 if it raised, else 0."""
    if not isinstance(args, types.BaseTuple):
        return None
    argtypes = (types.int64, types.int64, *args.types)
    sig = types.int64(types.int64, types.int64, types.int64, args)

    def codegen(context, builder, signature, llargs):
        addr, lo, hi, packed = llargs
        fnty = context.call_conv.get_function_type(types.none, argtypes)
        fn = builder.inttoptr(addr, fnty.as_pointer())
        values = [lo, hi] + [builder.extract_value(packed, i) for i in range(len(args))]
        status, _ = context.call_conv.call_function(builder, fn, types.none, argtypes, values)
        return builder.zext(status.is_error, context.get_value_type(types.int64))

    return sig, codegen


@intrinsic
def _pause(typingctx):
    """x86 `pause`: a spinning thread yields its core's issue slots. The two
    vCPUs here share one physical core's (SMT siblings): a tight load loop on
    one slowed a float loop on the other by 1.4x, one with `pause` by 1.25x."""
    sig = types.void()

    def codegen(context, builder, signature, llargs):
        fnty = ir.FunctionType(ir.VoidType(), ())
        builder.call(builder.module.declare_intrinsic("llvm.x86.sse2.pause", (), fnty), ())
        return context.get_dummy_value()

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
        _pause()
    return v


@njit(cache=True, nogil=True)
def _complete_and_spin(state, seen, checks):
    """Bump the completion count, then spin for the next generation, in one
    GIL-free call: the caller, spinning on that count, then finds the GIL
    free (a separate bump call would take it just when the caller wants it)."""
    _fetch_add(state[_DONE:], 1)
    return _spin_until_changed(state, _GEN, seen, checks)


@njit(cache=True, nogil=True)
def _follow(state, seen, checks, address, t0, t1, args):
    """A helper's call: run its range of the kernel at `address`, record the
    status, complete, and spin for the next generation (returned)."""
    state[_ERROR] = _call_native(address, t0, t1, args)
    return _complete_and_spin(state, seen, checks)


@njit(cache=True, nogil=True)
def _lead(states, helpers, skip, address, t0, t1, args):
    """The caller's call: bump the generation of the first `helpers` rows of
    `states` (but those in the bit mask `skip`, already bumped), run [t0, t1)
    of the kernel at `address`, and wait for every helper's completion.
    Returns 1 if the caller's range raised, | 2 if some helper is not done
    after `_LEAD_CHECKS` reads."""
    for i in range(helpers):
        if not (skip >> i) & 1:
            _store_release(states[i], _GEN, states[i, _GEN] + 1)
    status = _call_native(address, t0, t1, args)
    for i in range(helpers):
        row = states[i]
        gen = row[_GEN]
        if _spin_until_changed(row, _DONE, gen - 1, _LEAD_CHECKS) != gen:
            if _load_acquire(row, _DONE) != gen:
                status |= 2
    return status


_ENTRIES: dict[tuple, int] = {}  # (kernel, fingerprint of its arguments) -> native entry


def _native_entry(kernel, args: tuple) -> int:
    """The address of `kernel`'s native entry point for (t0, t1, *args), or 0
    when it has none (not a Numba dispatcher, or arguments Numba cannot
    fingerprint): such kernels are called from Python."""
    if not isinstance(kernel, Dispatcher):
        return 0
    try:
        key = (kernel, compute_fingerprint(args))
    except (TypeError, ValueError, NotImplementedError):
        return 0
    address = _ENTRIES.get(key)
    if address is None:
        packed = typeof(args, Purpose.argument)
        argtypes = (types.int64, types.int64, *packed.types)
        kernel.compile(argtypes)
        cres = kernel.overloads[argtypes]
        if cres.signature.return_type != types.none:
            raise TypeError(f"{kernel.py_func.__name__}: a team kernel must return nothing")
        address = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
        _ENTRIES[key] = address
    return address


class _Helper:
    def __init__(self, index: int):
        self.state = _STATES[index]
        self.cond = threading.Condition()
        self.work = None  # (native entry or 0, kernel, t0, t1, args)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"qnnjit-spin{index}", daemon=True)
        self.thread.start()

    def _loop(self):
        seen = 0
        gen = _spin_until_changed(self.state, _GEN, seen, _SPIN_CHECKS)
        while True:
            if gen == seen:
                with self.cond:
                    self.state[_SLEEPING] = 1
                    while self.state[_GEN] == seen:
                        self.cond.wait()
                    self.state[_SLEEPING] = 0
                    gen = int(self.state[_GEN])
            seen = gen
            address, kernel, t0, t1, args = self.work
            if address:
                try:
                    gen = _follow(self.state, seen, _SPIN_CHECKS, address, t0, t1, args)
                    continue
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self.error = exc
            else:
                try:
                    kernel(t0, t1, *args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self.error = exc
            gen = _complete_and_spin(self.state, seen, _SPIN_CHECKS)

    def bump_if_sleeping(self) -> bool:
        """Hand the work over from Python if the helper sleeps (it cannot see a
        GIL-free bump); whether it did."""
        if not self.state[_SLEEPING]:
            return False
        with self.cond:
            self.state[_GEN] += 1
            self.cond.notify()
        return True

    def bump(self) -> None:
        with self.cond:
            self.state[_GEN] += 1
            self.cond.notify()

    def wait(self) -> None:
        """Wait until the helper has completed every generation handed over,
        notifying it (in case it fell asleep just as a GIL-free bump came)."""
        while self.state[_DONE] != self.state[_GEN]:
            with self.cond:
                self.cond.notify()
            gen = int(self.state[_GEN])
            if _spin_until_changed(self.state, _DONE, gen - 1, _LEAD_CHECKS) != gen:
                time.sleep(0)  # the helper is descheduled: let others run

    def take_error(self) -> BaseException | None:
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


def task_ranges(tasks: int, threads: int) -> list[int]:
    """The bounds of the contiguous ranges, one per thread (at most one per
    task), that `run_ranges_spinning` cuts [0, tasks) into."""
    parts = max(1, min(threads, tasks))
    return [tasks * i // parts for i in range(parts + 1)]


def run_ranges_spinning(kernel, tasks: int, threads: int, *args) -> None:
    """``kernel(t0, t1, *args)`` over ``[0, tasks)`` cut into ``threads``
    contiguous ranges (at most `MAX_THREADS`), the first on the calling
    thread, the others on spinning helpers. One caller at a time (the
    executor runs one kernel at a time)."""
    bounds = task_ranges(tasks, min(threads, MAX_THREADS))
    helpers = _team(len(bounds) - 2)
    address = _native_entry(kernel, args)
    with _LOCK_CALL:
        for i, h in enumerate(helpers):
            h.work = (address, kernel, bounds[i + 1], bounds[i + 2], args)
        if address:
            _run_compiled(kernel, helpers, address, bounds[1], args)
        else:
            _run_python(kernel, helpers, bounds[1], args)


def _run_compiled(kernel, helpers: list[_Helper], address: int, t1: int, args) -> None:
    skip = 0
    for i, h in enumerate(helpers):
        if h.bump_if_sleeping():
            skip |= 1 << i
    status = _lead(_STATES, len(helpers), skip, address, 0, t1, args)
    if status & 2:
        for h in helpers:
            h.wait()
    errors = [h.take_error() for h in helpers]
    for error in errors:
        if error is not None:
            raise error
    # A range whose kernel raised runs again here, from Python, where it raises
    # for real (or, were it not to, computes its part once more).
    failed = [(0, t1)] if status & 1 else []
    failed += [h.work[2:4] for h in helpers if h.state[_ERROR]]
    for lo, hi in failed:
        kernel(lo, hi, *args)


def _run_python(kernel, helpers: list[_Helper], t1: int, args) -> None:
    for h in helpers:
        h.bump()
    try:
        kernel(0, t1, *args)
    finally:  # every helper finished before anything is raised
        for h in helpers:
            h.wait()
    for error in [h.take_error() for h in helpers]:
        if error is not None:
            raise error

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
(`Dispatcher`) the caller makes one GIL-free call (`_team_call`) that
publishes the work (bumps each helper's generation), runs the caller's own
range and spins until the helpers' completions arrive; a helper that sees
its new generation finds the GIL free (the caller is inside its call) and
makes one call (`_team_call` too) that runs its range, bumps its completion
count and spins for the next generation. Both call the kernel's compiled
code through its native entry point (`_native_entry`: the address of the
overload for these argument types, looked up by Numba's own type
fingerprint of the argument tuple), so neither holds the GIL while the
other wants it. A hand-off to one helper and back now costs about 9-12 us
(median, a trivial kernel of 24 arguments), down from 25 us. The price:
`_team_call` is compiled once per kernel signature (0.3-0.4 s each, cached
on disk like the kernels).

State, per helper: one row of `_STATES` (int64, a cache line of its own):
generation (the caller's count of calls handed over), completions (the
helper's count of calls finished), error (the last range's status), sleeping
(1 while the helper waits on its condition). Between calls, generation ==
completions. A sleeping helper cannot see a GIL-free bump, so the caller
bumps it in Python under its condition and notifies it, and the GIL-free
call skips those rows (`skip`). A helper going to sleep just as a GIL-free
bump arrives may miss it: the caller's call then stops waiting after
`_LEAD_CHECKS` reads, and the caller notifies from Python until the
completion arrives.

Errors. A range whose Numba kernel returned an error status runs again on the
calling thread through the dispatcher, which raises the exception itself
(kernels are deterministic). A plain Python callable (tests, fallbacks) runs
as before: called from Python on each side, exceptions re-raised in the
caller after every helper is done.
"""

from __future__ import annotations

import platform
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.dispatcher import Dispatcher
from numba.core.typing.typeof import Purpose, typeof
from numba.extending import intrinsic

from .drivers import _fetch_add

try:  # Numba's C type fingerprint (what its dispatcher keys overloads by)
    from numba._dispatcher import compute_fingerprint
except ImportError:  # pragma: no cover - another Numba: kernels called from Python
    compute_fingerprint = None

__all__ = ["run_ranges_spinning", "task_ranges", "SPIN_SECONDS", "MAX_THREADS"]

SPIN_SECONDS = 0.002
_CHECKS_PER_SECOND = 40_000_000  # measured: about 25 ns per check (a load and a `pause`)
_SPIN_CHECKS = int(SPIN_SECONDS * _CHECKS_PER_SECOND)
# How long the caller's GIL-free call waits for the helpers before handing back to Python (which
# then notifies, in case a helper fell asleep just as its bump arrived).
_LEAD_CHECKS = 1 << 15  # ~1 ms
MAX_THREADS = 64  # the caller and 63 helpers: `_team_call`'s skip mask is one int64
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
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
    """x86 `pause` (nothing on other CPUs): a spin-wait hint. On this VM a
    thread spinning on one vCPU slowed a float loop on the other by up to
    1.45x with a tight load loop and up to 1.3x with `pause` (the figures
    varied from run to run, 1.0x in some; the cause is the host's: the VM
    shows no SMT). MobileNetV2 at 2 threads, A/B interleaved: 2.8-3.2 ms
    with `pause`, 3.4-3.9 ms without."""
    sig = types.void()

    def codegen(context, builder, signature, llargs):
        if _X86:
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
def _team_call(states, row, helpers, skip, seen, address, t0, t1, args):
    """Run [t0, t1) of the kernel at `address` with `args`, GIL-free, as the
    caller (`row` < 0) or as the helper whose state is `states[row]`. One
    function for both, so that each kernel signature costs one Numba
    specialization (0.3-0.4 s cold), not two.

    Caller: bump the generation of the first `helpers` rows (but those in
    the bit mask `skip`, already bumped), run the range, wait for each
    helper's completion; returns 1 if its range raised, | 2 if some helper
    is not done after `_LEAD_CHECKS` reads.
    Helper: run the range, record its status, complete, and spin for the
    generation after `seen` (returned)."""
    if row >= 0:
        states[row, _ERROR] = _call_native(address, t0, t1, args)
        return _complete_and_spin(states[row], seen, _SPIN_CHECKS)
    _publish(states, helpers, skip)
    status = _call_native(address, t0, t1, args)
    return status | _await_helpers(states, helpers)


@njit(cache=True, nogil=True)
def _publish(states, helpers, skip):
    for i in range(helpers):
        if not (skip >> i) & 1:
            _store_release(states[i], _GEN, states[i, _GEN] + 1)


@njit(cache=True, nogil=True)
def _await_helpers(states, helpers):
    """0 once every helper has completed its generation, 2 if one has not
    after `_LEAD_CHECKS` reads."""
    for i in range(helpers):
        row = states[i]
        gen = row[_GEN]
        if _spin_until_changed(row, _DONE, gen - 1, _LEAD_CHECKS) != gen:
            if _load_acquire(row, _DONE) != gen:
                return 2
    return 0


_ENTRIES: dict[tuple, int] = {}  # (kernel, fingerprint of its arguments) -> native entry


def _native_entry(kernel, args: tuple) -> int:
    """The address of `kernel`'s native entry point for (t0, t1, *args), or 0
    when it has none (not a Numba dispatcher, arguments Numba cannot
    fingerprint, or a kernel that returns a value): such kernels are called
    from Python."""
    if compute_fingerprint is None or not isinstance(kernel, Dispatcher):
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
        address = 0  # `_call_native` discards results: such kernels go through Python
        if cres.signature.return_type == types.none:
            address = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
        _ENTRIES[key] = address
    return address


class _Helper:
    def __init__(self, index: int):
        self.index = index
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
                    gen = _team_call(_STATES, self.index, 0, 0, seen, address, t0, t1, args)
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
    status = _team_call(_STATES, -1, len(helpers), skip, 0, address, 0, t1, args)
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

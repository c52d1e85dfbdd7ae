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
(`Dispatcher`) the caller makes one GIL-free call (`_team_call`) that stores
the argument tuple, as Numba holds it in memory, in `_ARGS`, publishes the
work (bumps each helper's generation), runs the caller's own range and spins
until the helpers' completions arrive. A helper never leaves compiled code
between kernels: its GIL-free loop (`_serve`) sees the new generation, calls
the kernel's trampoline (`_trampoline`: one small function per argument
types, which loads the tuple from `_ARGS` and calls the kernel), bumps its
completion count and spins for the next. Both sides reach the kernel's
compiled code through its native entry point (`_entries`: the address
of the overload for these argument types, looked up by Numba's own type
fingerprint of the argument tuple), so neither holds the GIL while the other
wants it. A hand-off to one helper and back costs about 7-9 us (median, a
trivial kernel of 24 arguments; it was 25 us from Python, and 9-12 us while
the helper went back to Python to re-dispatch each range), and the helper
starts its range about 0.2 us after the bump instead of 3-5 us. The price:
`_team_call` is compiled once per kernel signature (0.3-0.6 s cold, cached
on disk like the kernels), and so is a trampoline (10-30 ms; loaded from
the cache in about 1 ms). So every call whose arguments `packargs` can
write now stores them from Python and hands them over through the packed
call below, compiled once (`run_ranges_spinning`); `_team_call` remains
for the others.

Repeated calls. A replayed run (`replay.py`) calls the same kernels with
the same arguments every time: `bind_ranges` stores the argument tuple once
in a buffer of its own, and each call copies those bytes into `_ARGS` and
runs its own range through the trampoline too (`_team_call_work`), so no
argument is unboxed per call (MobileNetV2 at 2 threads: 1.91 -> 1.73 ms a
run, alternating models in one process). That call also writes the
helpers' work (trampoline, entry, range) and checks their errors in
compiled code, so a call that goes well does nothing in Python but wake
helpers that sleep (`_PackedCall`): a trivial kernel's hand-off 2.2 -> 1.1
us; MobileNetV2 at 2 threads 1.31 -> 1.25 ms. Consecutive such calls, and
the serial packed calls between them, run in one compiled loop
(`CallSequence`, `_run_calls`), which comes back to Python only where a
helper sleeps, is late or raised: the 1-2 us of Python around each
hand-off are gone (MobileNetV2 at 2 threads, same process, alternating:
1.33-1.36 -> 1.27-1.29 ms).

Taking over. A helper that has not started its range when the caller has
finished its own (descheduled by another process on a busy machine, or
still waking from sleep) would cost the call a scheduler time slice: with
both cores loaded, an attention block ran 100x slower at two threads than
at one. So every generation is claimed (`_claim`, an atomic max on the
row's CLAIM): the helper claims before it reads its work, the caller after
its own range (`_await_helpers`), and whoever wins runs the range; a helper
that loses skips that generation, whose work the caller may already have
replaced with the next one's.

State, per helper: one row of `_STATES` (int64, two cache lines of its own):
generation (the caller's count of calls handed over), completions (the
helper's count of calls finished), error (the last range's status), sleeping
(1 while the helper waits on its condition), ready (the generation whose
arguments are in `_ARGS`), and the work: trampoline, kernel entry, task
range. Between calls, generation == completions. A sleeping helper cannot
see a GIL-free bump, so the caller bumps it in Python under its condition
and notifies it, and the GIL-free call skips those rows (`skip`); such a
helper, woken before the caller's call has stored the arguments, waits for
`ready`. A helper going to sleep just as a GIL-free bump arrives may miss
it: the caller's call then stops waiting after `_LEAD_CHECKS` reads, and the
caller notifies from Python until the completion arrives (the caller's
arguments stay alive until then; the meminfos its call unboxed do not, so
the helpers' kernels get the arrays without meminfos: `_trampoline`).

Errors. A range whose Numba kernel returned an error status runs again on the
calling thread through the dispatcher, which raises the exception itself
(kernels are deterministic). A plain Python callable (tests, fallbacks) runs
as before: called from Python on each side, exceptions re-raised in the
caller after every helper is done.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import platform
import threading
import time
from collections.abc import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.compiler_lock import global_compiler_lock
from numba.core.dispatcher import Dispatcher
from numba.core.typing.typeof import Purpose, typeof
from numba.extending import intrinsic

from ... import diskcache
from .drivers import _fetch_add
from .packargs import data_words, pack_arguments

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
# A helper's row: GEN, DONE, ERROR, SLEEPING (above); READY, the generation whose arguments are in
# `_ARGS`; TRAMP, ENTRY, the trampoline and kernel addresses of its work (0: from Python); T0, T1
# its task range (in ENTRY's row: ENTRY is in the caller's `_team_call` too).
_GEN, _DONE, _ERROR, _SLEEPING, _READY, _TRAMP, _T0, _T1 = range(8)
# Constants passed to another compiled function go through `_I64`: as literals, Numba would
# compile that function again for each constant (`_team_call_work` ~0.5 s, in a cold compile at
# two threads: its Python callers pass int64s).
_I64 = np.int64
_STATES = np.zeros((MAX_THREADS - 1, 16), np.int64)  # 128 bytes a row: no false sharing
_ENTRY = 8
# CLAIM: the latest generation whose range someone started (the helper, or the caller taking it
# over: `_await_helpers`), raised with an atomic max, so each range runs once; TAKEN: how many of
# the helper's ranges the caller took over (`taken_over`).
_CLAIM, _TAKEN = 9, 10
# The caller's packed arguments, which every helper's trampoline reads (one kernel on the team at
# a time); a signature whose arguments do not fit gets no trampoline.
_ARGS = np.zeros(1 << 14, np.uint8)


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
def _store_args(typingctx, buf, args):
    """Copy the tuple `args`, as Numba holds it in memory, into the byte array
    `buf` if it fits (it does when `_trampoline` made one for its type)."""
    if not (isinstance(buf, types.Array) and isinstance(args, types.BaseTuple)):
        return None
    sig = types.void(buf, args)

    def codegen(context, builder, signature, llargs):
        array = context.make_array(signature.args[0])(context, builder, llargs[0])
        llty = context.get_value_type(signature.args[1])
        size = ir.Constant(array.nitems.type, context.get_abi_sizeof(llty))
        with builder.if_then(builder.icmp_signed(">=", array.nitems, size)):
            builder.store(llargs[1], builder.bitcast(array.data, llty.as_pointer()))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _call_trampoline(typingctx, trampoline, entry, buf, t0, t1):
    """``trampoline(entry, buf, t0, t1)``: a `_trampoline` function (int64
    arguments and result) at the address `trampoline`."""
    sig = types.int64(trampoline, entry, buf, t0, t1)
    if not all(isinstance(t, types.Integer) for t in sig.args):
        return None

    def codegen(context, builder, signature, llargs):
        i64 = ir.IntType(64)
        values = [context.cast(builder, v, t, types.int64) for v, t in zip(llargs, signature.args)]
        fn = builder.inttoptr(values[0], ir.FunctionType(i64, [i64] * 4).as_pointer())
        return builder.call(fn, values[1:])

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


@intrinsic
def _claim(typingctx, array, index, gen):
    """Atomically raise ``array[index]`` to ``gen`` (a max, never lowered):
    whether this call did, i.e. whether generation ``gen`` was unclaimed."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.boolean(array, types.int64, types.int64)

    def codegen(context, builder, signature, llargs):
        arr = context.make_array(signature.args[0])(context, builder, llargs[0])
        index = context.cast(builder, llargs[1], signature.args[1], types.int64)
        gen = context.cast(builder, llargs[2], signature.args[2], types.int64)
        old = builder.atomic_rmw("max", builder.gep(arr.data, [index]), gen, "seq_cst")
        return builder.icmp_signed("<", old, gen)

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
def _serve(state, buf, seen, checks, complete):
    """A helper's GIL-free loop: [complete its last generation, then] serve
    every generation after `seen` whose work has a trampoline, spinning up
    to `checks` reads for each. Returns (the last generation it served or
    was given, the generation Python must serve: its work has no
    trampoline, or the first when none came in time and the helper sleeps)."""
    if complete:  # here, not from Python: the caller, spinning on it, must find the GIL free
        _fetch_add(state[_DONE:], 1)
    while True:
        gen = _spin_until_changed(state, _I64(_GEN), seen, checks)
        if gen == seen:
            return seen, gen
        if not _claims(state, gen):
            seen = gen  # the caller ran it (`_await_helpers`)
            continue
        if state[_TRAMP] == 0:
            return seen, gen
        _run_ready(state, buf, gen)
        seen = gen


@njit(cache=True, nogil=True)
def _claims(state, gen):
    """Claim generation `gen` for the helper: False when the caller took its
    range over (`_await_helpers`), which it then ran and completed. Only a
    claimed generation's work (TRAMP, T0, T1, the Python `work`) is read: the
    caller does not reassign them until the claimed range completes, but may
    already have for a generation it took over."""
    return _claim(state, _CLAIM, gen)


@njit(cache=True, nogil=True)
def _run_ready(state, buf, gen):
    """Run claimed generation `gen`'s range through its trampoline once the
    caller's arguments for it are in `buf`, record its status, complete."""
    while _load_acquire(state, _READY) != gen:
        _pause()
    state[_ERROR] = _call_trampoline(
        state[_TRAMP], state[_ENTRY], buf.ctypes.data, state[_T0], state[_T1]
    )
    _fetch_add(state[_DONE:], 1)


@njit(cache=True, nogil=True)
def _team_call(states, helpers, skip, address, t1, args, buf):
    """The caller's GIL-free call: put `args` where the helpers' trampolines
    read them (`buf`), bump the generation of the first `helpers` rows (but
    those in the bit mask `skip`, bumped from Python), run [0, t1) of the
    kernel at `address`, wait for each helper's completion. Returns 1 if its
    range raised, | 2 if some helper is not done after `_LEAD_CHECKS` reads.
    Compiled once per kernel signature (0.3-0.6 s cold, cached on disk): only
    for arguments `packargs` does not pack."""
    _store_args(buf, args)
    _publish(states, helpers, skip)
    status = _call_native(address, 0, t1, args)
    return status | _await_helpers(states, helpers, buf)


@njit(cache=True, nogil=True)
def _team_call_work(states, helpers, skip, work, packed, buf):
    """`_team_call` for arguments already packed (`pack_arguments`): copy them
    into `buf`, each range run through the kernel's trampoline. It also sets
    each helper's work from `work` (int64 [1 + helpers, 4]: trampoline,
    entry, t0, t1; row 0 the caller's) before publishing it, and returns 4
    more if some helper's range raised: a call that went well needs nothing
    more from Python (`_PackedCall`). All arguments are integers or arrays
    of them: compiled once."""
    for i in range(helpers):
        states[i, _TRAMP], states[i, _ENTRY] = work[i + 1, 0], work[i + 1, 1]
        states[i, _T0], states[i, _T1] = work[i + 1, 2], work[i + 1, 3]
    for i in range(packed.size):
        buf[i] = packed[i]
    _publish(states, helpers, skip)
    status = _call_trampoline(work[0, 0], work[0, 1], packed.ctypes.data, work[0, 2], work[0, 3])
    status |= _await_helpers(states, helpers, buf)
    for i in range(helpers):
        if states[i, _ERROR] != 0:
            status |= 4
    return status


@njit(cache=True, nogil=True)
def _publish(states, helpers, skip):
    """Mark the arguments ready for each helper's generation, and bump those
    not in `skip` (release stores: `buf` is written before)."""
    for i in range(helpers):
        bumped = (skip >> i) & 1
        gen = states[i, _GEN] + 1 - bumped
        _store_release(states[i], _READY, gen)
        if not bumped:
            _store_release(states[i], _GEN, gen)


@njit(cache=True, nogil=True)
def _await_helpers(states, helpers, buf):
    """0 once every helper has completed its generation, 2 if one has not
    after `_LEAD_CHECKS` reads. A helper that has not started its range by
    the time the caller finished its own (descheduled by another process on
    a busy machine, or still waking from sleep) has it taken over: the caller
    claims it and runs it through the trampoline itself. Waiting instead cost
    a scheduler time slice per call: an attention block at two threads ran
    100x slower than at one while another process kept both cores busy."""
    for i in range(helpers):
        row = states[i]
        gen = row[_GEN]
        if row[_TRAMP] != 0 and _load_acquire(row, _DONE) != gen and _claim(row, _CLAIM, gen):
            row[_ERROR] = _call_trampoline(
                row[_TRAMP], row[_ENTRY], buf.ctypes.data, row[_T0], row[_T1]
            )
            row[_TAKEN] += 1  # one caller at a time (`_LOCK_CALL`)
            _fetch_add(row[_DONE:], 1)
            continue
        if _spin_until_changed(row, _I64(_DONE), gen - 1, _I64(_LEAD_CHECKS)) != gen:
            if _load_acquire(row, _DONE) != gen:
                return 2
    return 0


# (kernel, fingerprint of its arguments) -> (native entry, trampoline)
_ENTRIES: dict[tuple, tuple[int, int]] = {}


def _entries(kernel, args: tuple) -> tuple[int, int]:
    """(the address of `kernel`'s native entry point for (t0, t1, *args), its
    `_trampoline`), or (0, 0) when it has none (not a Numba dispatcher,
    arguments Numba cannot fingerprint, or a kernel that returns a value):
    such kernels are called from Python."""
    if compute_fingerprint is None or not isinstance(kernel, Dispatcher):
        return 0, 0
    try:
        key = (kernel, compute_fingerprint(args))
    except (TypeError, ValueError, NotImplementedError):
        return 0, 0
    found = _ENTRIES.get(key)
    if found is None:
        packed = typeof(args, Purpose.argument)
        argtypes = (types.int64, types.int64, *packed.types)
        kernel.compile(argtypes)
        cres = kernel.overloads[argtypes]
        found = 0, 0  # `_call_native` discards results: such kernels go through Python
        if cres.signature.return_type == types.none:
            entry = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
            found = entry, _trampoline(kernel.targetctx, packed)
        _ENTRIES[key] = found
    return found


def _trampoline(context, packed) -> int:
    """The address of a function ``int64 (int64 entry, int64 buf, int64 t0,
    int64 t1)`` that calls the native entry point at `entry` (a kernel taking
    (int64, int64, *packed's types)) with (t0, t1, *the tuple of type `packed`
    stored at `buf`) and returns 1 if it raised, else 0; or 0 when there is
    none (the tuple does not fit `_ARGS`). So a helper, spinning in compiled
    code, runs any kernel's range without calling back into Python: 0.2 us
    after the caller's bump instead of the 3-5 us a return to Python and a
    dispatch cost. LLVM IR built with Numba's own calling convention and
    data model, compiled by Numba's code generator (10-30 ms) and kept in the
    kernel cache as Numba keeps its own code (`_store_trampoline`): compiled
    by `llvmjit` instead, its engines made some processes crash at exit
    (LLVM's "Value still in symbol table"), 1 in 4-8 runs.

    The arrays reach the kernel without their meminfos (null: Numba's
    reference counting skips them). The tuple in `_ARGS` is the caller's
    `_team_call`'s, and so are the meminfos it unboxed: they are freed when
    that call returns, which it may do before a late helper is done (after
    `_LEAD_CHECKS`, to notify it from Python). The kernel's own views of its
    arguments would then count references on freed memory: the segfault in
    a helper woken from sleep that got this experiment reverted once, and
    heap corruption in 3 of 3 stress runs of 300 calls with a late helper.
    The arrays' memory itself stays alive: the caller holds the Python
    arguments until every helper completes. So only arrays and scalars get a
    trampoline."""
    if not all(isinstance(t, (types.Array, types.Number, types.Boolean)) for t in packed.types):
        return 0
    llty = context.get_value_type(packed)
    if context.get_abi_sizeof(llty) > _ARGS.size:
        return 0
    name = "qnnjit_trampoline_" + hashlib.sha256(str(packed).encode()).hexdigest()[:20]
    codegen = context.codegen()
    key = hashlib.sha256(repr((name, codegen.magic_tuple(), numba.__version__)).encode())
    path = _trampoline_path(key.hexdigest()[:32])
    library = _load_trampoline(codegen, path)
    if library is None:
        library = _compile_trampoline(context, packed, name)
        _store_trampoline(library, path)
    _LIBRARIES.append(library)  # its code lives as long as the process
    return library.get_pointer_to_function(name)


def _compile_trampoline(context, packed, name: str):
    """`_trampoline`'s code library, built and compiled (10-30 ms)."""
    llty = context.get_value_type(packed)
    i64 = ir.IntType(64)
    module = context.create_module(name)
    function = ir.Function(module, ir.FunctionType(i64, [i64] * 4), name=name)
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    entry, buf, t0, t1 = function.args
    values = builder.load(builder.inttoptr(buf, llty.as_pointer()))
    argtypes = (types.int64, types.int64, *packed.types)
    fnty = context.call_conv.get_function_type(types.none, argtypes)
    callee = builder.inttoptr(entry, fnty.as_pointer())
    args = [t0, t1]
    for i, ty in enumerate(packed.types):
        value = builder.extract_value(values, i)
        if isinstance(ty, types.Array):
            array = context.make_array(ty)(context, builder, value=value)
            array.meminfo = ir.Constant(array.meminfo.type, None)
            value = array._getvalue()
        args.append(value)
    status, _ = context.call_conv.call_function(builder, callee, types.none, argtypes, args)
    builder.ret(builder.zext(status.is_error, i64))
    with global_compiler_lock:  # Numba's code generator is not thread-safe
        library = context.codegen().create_library(name)
        library.enable_object_caching()  # so that `_store_trampoline` can save it
        library.add_ir_module(module)
        library.finalize()
    return library


_LIBRARIES: list = []


# Trampolines persist as Numba persists its own functions' code (the library's
# object code, `serialize_using_object_code`), in the kernels' cache directory,
# keyed by the argument types, the target machine and Numba's version: loaded,
# one costs about 1 ms instead of 10-30 ms compiled, in every process.


def _trampoline_path(key: str):
    directory = diskcache.cache_dir()
    return None if directory is None else directory / "cpu_trampolines" / f"{key}.bin"


def _load_trampoline(codegen, path):
    """The library stored at `path`, or None (no cache, absent, damaged)."""
    data = diskcache.read_checked(path) if path is not None else None
    if data is None:
        return None
    try:
        with global_compiler_lock:
            return codegen.unserialize_library(pickle.loads(data))
    except Exception:  # noqa: BLE001 - a stale or foreign entry: compile instead
        return None


def _store_trampoline(library, path) -> None:
    if path is None:
        return
    try:
        diskcache.write_checked(path, pickle.dumps(library.serialize_using_object_code()))
    except Exception:  # noqa: BLE001 - a trampoline not stored is compiled again next time
        pass


class _Helper:
    def __init__(self, index: int):
        self.index = index
        self.state = _STATES[index]
        self.cond = threading.Condition()
        self.work = None  # (native entry or 0, kernel, t0, t1, args)
        self.asleep = False  # as state[_SLEEPING], read without a NumPy access (`_PackedCall`)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"qnnjit-spin{index}", daemon=True)
        self.thread.start()

    def _loop(self):
        seen, complete = 0, 0
        while True:
            seen, gen = _serve(self.state, _ARGS, seen, _SPIN_CHECKS, complete)
            complete = 0
            if gen == seen:  # nothing came: sleep until the caller bumps from Python
                with self.cond:
                    self.state[_SLEEPING] = 1
                    self.asleep = True
                    while self.state[_GEN] == seen:
                        self.cond.wait()
                    self.state[_SLEEPING] = 0
                    self.asleep = False
                    gen = int(self.state[_GEN])
                if not _claims(self.state, gen):
                    seen = gen  # taken over by the caller while this helper woke
                    continue
                if self.state[_TRAMP]:
                    _run_ready(self.state, _ARGS, gen)
                    seen = gen
                    continue
            seen = gen
            _, kernel, t0, t1, args = self.work  # no trampoline: run it from Python
            self.state[_ERROR] = 0
            try:
                kernel(t0, t1, *args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.error = exc
            complete = 1

    def assign(self, work: tuple, trampoline: int) -> None:
        """Set the next generation's work: (native entry, kernel, t0, t1, args)."""
        self.work = work
        entry, _, t0, t1, _ = work
        self.state[_TRAMP], self.state[_ENTRY] = trampoline, entry
        self.state[_T0], self.state[_T1] = t0, t1

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


def taken_over() -> int:
    """How many helper ranges callers have run themselves, the helper not
    having started them (`_await_helpers`)."""
    return int(_STATES[:, _TAKEN].sum())


def task_ranges(tasks: int, threads: int) -> list[int]:
    """The bounds of the contiguous ranges, one per thread (at most one per
    task), that `run_ranges_spinning` cuts [0, tasks) into."""
    parts = max(1, min(threads, tasks))
    return [tasks * i // parts for i in range(parts + 1)]


def run_ranges_spinning(kernel, tasks: int, threads: int, *args) -> None:
    """``kernel(t0, t1, *args)`` over ``[0, tasks)`` cut into ``threads``
    contiguous ranges (at most `MAX_THREADS`), the first on the calling
    thread, the others on spinning helpers. One caller at a time (the
    executor runs one kernel at a time). The arguments are packed
    (`packargs`) as `bind_ranges` does, although they are used once: that
    costs ~20 us more than `_team_call`'s unboxing, in runs that are not
    replayed, but `_team_call` is compiled per kernel signature (0.3-0.6 s
    cold each, 1.8 s of MobileNetV2's cold compile at two threads) where the
    packed hand-off is compiled once."""
    _bound(kernel, tasks, threads, args)()


def bind_ranges(kernel, tasks: int, threads: int, args: tuple) -> Callable[[], None]:
    """`run_ranges_spinning(kernel, tasks, threads, *args)` as a function of no
    arguments for a caller that repeats it (`replay.py`): the ranges, the
    helpers and the native entry are found now, and the argument tuple is
    stored, as Numba holds it, in a buffer of the call's own
    (`packargs.pack_arguments`), so each call copies bytes into `_ARGS` instead of
    unboxing every argument (`_PackedCall`). `args` must stay alive,
    and its arrays where they are, as long as the function is used."""
    return _bound(kernel, tasks, threads, args)


def _bound(kernel, tasks: int, threads: int, args: tuple) -> Callable[[], None]:
    """The call, with everything it compiles compiled now (the kernel, its
    trampoline, the hand-off), before any helper is woken: a compile that
    raised between a helper's bump and the hand-off (in a cold compile,
    `compile_jobs._Busy`) left that helper spinning for arguments that
    never came, until the process ended."""
    bounds = task_ranges(tasks, min(threads, MAX_THREADS))
    helpers = _team(len(bounds) - 2)
    address, trampoline = _entries(kernel, args)
    works = [
        (h, (address, kernel, bounds[i + 1], bounds[i + 2], args)) for i, h in enumerate(helpers)
    ]
    t1, count = bounds[1], len(helpers)

    if not address:

        def call() -> None:
            with _LOCK_CALL:
                for h, work in works:
                    h.assign(work, trampoline)
                _run_python(kernel, helpers, t1, args)

        return call
    packed = pack_arguments(kernel.targetctx, args) if trampoline else None
    if packed is not None:
        return TeamCall(_PackedCall(kernel, bounds, helpers, address, trampoline, packed), args)
    signature = _types((_STATES, count, 0, address, t1, args, _ARGS))
    team_call = _compiled_overload(_team_call, signature)

    def hand_off(skip: int) -> int:
        return team_call(_STATES, count, skip, address, t1, args, _ARGS)

    def call() -> None:
        with _LOCK_CALL:
            for h, work in works:
                h.assign(work, trampoline)
            _finish(kernel, helpers, t1, args, hand_off(_skip_sleeping(helpers)))

    return call


def bind_serial(kernel, tasks: int, args: tuple) -> SerialCall | None:
    """`kernel(0, tasks, *args)` on the calling thread as a function of no
    arguments, for a caller that repeats it (`replay.py`): the arguments are
    packed once (`packargs`) and passed through the kernel's trampoline, so
    no call unboxes them again (1.57 -> about 0.9 us a call of 23
    arguments, kernel prologue included). None where the kernel has no
    trampoline or an argument cannot be packed. `args` must stay alive, and
    its arrays where they are, as long as the function is used."""
    found = _packed_entry(kernel, args)
    if found is None:
        return None
    address, trampoline, packed = found
    return SerialCall((trampoline, address, packed.ctypes.data, 0, tasks), kernel, args, packed)


def _packed_entry(kernel, args: tuple) -> tuple[int, int, np.ndarray] | None:
    """(native entry, trampoline, packed arguments) for calling `kernel` on
    `args` through its trampoline, or None where it has none or an argument
    cannot be packed."""
    address, trampoline = _entries(kernel, args)
    if not (address and trampoline):
        return None
    packed = pack_arguments(kernel.targetctx, args)
    return None if packed is None else (address, trampoline, packed)


class SerialCall:
    """`bind_serial`'s call: the kernel's trampoline on its packed arguments
    (`row`: trampoline, entry, packed arguments' address, t0, t1)."""

    def __init__(self, row: tuple, kernel, args: tuple, packed: np.ndarray):
        self.row, self.kernel, self.args = row, kernel, args
        self.packed = packed  # the bytes `row` points at: kept alive here
        self._run = functools.partial(_compiled_overload(_call_packed, _PACKED_CALL), *row)

    def __call__(self) -> None:
        if self._run():
            self.raise_error()

    def raise_error(self) -> None:
        """Run the call again through the kernel's dispatcher, which raises the
        error its packed run reported (kernels are deterministic)."""
        self.kernel(self.row[3], self.row[4], *self.args)


class TeamCall:
    """`bind_ranges`' call of a kernel split over the team, its arguments
    packed (`_PackedCall` on `args`): a row of a `CallSequence`."""

    def __init__(self, packed: _PackedCall, args: tuple):
        self.packed, self.args = packed, args

    def __call__(self) -> None:
        self.packed(self.args)


class CallSequence:
    """Consecutive `SerialCall`s and `TeamCall`s run by one compiled call
    (`_run_calls`): one step from Python into compiled code for all of them
    instead of one per call. At one thread that is every call of a replayed
    run but the first; at two, MobileNetV2's 36 parallel calls took 1-2 us
    each in Python around the hand-off (`_team_call_work` dispatched from
    Python), 51 us of a 1.22 ms run. A team call comes back to Python only
    when a helper sleeps (its work is handed over from Python, which wakes
    it: the first of a run after a pause), is late (waited for from Python),
    or raised. A sequence of serial calls only (every one at one thread)
    runs in the simpler `_run_rows`, which compiles in a tenth of the time."""

    def __init__(self, calls: list):
        self.calls = calls
        self.error: BaseException | None = None
        teams = [call.packed for call in calls if isinstance(call, TeamCall)]
        # team calls' work rows one under the other, packed arguments 64-byte aligned
        self.works = np.concatenate([t.work for t in teams] or [np.zeros((1, 4), np.int64)])
        starts = np.cumsum([0] + [-(-t.packed.size // 64) * 64 for t in teams])
        self.packs = np.zeros(max(int(starts[-1]), 1), np.uint8)
        rows, w0, teams_seen = [], 0, 0
        for call in calls:
            if isinstance(call, SerialCall):
                rows.append((0, *call.row))
                continue
            team, p0 = call.packed, int(starts[teams_seen])
            self.packs[p0 : p0 + team.packed.size] = team.packed
            rows.append((len(team.helpers), w0, p0, p0 + team.packed.size, 0, 0))
            w0, teams_seen = w0 + len(team.work), teams_seen + 1
        self.locked = teams_seen > 0
        if not self.locked:  # the serial loop: compiled in 0.1 s, not `_run_calls`' 1.7 s
            self.table = np.array([row[1:] for row in rows], np.int64)
            self._run = functools.partial(_compiled_overload(_run_rows, _ROWS), self.table)
            return
        self.table = np.array(rows, np.int64)
        self._run = functools.partial(
            _compiled_overload(_run_calls, _CALLS), self.table, self.works, self.packs, _STATES,
            _ARGS,
        )  # fmt: skip

    def __call__(self) -> int:
        """-1, or the index of the first call whose kernel raised (the calls
        after it have not run; `raise_error` raises its error)."""
        if not self.locked:  # serial calls only
            return self._run()
        with _LOCK_CALL:
            return self._run_team_rows()

    def _run_team_rows(self) -> int:
        """`__call__` with team rows (`_LOCK_CALL` held)."""
        start = 0
        while True:
            stopped = self._run(start)
            if stopped < 0:
                return -1
            i, status = divmod(stopped, 8)
            call = self.calls[i]
            if isinstance(call, SerialCall):
                return i
            if status == 0:  # a helper sleeps: the call from Python
                status = call.packed.run(call.args)
            if status & ~2:
                try:
                    call.packed.finish(call.args, status)
                except BaseException as exc:  # noqa: BLE001 - raised by `raise_error`
                    self.error = exc
                return i
            if status:
                call.packed.finish(call.args, status)
            start = i + 1

    def raise_error(self, i: int) -> None:
        """Raise the error of call `i`, which `__call__` reported (for a
        serial call, by running it again through the kernel's dispatcher;
        a team call's was raised already and kept)."""
        call, error = self.calls[i], self.error
        if isinstance(call, SerialCall):
            call.raise_error()
        elif error is not None:
            self.error = None
            raise error


def compile_sequence_loop(threads: int) -> None:
    """Compile (or load from the cache) `CallSequence`'s loop for `threads`:
    with a team, `_run_calls`, 1.7 s cold (`_team_call_work` with it), which
    a cold compile's helper process spends first, while its parent compiles
    kernels (`compile_jobs`), instead of the parent at the end of its
    warm-up run."""
    if threads > 1:
        _compiled_overload(_run_calls, _CALLS)
    else:
        _compiled_overload(_run_rows, _ROWS)


@njit(cache=True, nogil=True)
def _run_rows(table):
    """Each `SerialCall` row of `table` in turn (`CallSequence` without team
    calls): -1, or the index of the first row whose kernel raised."""
    for i in range(table.shape[0]):
        if _call_trampoline(table[i, 0], table[i, 1], table[i, 2], table[i, 3], table[i, 4]):
            return i
    return -1


@njit(cache=True, nogil=True)
def _run_calls(table, works, packs, states, buf, start):
    """Run rows `start`.. of a `CallSequence`'s `table`: (0, a `SerialCall`'s
    row) or (helpers, first row in `works`, packed arguments' bytes
    [p0, p1) in `packs`, 0, 0). -1 when all ran, else 8 * i + status where
    row i stopped the run: status 0, a team row not run because a helper
    sleeps; 1, a serial row whose kernel raised; a team row's
    `_team_call_work` status (it ran)."""
    for i in range(start, table.shape[0]):
        helpers = table[i, 0]
        if helpers == 0:
            if _call_trampoline(table[i, 1], table[i, 2], table[i, 3], table[i, 4], table[i, 5]):
                return 8 * i + 1
            continue
        for h in range(helpers):
            if _load_acquire(states[h], _SLEEPING) != 0:
                return 8 * i
        w0, p0, p1 = table[i, 1], table[i, 2], table[i, 3]
        work, packed = works[w0 : w0 + helpers + 1], packs[p0:p1]
        status = _team_call_work(states, helpers, _I64(0), work, packed, buf)
        if status:
            return 8 * i + status
    return -1


@njit(cache=True, nogil=True)
def _call_packed(trampoline, entry, buf, t0, t1):
    """Run [t0, t1) of the kernel at `entry` on the arguments packed at `buf`
    through its trampoline: 1 if it raised, else 0."""
    return _call_trampoline(trampoline, entry, buf, t0, t1)


@functools.cache
def _compiled_overload(function, signature: tuple) -> Callable:
    """The compiled overload of `function` for the argument types `signature`,
    called without the dispatcher's type resolution."""
    function.compile(signature)
    return function.overloads[signature].entry_point


_PACKED_CALL = (types.int64,) * 5  # `_call_packed`'s signature
_ROWS = (types.int64[:, ::1],)  # `_run_rows`'
_CALLS = (  # `_run_calls`'
    types.int64[:, ::1], types.int64[:, ::1], types.uint8[::1], types.int64[:, ::1],
    types.uint8[::1], types.int64,
)  # fmt: skip
_TEAM_CALL_WORK = (  # `_team_call_work`'s
    types.int64[:, ::1], types.int64, types.int64, types.int64[:, ::1], types.uint8[::1],
    types.uint8[::1],
)  # fmt: skip


def _types(values: tuple) -> tuple:
    """The Numba types of `values` as call arguments."""
    return tuple(typeof(v, Purpose.argument) for v in values)


def bind_moving_ranges(
    kernel, tasks: int, threads: int, args: tuple, moving: tuple[int, ...]
) -> Callable[[tuple], None] | None:
    """`bind_ranges` for a call whose array arguments at positions `moving`
    are other arrays each time, of the same types, shapes and strides (views
    of a graph input: a new array every run). The function takes the call's
    arguments; it writes their data addresses into its packed copy of `args`
    (`packargs.data_words`) and hands that over. None where the call has no
    trampoline or its arguments cannot be packed: the caller runs it anew."""
    found = _packed_entry(kernel, args)
    if found is None:
        return None
    bounds = task_ranges(tasks, min(threads, MAX_THREADS))
    words = [
        (position, word, _address_reader(args[position]))
        for position, word in data_words(kernel.targetctx, args, moving)
    ]
    return _PackedCall(kernel, bounds, _team(len(bounds) - 2), *found, words)


@njit(cache=True, nogil=True)
def _data_address(array):
    return array.ctypes.data


def _address_reader(array: np.ndarray) -> Callable[[np.ndarray], int]:
    """The data address of arrays of `array`'s type, read by compiled code
    (`_data_address`'s entry point). Why not NumPy's: its
    `__array_interface__` and `ctypes` attributes are computed partly in
    Python, and at the start of a run, cold, one read took 30-42 us (the
    compiled read: 5-8 us, as a Python call that does nothing: 3-5)."""
    return _compiled_overload(_data_address, (typeof(array, Purpose.argument),))


class _PackedCall:
    """A bound call's hand-off of its packed arguments (`pack_arguments`) to
    the helpers: `_team_call_work` sets their work (a row each of `work`)
    in compiled code, so a call that goes well does nothing else in Python
    but wake the helpers that sleep, which must get their work first (their
    Python loop reads it when woken). Python's per-call part was about 0.9
    of a 2 us hand-off (the work assigned from Python, each helper's sleeping
    flag read through NumPy, `_finish`'s checks)."""

    def __init__(self, kernel, bounds, helpers, address, trampoline, packed, words=()):
        self.kernel, self.helpers, self.packed = kernel, helpers, packed
        # `bind_moving_ranges`' (position, word, address reader) of each moving array
        self.words = words
        self.cells = packed[: packed.size // 8 * 8].view(np.int64)
        self.bounds, self.address, self.trampoline = bounds, address, trampoline
        rows = [(trampoline, address, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        self.work = np.array(rows, np.int64)
        self.hand_off = _compiled_overload(_team_call_work, _TEAM_CALL_WORK)  # see `_bound`

    def __call__(self, args: tuple) -> None:
        """Run the call on `args` (those `packed` holds, as Python objects:
        for the Python paths, an error's re-run)."""
        with _LOCK_CALL:
            status = self.run(args)
            if status:
                self.finish(args, status)

    def run(self, args: tuple) -> int:
        """The hand-off (`_LOCK_CALL` held): `_team_call_work`'s status."""
        for position, word, address in self.words:
            self.cells[word] = address(args[position])
        skip = 0
        for i, h in enumerate(self.helpers):
            if h.asleep:
                h.assign(self._work(i, args), self.trampoline)
                if h.bump_if_sleeping():
                    skip |= 1 << i
        return self.hand_off(_STATES, len(self.helpers), skip, self.work, self.packed, _ARGS)

    def finish(self, args: tuple, status: int) -> None:
        """After a hand-off with a nonzero `status` (`_LOCK_CALL` held): wait
        for late helpers, raise errors (`_finish`)."""
        for i, h in enumerate(self.helpers):
            h.work = self._work(i, args)
        _finish(self.kernel, self.helpers, self.bounds[1], args, status)

    def _work(self, i: int, args: tuple) -> tuple:
        """Helper i's `_Helper.work`."""
        return self.address, self.kernel, self.bounds[i + 1], self.bounds[i + 2], args


def _skip_sleeping(helpers: list[_Helper]) -> int:
    """Bump the sleeping helpers from Python; the mask of those bumped."""
    skip = 0
    for i, h in enumerate(helpers):
        if h.bump_if_sleeping():
            skip |= 1 << i
    return skip


def _finish(kernel, helpers: list[_Helper], t1: int, args, status: int) -> None:
    """After a compiled hand-off with `status`: wait for late helpers, raise
    their errors, and run a range whose kernel raised again here, from
    Python, where it raises for real (or, were it not to, computes its part
    once more)."""
    if status & 2:
        for h in helpers:
            h.wait()
    errors = [h.take_error() for h in helpers]
    for error in errors:
        if error is not None:
            raise error
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

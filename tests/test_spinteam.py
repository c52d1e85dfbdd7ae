"""The kernels' spinning helper team: every task runs once, errors reach the
caller, and a helper that went to sleep is woken by the next call."""

import time

import numpy as np
import pytest
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qnnjit.backends.cpu import spinteam


def _mark(t0, t1, hits):
    hits[t0:t1] += 1


@pytest.mark.parametrize("tasks,threads", [(1, 2), (2, 2), (7, 2), (100, 3)])
def test_every_task_runs_once(tasks, threads):
    hits = np.zeros(tasks, np.int64)
    spinteam.run_ranges_spinning(_mark, tasks, threads, hits)
    assert hits.tolist() == [1] * tasks


@pytest.mark.parametrize("threads", [2, 3])
def test_helper_errors_reach_the_caller(threads):
    """Every helper fails; the caller raises once all are done, and the team
    is in step for the next call."""

    def fail_after_first(t0, t1):
        if t0 > 0:
            raise ValueError(f"task range {t0}..{t1}")

    with pytest.raises(ValueError, match="task range"):
        spinteam.run_ranges_spinning(fail_after_first, 6, threads)
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark, 6, threads, hits)
    assert hits.tolist() == [1] * 6


def test_sleeping_helper_is_woken():
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark, 6, 2, hits)
    time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helper sleeps
    spinteam.run_ranges_spinning(_mark, 6, 2, hits)
    assert hits.tolist() == [2] * 6


# The compiled hand-off (`_team_call`, `_serve`): Numba kernels are called
# through their native entry points (the helpers' through a trampoline that
# reads the caller's arguments), GIL-free on both sides.


@njit(nogil=True)
def _mark_compiled(t0, t1, hits, scale, grid):
    rows, cols = grid.shape
    for t in range(t0, t1):
        hits[t] += 1
        if t < rows * cols:  # one element per task: threads never write the same one
            grid[t // cols, t % cols] += scale


@njit(nogil=True)
def _fail_compiled(t0, t1, hits):
    for t in range(t0, t1):
        hits[t] += 1
    if t0 > 0:
        raise ValueError("compiled range failed")


@pytest.mark.parametrize("tasks,threads", [(1, 2), (2, 2), (7, 2), (100, 3), (5, 5)])
def test_compiled_kernels_run_every_task_once(tasks, threads):
    hits = np.zeros(tasks, np.int64)
    grid = np.zeros((6, 8), np.float32)[:, ::2]  # a strided view: its own array type
    entry, trampoline = spinteam._entries(_mark_compiled, (hits, 0.5, grid))
    assert entry != 0 and trampoline != 0  # helpers run it without Python
    spinteam.run_ranges_spinning(_mark_compiled, tasks, threads, hits, 0.5, grid)
    assert hits.tolist() == [1] * tasks
    assert grid.sum() == 0.5 * min(tasks, grid.size)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_bound_call_repeats_on_its_arrays_as_they_are_then(threads):
    """`bind_ranges` stores the arguments once; each call reads the arrays'
    current contents (a replayed run's buffers are written between calls)."""
    hits = np.zeros(7, np.int64)
    grid = np.zeros((6, 8), np.float32)[:, ::2]
    call = spinteam.bind_ranges(_mark_compiled, 7, threads, (hits, 0.5, grid))
    for k in range(1, 4):
        call()
        assert hits.tolist() == [k] * 7 and grid.sum() == 0.5 * 7 * k
    hits[:] = 10
    call()
    assert hits.tolist() == [11] * 7


@pytest.mark.parametrize("threads", [2, 3])
def test_a_bound_call_raises_its_kernels_error_every_time(threads):
    hits = np.zeros(6, np.int64)
    call = spinteam.bind_ranges(_fail_compiled, 6, threads, (hits,))
    for _ in range(2):
        with pytest.raises(ValueError, match="compiled range failed"):
            call()
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark_compiled, 6, threads, hits, 1.0, np.zeros((2, 2)))
    assert hits.tolist() == [1] * 6


@njit(nogil=True)
def _mark_with_many_arguments(t0, t1, hits, a, b, c, d, e, f):
    for t in range(t0, t1):
        hits[t] += 1 + a.size + b.size + c.size + d.size + e.size + f.size


@pytest.mark.parametrize("threads", [2, 3])
def test_arguments_too_large_for_the_trampoline_run_from_python(threads, monkeypatch):
    """The caller's arguments must fit `_ARGS` for the helpers' trampolines
    to read them; when they do not, the helpers call the kernel from Python,
    and the caller's compiled call leaves `_ARGS` alone."""
    monkeypatch.setattr(spinteam, "_ARGS", np.zeros(64, np.uint8))
    hits = np.zeros(7, np.int64)
    arrays = [np.zeros(1, np.int8)] * 6  # 7 array structs, far past 64 bytes
    entry, trampoline = spinteam._entries(_mark_with_many_arguments, (hits, *arrays))
    assert entry != 0 and trampoline == 0
    spinteam.run_ranges_spinning(_mark_with_many_arguments, 7, threads, hits, *arrays)
    assert hits.tolist() == [7] * 7
    assert not spinteam._ARGS.any()


def test_compiled_entry_is_per_argument_types():
    """One kernel, two argument types: each call reaches its own overload."""
    for dtype in (np.float32, np.float64, np.float32):
        hits = np.zeros(9, np.int64)
        grid = np.zeros((3, 3), dtype)
        spinteam.run_ranges_spinning(_mark_compiled, 9, 2, hits, 2.0, grid)
        assert hits.tolist() == [1] * 9 and grid.sum() == 18.0
    f32 = spinteam._entries(_mark_compiled, (hits, 2.0, np.zeros((3, 3), np.float32)))[0]
    f64 = spinteam._entries(_mark_compiled, (hits, 2.0, np.zeros((3, 3), np.float64)))[0]
    assert f32 and f64 and f32 != f64


@pytest.mark.parametrize("threads", [2, 3])
def test_compiled_kernel_errors_reach_the_caller(threads):
    """A Numba kernel raising in a helper: the caller re-runs the tasks, which
    raises the kernel's own exception, and the team stays in step."""
    hits = np.zeros(6, np.int64)
    with pytest.raises(ValueError, match="compiled range failed"):
        spinteam.run_ranges_spinning(_fail_compiled, 6, threads, hits)
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark_compiled, 6, threads, hits, 1.0, np.zeros((2, 2)))
    assert hits.tolist() == [1] * 6


def test_sleeping_helper_is_woken_by_a_compiled_call():
    hits = np.zeros(6, np.int64)
    grid = np.zeros((2, 3))
    spinteam.run_ranges_spinning(_mark_compiled, 6, 2, hits, 1.0, grid)
    time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helper sleeps
    assert spinteam._TEAM[0].state[spinteam._SLEEPING] == 1
    spinteam.run_ranges_spinning(_mark_compiled, 6, 2, hits, 1.0, grid)
    assert hits.tolist() == [2] * 6


@pytest.mark.parametrize("threads", [2, 3])
def test_sleeping_helpers_are_woken_by_a_bound_call(threads):
    """A bound call finds its helpers asleep: they get their work and a
    bump from Python, then the compiled hand-off skips them."""
    hits = np.zeros(6, np.int64)
    call = spinteam.bind_ranges(_mark_compiled, 6, threads, (hits, 1.0, np.zeros((2, 3))))
    for k in range(1, 4):
        time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helpers sleep
        assert all(h.asleep for h in spinteam._TEAM[: threads - 1])
        call()
        assert hits.tolist() == [k] * 6


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_call_bound_with_moving_arrays_reads_the_arrays_it_is_given(threads):
    """`bind_moving_ranges`: the arrays at the moving positions are others on
    each call (same types, shapes, strides); each call reads and writes the
    ones it is given, the fixed arguments stay bound."""
    rows, cols = 7, 4
    grid = np.zeros((rows, 2 * cols))[:, ::2]  # strided: its own array type
    call = spinteam.bind_moving_ranges(
        _scale_rows, rows, threads, (grid, np.arange(rows, dtype=np.int64), 2.0), (0,)
    )
    assert call is not None
    for k in range(3):
        other = np.full((rows, 2 * cols), float(k))[:, ::2]
        call((other, np.arange(rows, dtype=np.int64), 2.0))
        want = 2.0 * k + np.arange(rows)[:, None]
        np.testing.assert_array_equal(other, np.broadcast_to(want, (rows, cols)))
    assert not grid.any()  # the recorded array is never touched


@njit(nogil=True)
def _scale_rows(t0, t1, grid, offsets, factor):
    for t in range(t0, t1):
        for j in range(grid.shape[1]):
            grid[t, j] = grid[t, j] * factor + offsets[t]


def test_helper_asleep_without_notice_is_woken():
    """A helper that fell asleep just as a GIL-free bump came (it cannot see
    one): the caller's wait notifies it until the work is done."""
    hits = np.zeros(4, np.int64)
    grid = np.zeros((2, 2))
    spinteam.run_ranges_spinning(_mark_compiled, 4, 2, hits, 1.0, grid)
    time.sleep(spinteam.SPIN_SECONDS * 20)
    helper = spinteam._TEAM[0]
    helper.state[spinteam._SLEEPING] = 0  # as if it had not yet said so
    spinteam.run_ranges_spinning(_mark_compiled, 4, 2, hits, 1.0, grid)
    assert hits.tolist() == [2] * 4


def test_a_range_no_helper_has_started_is_taken_over():
    """A helper still waking (or descheduled) when the caller has done its own
    range: the caller runs the helper's range too instead of waiting for it
    (here the helper sleeps; its wake-up takes far longer than a range)."""
    grid = np.zeros((2, 3))
    before = spinteam.taken_over()
    for _ in range(3):
        hits = np.zeros(6, np.int64)
        time.sleep(spinteam.SPIN_SECONDS * 20)  # the helper sleeps
        spinteam.run_ranges_spinning(_mark_compiled, 6, 2, hits, 1.0, grid)
        assert hits.tolist() == [1] * 6
    assert spinteam.taken_over() > before
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark_compiled, 6, 2, hits, 1.0, grid)  # the team is in step
    assert hits.tolist() == [1] * 6


def test_every_task_runs_once_while_helpers_fall_behind():
    """Compiled calls (whose ranges a caller may take over) between calls
    from Python (never taken over), at 2 and 3 threads, with pauses that let
    helpers fall asleep or lag: a helper must skip a generation the caller
    took, and never run a later generation's work twice."""
    rng = np.random.default_rng(0)
    grid = np.zeros((2, 3))
    bound_hits = np.zeros(9, np.int64)
    bound = [spinteam.bind_ranges(_mark_compiled, 9, t, (bound_hits, 1.0, grid)) for t in (2, 3)]
    for i in range(300):
        hits = np.zeros(9, np.int64)
        if i % 4 == 0:
            spinteam.run_ranges_spinning(_mark, 9, 2 + i % 2, hits)
        elif i % 4 == 1:  # a bound call: packed arguments, work set in compiled code
            bound_hits[:] = 0
            bound[i % 2]()
            hits = bound_hits
        else:
            spinteam.run_ranges_spinning(_mark_compiled, 9, 2 + i % 2, hits, 1.0, grid)
        assert hits.tolist() == [1] * 9, i
        if i % 40 == 0:
            time.sleep(spinteam.SPIN_SECONDS * 3)
        elif rng.random() < 0.3:
            time.sleep(rng.uniform(0, 2e-4))


@njit(nogil=True)
def _mark_and_count(t0, t1, hits):
    for t in range(t0, t1):
        hits[t] += 1
    return t1 - t0


def test_kernel_returning_a_value_runs_from_python():
    """The native call discards results, so a kernel with one is called from
    Python (its result unused, as `run_tasks` never reads one)."""
    hits = np.zeros(5, np.int64)
    assert spinteam._entries(_mark_and_count, (hits,)) == (0, 0)
    spinteam.run_ranges_spinning(_mark_and_count, 5, 2, hits)
    assert hits.tolist() == [1] * 5


@intrinsic
def _meminfo_of(typingctx, array):
    """The address of `array`'s meminfo (0: none)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, llargs):
        made = context.make_array(signature.args[0])(context, builder, llargs[0])
        return builder.ptrtoint(made.meminfo, ir.IntType(64))

    return types.int64(array), codegen


@njit(nogil=True)
def _late_helper(t0, t1, seen, x, spin):
    """Task 0 (the caller's) records x's meminfo at once; task 1 (the
    helper's) waits out the caller's lead checks (`spin`), then takes views
    of x, as kernels do (reference counts on its meminfo), and records it."""
    for t in range(t0, t1):
        w = 1
        for k in range(spin if t > 0 else 0):
            w = (w * 5 + k) % 1000003
        view = x.reshape(x.size)[w % 2 :]
        seen[t] = _meminfo_of(view) + (view[0] < 0)


@pytest.mark.parametrize("packed", [False, True])
def test_helpers_run_kernels_without_the_callers_meminfos(packed, monkeypatch):
    """The tuple a helper's trampoline reads is the caller's `_team_call`'s,
    and so are the meminfos it unboxed: that call frees them when it
    returns, which it does after `_LEAD_CHECKS` reads when a helper is late
    (to notify it from Python). So the helpers' kernels get the arrays
    without meminfos (their views count no references): with the caller's,
    a late helper's views corrupted the heap (a stress run of 300 such calls
    aborted 3 times in 3). Every call here has a late helper; its views
    must see no meminfo, the caller's its own. Packed arguments (the usual
    path) carry no meminfo on either side: the caller's range goes through
    the trampoline too."""
    if not packed:  # `_team_call`'s path: arguments `packargs` would not write
        monkeypatch.setattr(spinteam, "pack_arguments", lambda context, args: None)
    x = np.ones(8)
    entry, trampoline = spinteam._entries(_late_helper, (np.zeros(2, np.int64), x, 1))
    assert entry and trampoline
    for _ in range(20):
        seen = np.full(2, -1, np.int64)
        spinteam.run_ranges_spinning(_late_helper, 2, 2, seen, x, 1_000_000)
        assert seen[1] == 0, seen
        assert (seen[0] != 0) == (not packed), seen


def test_packed_arguments_are_numbas_own_layout():
    """`packargs.pack_arguments` writes the argument tuple as `_team_call`
    stores it (Numba's own layout) but for the arrays' meminfos and parents,
    which it leaves null: strided, 0-d and 3-d arrays, integers of every
    width, floats of both, a bool. `data_words` points at the arrays' data
    addresses in it."""
    from numba.core.typing.typeof import Purpose, typeof

    from qnnjit.backends.cpu.packargs import _layout, data_words, pack_arguments

    args = (
        np.zeros((3, 4), np.int8)[:, ::2], 5, 2.5, np.float32(1.5), True, np.arange(6),
        np.int32(-3), np.zeros((2, 3, 4), np.float32).transpose(2, 0, 1), np.uint8(200),
        np.array(7.0), np.int16(-2), np.uint64(1 << 63), False,
    )  # fmt: skip
    entry, trampoline = spinteam._entries(_takes_everything, args)
    assert entry and trampoline
    got = pack_arguments(_takes_everything.targetctx, args)
    layout = _layout(_takes_everything.targetctx, typeof(args, Purpose.argument))
    size, fields = layout.size, layout.fields
    want = np.zeros(size, np.uint8)  # what `_team_call` stores for its helpers
    spinteam._team_call(spinteam._STATES, 0, 0, entry, 0, args, want)
    assert got.size == size
    compared = np.ones(size, bool)
    for offset, member in fields:
        if isinstance(member, types.Array):
            compared[offset : offset + 16] = False  # meminfo, parent
            assert not got[offset : offset + 16].any()
    np.testing.assert_array_equal(got[compared], want[compared])
    words = got[: size // 8 * 8].view(np.int64)
    arrays = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]
    for i, word in data_words(_takes_everything.targetctx, args, arrays):
        assert words[word] == args[i].__array_interface__["data"][0]


def test_packing_tells_python_ints_past_int64_apart():
    """Numba's type fingerprint, by which layouts are found, is the same for
    every Python int, but one past int64 is typed uint64: it is packed as
    such, not refused, after a small one was packed."""
    from numba.core.typing.typeof import Purpose, typeof

    from qnnjit.backends.cpu.packargs import _layout, pack_arguments

    context = _takes_everything.targetctx
    small = pack_arguments(context, (np.zeros(2), 5))
    big_args = (np.zeros(2), 1 << 63)
    big = pack_arguments(context, big_args)
    layout = _layout(context, typeof(big_args, Purpose.argument))
    assert typeof(big_args, Purpose.argument).types[1] == types.uint64
    assert small.size == big.size == layout.size
    offset = layout.fields[1][0]
    assert big[offset : offset + 8].view(np.uint64)[0] == 1 << 63
    assert small[offset : offset + 8].view(np.int64)[0] == 5


@njit(nogil=True)
def _takes_everything(t0, t1, a, b, c, d, e, f, g, h, i, j, k, m, n):
    pass


def test_trampolines_persist_in_the_kernel_cache(tmp_path, monkeypatch):
    """A trampoline compiled once is stored in the cache directory and loaded
    from it next time (no compile), and the loaded one runs the kernel; a
    damaged entry is compiled again."""
    from numba.core.typing.typeof import Purpose, typeof

    from qnnjit.backends.cpu.packargs import pack_arguments

    monkeypatch.setenv("QNNJIT_CACHE_DIR", str(tmp_path))
    hits, grid = np.zeros(7, np.int64), np.zeros((2, 3))
    args = (hits, 1.0, grid)
    context, packed_type = _mark_compiled.targetctx, typeof(args, Purpose.argument)
    spinteam._trampoline(context, packed_type)
    (stored,) = (tmp_path / "cpu_trampolines").iterdir()
    compile_trampoline = spinteam._compile_trampoline
    monkeypatch.setattr(spinteam, "_compile_trampoline", lambda *a: pytest.fail("compiled"))
    loaded = spinteam._trampoline(context, packed_type)
    entry, _ = spinteam._entries(_mark_compiled, args)
    packed = pack_arguments(context, args)
    run = spinteam._compiled_overload(spinteam._call_packed, spinteam._PACKED_CALL)
    assert run(loaded, entry, packed.ctypes.data, 0, 7) == 0
    assert hits.tolist() == [1] * 7 and grid.sum() == 6.0
    stored.write_bytes(b"damaged")
    monkeypatch.setattr(spinteam, "_compile_trampoline", compile_trampoline)
    assert spinteam._trampoline(context, packed_type) != 0


@njit(nogil=True)
def _add_then_check(t0, t1, hits, limit):
    for t in range(t0, t1):
        hits[t] += 1
        if hits[t] > limit:
            raise ValueError("past the limit")


@pytest.mark.parametrize("threads", [2, 3])
def test_a_sequence_runs_serial_and_team_calls_in_order(threads):
    """`CallSequence` runs packed serial and team calls in one compiled call,
    in order (each reads what the one before wrote), also when the helpers
    sleep when it starts (the first team call is handed over from Python)
    and across repeats."""
    a, b = np.zeros(9, np.int64), np.zeros(9, np.int64)
    calls = [
        spinteam.bind_ranges(_add_then_check, 9, threads, (a, 100)),
        spinteam.bind_serial(_copy_scaled, 9, (a, b, 2)),
        spinteam.bind_ranges(_add_then_check, 9, threads, (b, 100)),
    ]
    assert [type(c).__name__ for c in calls] == ["TeamCall", "SerialCall", "TeamCall"]
    sequence = spinteam.CallSequence(calls)
    for k in range(1, 4):
        if k == 2:
            time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helpers sleep
            assert all(h.asleep for h in spinteam._TEAM[: threads - 1])
            # the compiled loop leaves a team call with sleeping helpers to
            # Python (a GIL-free bump would not wake them), and runs nothing
            assert sequence._run(0) == 8 * 0 + 0 and a.tolist() == [1] * 9
        assert sequence() == -1
        assert a.tolist() == [k] * 9 and b.tolist() == [2 * k + 1] * 9


@njit(nogil=True)
def _compiled_mark(t0, t1, hits):
    for t in range(t0, t1):
        hits[t] += 1


@pytest.mark.parametrize("packed", [True, False])
def test_a_call_whose_hand_off_cannot_compile_wakes_no_helper(packed, monkeypatch):
    """The hand-off is compiled when the call is bound, before any helper is
    woken: a compile that raised there (in a cold compile, a function the
    other process is compiling) once left a woken helper spinning for
    arguments that never came, until the process ended."""
    hits = np.zeros(9, np.int64)
    spinteam.run_ranges_spinning(_compiled_mark, 9, 2, hits)  # the team exists
    time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helpers sleep
    assert spinteam._TEAM[0].asleep

    class Busy:
        """A hand-off whose compile raises (its first call compiles it)."""

        def compile(self, *signature):
            raise RuntimeError("being compiled elsewhere")

        __call__ = compile

    monkeypatch.setattr(spinteam, "_team_call_work", Busy())
    monkeypatch.setattr(spinteam, "_team_call", Busy())
    with pytest.raises(RuntimeError, match="elsewhere"):
        spinteam.run_ranges_spinning(_compiled_mark, 9, 2, hits)
    time.sleep(0.05)  # time for a woken helper to wake
    assert spinteam._TEAM[0].asleep and hits.tolist() == [1] * 9, "nobody was woken"
    monkeypatch.undo()
    spinteam.run_ranges_spinning(_compiled_mark, 9, 2, hits)
    assert hits.tolist() == [2] * 9


def test_the_teams_compiled_functions_are_compiled_once_each():
    """Python and compiled callers call the team's functions with the same
    types (constants go through `_I64`): as literals, a compiled caller's
    constants made Numba compile `_team_call_work`, `_publish` and
    `_spin_until_changed` again, ~0.6 s of a cold compile at two threads.
    The callers are typed afresh (copies: the originals load from the
    cache, their callees unseen)."""
    a = np.zeros(9, np.int64)
    spinteam.bind_ranges(_add_then_check, 9, 2, (a, 100))()  # Python's `_team_call_work`
    spinteam._spin_until_changed(spinteam._STATES[0], spinteam._DONE, -1, 1)  # `wait`'s
    spinteam.compile_sequence_loop(2)
    serve = (types.int64[::1], types.uint8[::1], types.int64, types.int64, types.int64)
    for caller, signature in [
        (spinteam._run_calls, spinteam._CALLS),
        (spinteam._team_call_work, None),
        (spinteam._await_helpers, None),  # typed by the copy of its caller just now
        (spinteam._serve, serve),
    ]:
        njit(caller.py_func).compile(signature or caller.signatures[0])
    for callee in (spinteam._team_call_work, spinteam._publish, spinteam._spin_until_changed):
        assert len(callee.signatures) == 1, callee.signatures


@njit(nogil=True)
def _copy_scaled(t0, t1, src, dst, scale):
    for t in range(t0, t1):
        dst[t] = src[t] * scale


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("failing", [0, 8])  # the task past the limit: the caller's, a helper's
def test_a_sequence_stops_at_a_team_call_that_raised(threads, failing):
    """A team call whose kernel raises on some range (a helper's or the
    caller's) stops the sequence there: its index comes back, `raise_error`
    raises the kernel's own error, and the calls after it have not run."""
    a, b = np.zeros(9, np.int64), np.zeros(9, np.int64)
    a[failing] = 5  # that task's range goes past the limit on the second run
    sequence = spinteam.CallSequence(
        [
            spinteam.bind_ranges(_add_then_check, 9, threads, (a, 6)),
            spinteam.bind_ranges(_add_then_check, 9, threads, (b, 100)),
        ]
    )
    assert sequence() == -1
    assert sequence() == 0
    with pytest.raises(ValueError, match="past the limit"):
        sequence.raise_error(0)
    assert b.tolist() == [1] * 9  # once, by the first run only

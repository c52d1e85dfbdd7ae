"""Replayed runs: once a model has run on inputs of some shapes, later runs on
the same shapes repeat the recorded kernel calls on the same buffers.

Why: a step's `run` does Python work before its kernels start (the shapes,
views of its operands, the output array, the thread split), the same work
every time the shapes are the same. On MobileNetV2's 40 steps that was about
0.2 ms a run: 7% of a run at one thread, 12% at two. A replayed step is one
call of an already bound kernel.

Recording. `record` runs the plan with every step's `run` called twice on
the same inputs, collecting the `run_tasks` calls each makes
(`kernels/_threads.py` `recording`), and keeps the second call's outputs as
the step's buffers. A step is replayed when the two calls show that its
kernels are all there is to it:
- both made the same `run_tasks` calls, and each array they passed is the
  same object both times (a constant, a per-shape cache) or the same view of
  the step's inputs or outputs (the only arrays whose contents change), and
  each other argument compares equal;
- every output is a view of an array those calls took, or of an input (a
  reshape): nothing is computed outside the recorded calls.
A step that reads a graph input (the caller's array is a new one each run)
replays on views of each run's array made like the recorded ones
(`_on_run_inputs`), where the array is laid out as the recorded copy.
Every other step (a NumPy fallback; a step that copies an operand or
allocates scratch per call; one reading an input laid out otherwise) runs
again each time, its results copied into its recorded buffers, which the
replayed steps read.

Binding constants. Every value of a binding lives in the same buffer every
run (a rerun step's result is copied into its recorded buffer, which must
have its shape), so a `shape` (or `size`) step gives the same result every
run, and so does every step that reads such results alone: a transformer's
class token expanded to the batch size (ViT: shape -> gather -> concat ->
equal -> where -> expand -> concat, NumPy fallbacks, about 0.1 ms a run).
Those steps run at recording only; their results keep their buffers for the
binding's life (the pool never hands them out again).

This is also the run's buffer plan: a replayed run allocates no arrays but
the copies of the graph outputs it returns (the kernels' per-task scratch
aside). A binding keeps its buffers as long as it lives, so the recorded
call of each step draws its results from a pool (`kernels/_buffers.py`)
that reuses the buffers of tensors no later step reads (the plan's
`frees`): a binding holds about the largest set of tensors live at once,
not every intermediate tensor of the run.

A binding serves one run at a time; a concurrent run records another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...errors import QnnjitError
from .kernels._buffers import Pool, pooled
from .kernels._threads import TaskCall, recording
from .spinteam import CallSequence, SerialCall, TeamCall


@dataclass
class Binding:
    """A recorded run: `calls` in order, each with the step it belongs to (for
    error messages); `env` the value slots' arrays (graph inputs: the
    caller's, set for the duration of a run); `outputs` (slot, constant) per
    graph output."""

    input_slots: list[int]
    env: list
    calls: list[tuple[Callable[[], None], object]]
    outputs: list[tuple[int | None, object]]
    replayed_steps: int
    rerun_steps: list  # the steps that run again each time (`record`)
    constant_steps: list  # the steps run at recording only (binding constants)
    input_steps: list  # the replayed steps that read graph inputs (`_on_run_inputs`)

    def run(self, arrays) -> list[np.ndarray]:
        """The graph outputs for `arrays`.

        Written for the fewest Python operations (RUN_DOC in `executor`):
        one try for every call, and no comprehension (a function call of
        its own in Python 3.11)."""
        env = self.env
        for s, array in zip(self.input_slots, arrays):
            env[s] = array
        step = None
        try:
            try:
                for call, step in self.calls:  # noqa: B007 (the handler reads `step`)
                    call()
            except QnnjitError:
                raise
            except Exception as exc:
                raise step_error(step, exc) from exc
            copies = []  # (before the inputs' slots are cleared: an output may be one)
            for s, const in self.outputs:  # C-contiguous copies: the buffers are the binding's
                copies.append(const if s is None else env[s].copy())
            return copies
        finally:
            for s in self.input_slots:
                env[s] = None


def record(executor, arrays) -> tuple[list[np.ndarray], Binding]:
    """Run `executor`'s plan on `arrays`, recording it: (the graph outputs,
    the binding that replays the run)."""
    env = list(executor._env)
    # Private copies: a rerun step's buffer may be a view of a graph input,
    # and the binding writes into its buffers; never into the caller's arrays.
    for s, array in zip(executor._input_slots, arrays):
        env[s] = np.array(array, copy=True)
    graph_inputs = set(executor._input_slots)
    calls: list[tuple[Callable[[], None], object]] = []
    replayed, reruns, constants, input_steps = 0, [], [], []
    pool, live = Pool(), set(graph_inputs)  # live: the slots a later step or the caller reads
    fixed: set[int] = set()  # the binding constants' slots (held for good)
    for step, reads, writes, frees in executor._plan_steps:
        inputs = [env[s] for s in reads]
        first = _recorded(executor, step, inputs)
        pool.hold_only(env[s] for s in live | fixed)
        with pooled(pool):  # the kept call's results: in buffers no live tensor uses
            results, made = second = _recorded(executor, step, inputs)
        rerun = _rerun(executor, step, reads, env, results)
        if _binding_constant(step, reads, fixed):
            fixed.update(writes)
            constants.append(step)
        elif not _replayable(inputs, first, second):
            calls.append((rerun, step))
            reruns.append(step)
        elif graph_inputs.isdisjoint(reads):
            calls.extend((call.bound(), step) for call in made)
            replayed += 1
        else:
            at = [i for i, s in enumerate(reads) if s in graph_inputs]
            call = _on_run_inputs(env, reads, at, inputs, made, results, rerun)
            calls.append((call or rerun, step))
            (input_steps if call else reruns).append(step)
            replayed += call is not None
        for s, result in zip(writes, results):
            env[s] = result
        live.update(writes)
        live.difference_update(frees)  # their buffers may take later results
    outputs = executor._outputs
    calls = _sequenced(calls)
    binding = Binding(
        list(executor._input_slots), env, calls, outputs, replayed, reruns, constants, input_steps
    )
    copies = _output_copies(env, outputs)
    for s in executor._input_slots:
        env[s] = None
    return copies, binding


# ops whose result depends on their operand's shape alone
SHAPE_ONLY_OPS = frozenset({"shape", "size"})


def _binding_constant(step, reads, fixed: set[int]) -> bool:
    """Whether `step` computes the same results on every run of a binding:
    it reads binding constants only, or only its operands' shapes (which
    a binding's buffers fix)."""
    return all(s in fixed for s in reads) or all(n.op in SHAPE_ONLY_OPS for n in step.nodes)


def _recorded(executor, step, inputs) -> tuple[list[np.ndarray], list[TaskCall]]:
    with recording() as calls:
        results = executor._call_step(step, inputs)
    return results, calls


def _rerun(executor, step, reads, env, buffers) -> Callable[[], None]:
    """A step that is not replayed: run it on the run's values and copy its
    results into its recorded buffers."""

    def call():
        results = executor._call_step(step, [env[s] for s in reads])
        for buffer, result in zip(buffers, results):
            if result.shape != buffer.shape:  # copyto would broadcast it
                raise QnnjitError(
                    f"result of shape {result.shape} where the recorded run had "
                    f"{buffer.shape}: a shape that depends on values is not replayed"
                )
            np.copyto(buffer, result)

    return call


def _on_run_inputs(env, reads, at, inputs, made, results, rerun) -> Callable[[], None] | None:
    """A step reading graph inputs (`inputs[i]` for i in `at`: the recorded
    run's private C-contiguous copies of them) replayed on each run's arrays:
    its recorded calls with their views of those inputs made anew, at the
    same offsets, shapes and strides, from the arrays the run put in `env`,
    when those are laid out as the copies (C-contiguous, aligned, writeable;
    else `rerun`). None where that cannot be: a result that is a view of a
    graph input would go stale, or a call cannot be bound.

    Why: a CNN's first step quantizes the image; run again through its
    `run` each time, it cost about 10 us more a run at one thread and 15 us
    at two (MobileNetV2, ResNet-18), 6 us of an attention block's 165 us.
    A step with one call that takes the input itself (the image quantize)
    takes the run's array as it is (`_on_run_input`): no view to make, and
    the fewest Python operations, which run cold (RUN_DOC in `executor`)."""
    recorded = {i: inputs[i] for i in at}
    if any(r.size and _within(r, list(recorded.values())) is not None for r in results):
        return None
    bound = []
    for call in made:
        views = {}
        for position, arg in enumerate(call.args):
            where = _within(arg, inputs) if isinstance(arg, np.ndarray) and arg.size else None
            if where is not None and where[0] in recorded:
                views[position] = (where[0], _address(arg) - _address(recorded[where[0]]))
        if views:
            fn = call.rebinding(tuple(views))
            if fn is None:
                return None
        else:
            fn = _ignoring_arguments(call.bound())
        bound.append((fn, call.args, views))
    if len(at) == 1 and len(bound) == 1 and bound[0][2]:
        fn, args, views = bound[0]
        if all(_is_whole(args[p], recorded[i], start) for p, (i, start) in views.items()):
            return _on_run_input(env, reads[at[0]], recorded[at[0]], fn, args, tuple(views), rerun)

    def replay_on_inputs():
        arrays = {i: env[reads[i]] for i in at}
        if not all(_laid_out_as(arrays[i], recorded[i]) for i in at):
            rerun()
            return
        for fn, args, views in bound:
            call_args = list(args)
            for position, (i, start) in views.items():
                view = args[position]
                call_args[position] = np.ndarray(
                    view.shape, view.dtype, arrays[i], start, view.strides
                )
            fn(tuple(call_args))

    return replay_on_inputs


def _on_run_input(env, slot, recorded, fn, args, positions, rerun) -> Callable[[], None]:
    """`_on_run_inputs` for one call taking the graph input at `slot` itself
    (its recorded copy `recorded`) at `positions` of its arguments.
    ResNet-18's image quantize after the rest of a run, one thread, the
    ways alternated in one process: with a view made per run 52-62 us at
    the least and 68-78 at the median, now 47 and 56. (Its packed
    arguments with the data address written in, as two threads do, took
    longer still cold: 71 and 96.)"""
    args = list(args)

    def replay_on_input():
        array = env[slot]
        if not _laid_out_as(array, recorded):
            rerun()
            return
        for position in positions:
            args[position] = array
        try:
            fn(tuple(args))
        finally:
            for position in positions:
                args[position] = recorded  # no reference to the caller's array kept

    return replay_on_input


def _is_whole(view: np.ndarray, array: np.ndarray, start: int) -> bool:
    """Whether `view`, `start` bytes into `array`, is all of it as it is."""
    return start == 0 and view.shape == array.shape and view.strides == array.strides


def _ignoring_arguments(fn: Callable[[], None]) -> Callable[[tuple], None]:
    return lambda _: fn()


def _laid_out_as(array, recorded: np.ndarray) -> bool:
    """Whether views of `array` made as of `recorded` are arrays of the types
    the recorded calls were bound for."""
    flags = getattr(array, "flags", None)
    return (
        flags is not None and flags.c_contiguous and flags.aligned and flags.writeable
        and array.dtype == recorded.dtype and array.shape == recorded.shape
    )  # fmt: skip


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _sequenced(calls: list) -> list:
    """`calls` with each run of consecutive packed calls (`spinteam.SerialCall`,
    `spinteam.TeamCall`) made one call of a `CallSequence`: one step into
    compiled code for the run instead of one per call. At one thread that is
    every call of a replayed run but the first."""
    out: list = []
    run: list = []
    for call, step in [*calls, (None, None)]:
        if isinstance(call, (SerialCall, TeamCall)):
            run.append((call, step))
            continue
        out.extend(run if len(run) < 2 else [(_sequence_call(run), run[0][1])])
        run = []
        if call is not None:
            out.append((call, step))
    return out


def _sequence_call(run: list) -> Callable[[], None]:
    """The calls of `run` ((call, step) pairs) in one `CallSequence`; a
    kernel's error is raised as its own step's (`step_error`), and should
    its re-run not raise it, the rest of the run goes on call by call."""
    sequence = CallSequence([call for call, _ in run])
    steps = [step for _, step in run]

    def call() -> None:
        failed = sequence()
        if failed < 0:
            return
        for i in range(failed, len(steps)):
            try:
                if i == failed:
                    sequence.raise_error(i)
                else:
                    sequence.calls[i]()
            except Exception as exc:
                raise step_error(steps[i], exc) from exc

    return call


def _replayable(inputs, first, second) -> bool:
    """Whether the two recorded calls of a step (results, run_tasks calls)
    show that repeating the second call's kernels computes its results (see
    the module docstring)."""
    (results1, calls1), (results2, calls2) = first, second
    if len(calls1) != len(calls2):
        return False
    for c1, c2 in zip(calls1, calls2):
        if c1.kernel is not c2.kernel or c1[1:4] != c2[1:4] or len(c1.args) != len(c2.args):
            return False
        for a1, a2 in zip(c1.args, c2.args):
            if not _same_argument(a1, a2, inputs + results1, inputs + results2):
                return False
    taken = [a for call in calls2 for a in call.args if isinstance(a, np.ndarray)]
    return all(r.size == 0 or _within(r, taken + inputs) is not None for r in results2)


def _same_argument(a1, a2, values1, values2) -> bool:
    """a1 and a2 (one argument position of the two calls) stand for the same
    thing: one object, or the same view of corresponding run-time values."""
    if a1 is a2:
        return True
    if not (isinstance(a1, np.ndarray) and isinstance(a2, np.ndarray)):
        try:
            return type(a1) is type(a2) and bool(a1 == a2)
        except Exception:  # noqa: BLE001 - not comparable: not the same
            return False
    if (a1.dtype, a1.shape, a1.strides) != (a2.dtype, a2.shape, a2.strides):
        return False
    if a1.size == 0:
        return True  # no contents to be stale
    where = _within(a1, values1)
    return where is not None and where == _within(a2, values2)


def _within(array: np.ndarray, values: list) -> tuple[int, int] | None:
    """(index, byte offset) of the first of `values` whose memory holds all of
    `array`'s, else None."""
    lo, hi = _bounds(array)
    for index, value in enumerate(values):
        if isinstance(value, np.ndarray) and value.size:
            vlo, vhi = _bounds(value)
            if vlo <= lo and hi <= vhi:
                return index, lo - vlo
    return None


def _bounds(array: np.ndarray) -> tuple[int, int]:
    """The first and one-past-last byte addresses of `array`'s elements."""
    lo = hi = array.__array_interface__["data"][0]
    for n, stride in zip(array.shape, array.strides):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + array.itemsize


def step_error(step, exc: Exception) -> QnnjitError:
    """The error a run raises when `step` (a `Kernel`) fails with `exc`,
    naming its nodes."""
    names = ", ".join(f"{n.name!r} ({n.op})" for n in step.nodes)
    return QnnjitError(f"cpu kernel {step.name} of node {names} failed: {exc}")


def _output_copies(env, outputs) -> list[np.ndarray]:
    """The graph outputs as C-contiguous copies: the buffers are the binding's."""
    return [env[s].copy() if s is not None else const for s, const in outputs]  # order "C"
